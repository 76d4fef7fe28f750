"""Shared by the benchmark scripts: score a DELSE model on evenly spaced test instances, and write a
result table into its section of BENCHMARKS.md."""
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_section(section, table, fallback):
    """Replace the text between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->``.

    Args:
        section: marker name, e.g. "bench_dsb2018"; table: Markdown to put there;
        fallback: where the table was also written, named in the message if the markers are missing.
    """
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = BENCHMARKS.read_text()
    if begin in text and end in text:
        BENCHMARKS.write_text(text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])
        print(f"updated {BENCHMARKS}")
    else:
        print(f"markers {begin} / {end} not found in {BENCHMARKS}; table left in {fallback}")


def score_delse_instances(cfg, weights, num_instances=0):
    """Per-instance scores of a DELSE model on ``cfg.DATASETS.TEST[0]``.

    Args:
        cfg: the model's config; weights: path of its checkpoint; num_instances: evenly spaced
            instances of the test set to score (0: all).
    Returns:
        (records, evaluator): the DELSEEvaluator's per-instance records and the evaluator (its
        tolerances and threshold grids summarise them).
    """
    import numpy as np
    import torch

    from delse import DELSEDatasetMapper, DELSEEvaluator, flatten_instances
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from levelset_d2.checkpoint import SafeDetectionCheckpointer

    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(weights))
    model.eval()
    dataset = cfg.DATASETS.TEST[0]
    instances = flatten_instances(DatasetCatalog.get(dataset), cfg.INPUT.DELSE.MIN_AREA)
    if 0 < num_instances < len(instances):
        keep = np.unique(np.linspace(0, len(instances) - 1, num_instances).round().astype(int))
        instances = [instances[i] for i in keep]
    mapper = DELSEDatasetMapper(cfg, False)
    evaluator = DELSEEvaluator(dataset, cfg, distributed=False)
    with torch.no_grad():
        for i in range(0, len(instances), 8):
            inputs = [mapper(x) for x in instances[i: i + 8]]
            evaluator.process(inputs, model(inputs))
    return evaluator._records, evaluator
