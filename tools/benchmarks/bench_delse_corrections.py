"""Table-8-style benchmark of DELSE's corrections (section 5.3) on the nuclei and on COCO-MVal.

For each dataset, as the paper does with its 10 / 6 Cityscapes cities:
  1. base models on the base part of the training images (``delse_<data>_train_base``): DELSE
     (pre-training, then joint training) and the pixel-wise (DEXTR-style) baseline;
  2. interactive fine-tuning on the held-out part (``..._train_interactive``) with simulated drags
     (U{0..3} per sample), all three from their base model with the same budget and seed:
     (a) DELSE with motion editing, (b) DELSE with boundary clicks only, (c) the pixel-wise
     baseline with clicks (configs/DELSE/*_R_18_<data>_interactive*.yaml);
  3. each scored on the dev split (``dsb2018_dev`` / ``delse_coco_mval_dev``) after 0, 1, 2, 3
     simulated corrections: mIoU and boundary F at 2 px, and the mIoU at the searched threshold
     (0 corrections; the paper's protocol for every model, optimistic).

    .venv/bin/python tools/benchmarks/bench_delse_corrections.py --iters 3000 --finetune-iters 1000 --update-benchmarks
    .venv/bin/python tools/benchmarks/bench_delse_corrections.py --iters 20 --finetune-iters 10 --eval-instances 10  # smoke

``--variant LABEL KEY VALUE ...`` adds a row: (a)'s fine-tuning from the same DELSE base, budget and
seed with these config overrides (e.g. ``MODEL.DELSE.EDIT_SIGNED_DRAGS True``), so that editing-block
options are compared with (a) and (b) on equal terms (paired per object by ``bench_delse_noc.py --merge``).

Writes output/bench_delse_corrections/results.{md,json} and, with --update-benchmarks, the table
into BENCHMARKS.md between <!-- bench_delse_corrections:begin --> and <!-- ...:end -->.
"""
import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from _benchmarks import run_train_net, update_section

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs/DELSE"
DATASETS = ("dsb2018", "coco_mval")
BASES = {"delse": "delse_R_18_{d}_base.yaml", "pixel_wise": "pixel_wise_R_18_{d}_base.yaml"}
# row label -> (fine-tuning config, base model it starts from)
ROWS = {
    "(a) DELSE, motion editing": ("delse_R_18_{d}_interactive.yaml", "delse"),
    "(b) DELSE, clicks only": ("delse_R_18_{d}_interactive_clicks.yaml", "delse"),
    "(c) Pixel-wise, clicks": ("pixel_wise_R_18_{d}_interactive_clicks.yaml", "pixel_wise"),
}
K = 3  # corrections scored


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def load_cfg(config, opts):
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def run_opts(args, config, out_dir, iters, weights=None, extra=()):
    """Overrides of one training: budget, seed, CPU, no periodic evaluation; DELSE's base keeps its
    config's pre-training share of the schedule; then ``extra`` (a variant's KEY VALUE list)."""
    cfg = load_cfg(config, [])
    opts = ["OUTPUT_DIR", out_dir, "SEED", args.seed, "SOLVER.MAX_ITER", iters,
            "SOLVER.STEPS", f"({int(iters * 0.8)},)", "SOLVER.CHECKPOINT_PERIOD", iters,
            "TEST.EVAL_PERIOD", 0, "MODEL.DEVICE", "cpu", "TEST.DELSE.THRESHOLD_SEARCH", True]
    if cfg.MODEL.DELSE.PRETRAIN_ITERS > 0:
        share = cfg.MODEL.DELSE.PRETRAIN_ITERS / cfg.SOLVER.MAX_ITER
        opts += ["MODEL.DELSE.PRETRAIN_ITERS", max(1, round(iters * share))]
    if weights is not None:
        opts += ["MODEL.WEIGHTS", weights]
    return [str(o) for o in opts + list(extra)]


def train(args, config, out_dir, iters, log_path, weights=None, extra=()):
    run_train_net(config, run_opts(args, config, out_dir, iters, weights, extra), log_path, args.threads)


def evaluate(args, config, out_dir, iters, extra=()):
    """Summary of model_final.pth on the dev instances (all, or --eval-instances evenly spaced)
    after 0..K simulated corrections."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_cfg(config, run_opts(args, config, out_dir, iters, extra=extra) + ["MODEL.DELSE.TEST_NUM_CORRECTIONS", K,
                                                                      "MODEL.WEIGHTS", ""])
    from delse.evaluation import score_instances

    records, evaluator = score_instances(cfg, Path(out_dir) / "model_final.pth", args.eval_instances)
    res = dict(evaluator.summarize(records, evaluator.tolerances, evaluator.thresholds))
    res["num_instances"] = len(records)
    res["dataset"] = cfg.DATASETS.TEST[0]
    return res


def table(rows, args, times):
    f = lambda r, k: f"{r[k]:.1f}" if k in r else "–"
    head = ("| data | model | mIoU, 0 | 1 | 2 | 3 corrections | F@2px, 0 | 1 | 2 | 3 corrections "
            "| mIoU at searched threshold, 0 corrections |")
    lines = [head, "|" + "---|" * 11]
    for data, label, r in rows:
        miou = [f(r, "mIoU")] + [f(r, f"mIoU@{k}drag") for k in range(1, K + 1)]
        fb = [f(r, "F@2px")] + [f(r, f"F@2px@{k}drag") for k in range(1, K + 1)]
        thr = f"{r['mIoU@best_threshold']:.1f} ({r['best_threshold']:g})" if "best_threshold" in r else "–"
        lines.append(f"| {data} ({r['num_instances']} dev objects) | {label} | " + " | ".join(miou) + " | "
                     + " | ".join(fb) + f" | {thr} |")
    cmd = "tools/benchmarks/bench_delse_corrections.py " + shlex.join(a for a in sys.argv[1:] if a != "--update-benchmarks")
    wall = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
    return "\n".join([
        f"Command: `.venv/bin/python {cmd.strip()}`  ",
        f"Budget: base models {args.iters} iterations of batch 8 on the base part of the training images "
        f"(DELSE: its configs' share pre-training), then {args.finetune_iters} iterations of interactive "
        f"fine-tuning on the held-out 6/16 with U{{0..3}} simulated drags per sample, for every row; seed "
        f"{args.seed}, {args.threads} torch thread(s). A correction is the simulated annotator's drag "
        f"(the worst predicted boundary point onto the GT); none when the mask is within 1 px.  ",
        f"Wall time: {wall}.", "", *lines])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--iters", type=int, default=3000, help="iterations of each base model")
    ap.add_argument("--finetune-iters", type=int, default=1000, help="iterations of each interactive fine-tuning")
    ap.add_argument("--eval-instances", type=int, default=0, help="evenly spaced dev instances (0: all)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output-dir", default=str(REPO / "output/bench_delse_corrections"))
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing model_final.pth files")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="LABEL KEY VALUE",
                    help="one more row: (a)'s fine-tuning with these config overrides (repeatable)")
    ap.add_argument("--update-benchmarks", action="store_true")
    args = ap.parse_args()
    rows_spec = {label: (*spec, ()) for label, spec in ROWS.items()}
    for label, *extra in args.variant:
        if len(extra) % 2:
            ap.error(f"--variant {label!r}: overrides come as KEY VALUE pairs, got {extra}")
        rows_spec[label] = (*ROWS["(a) DELSE, motion editing"], tuple(extra))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, times = [], {}
    t_all = time.time()
    for d in args.datasets:
        base_dirs = {}
        for kind, pattern in BASES.items():
            config, base_dirs[kind] = CONFIGS / pattern.format(d=d), out / f"{d}_{kind}_base"
            if not args.skip_train:
                t0 = time.time()
                train(args, config, str(base_dirs[kind]), args.iters, out / f"{d}_{kind}_base.train.log")
                times[f"{d} {kind} base"] = time.time() - t0
        for label, (pattern, base, extra) in rows_spec.items():
            config, run_dir = CONFIGS / pattern.format(d=d), out / f"{d}_{slug(label)}"
            if not args.skip_train:
                t0 = time.time()
                train(args, config, str(run_dir), args.finetune_iters, out / f"{d}_{slug(label)}.train.log",
                      weights=str(base_dirs[base] / "model_final.pth"), extra=extra)
                times[f"{d} {label.split()[0]} fine-tuning"] = time.time() - t0
            t0 = time.time()
            res = evaluate(args, config, str(run_dir), args.finetune_iters, extra)
            times[f"{d} {label.split()[0]} eval"] = time.time() - t0
            rows.append((d, label, res))
            print(d, label, json.dumps(res), flush=True)
    times["total"] = time.time() - t_all
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": times}, indent=1))
    md = table(rows, args, times)
    (out / "results.md").write_text(md + "\n")
    print(md)
    if args.update_benchmarks:
        update_section("bench_delse_corrections", md, out / "results.md")


if __name__ == "__main__":
    main()
