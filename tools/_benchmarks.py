"""Shared by the benchmark scripts: run a training of train_net.py, score a DELSE model on evenly
spaced test instances, and write a result table into its section of BENCHMARKS.md."""
import os
import subprocess
import sys
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


def run_train_net(config, opts, log_path, threads):
    """Train with ``train_net.py --config-file config *opts`` (no test sets) in a subprocess with
    ``threads`` BLAS/torch threads; the log goes to ``log_path``, progress and errors to stdout.
    Raises SystemExit naming the log when the training fails."""
    cmd = [sys.executable, "train_net.py", "--config-file", str(config), *map(str, opts), "DATASETS.TEST", "()"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=BENCHMARKS.parent, env=env)
        for line in proc.stdout:
            log.write(line)
            if "eta:" in line or "Error" in line or "Traceback" in line:
                print(line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"training failed ({proc.returncode}); see {log_path}")
