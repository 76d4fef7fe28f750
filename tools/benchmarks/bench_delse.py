"""Real-data DELSE benchmark: DELSE vs the pixel-wise (DEXTR-style) baseline on DSB2018 nuclei or
on the 10-image COCO val2017 sample.

Both models share the encoder (R-18 with GroupNorm, from scratch), skip features, PSP branches,
128 px crops of the box + 10 px, extreme-point heatmap, seed, schedule and budget
(configs/DELSE/{delse,pixel_wise}_R_18_dsb2018.yaml); they differ only in the head: DELSE
predicts phi_0, V and m and evolves phi (eq. 9); the baseline predicts a sigmoid mask trained
with class-balanced BCE. Each is trained on the dsb2018_train instances with train_net.py, then
evaluated here on dsb2018_dev instances (all, or an evenly spaced subset with
--eval-instances): mIoU, boundary F at 1 and 2 px, IoU after 0, 1 and 2 simulated drags (for
the baseline a drag is an extra click, as in DEXTR), and the mIoU at the mask threshold searched
on the same instances (the paper's protocol; optimistic). --noise adds rows evaluated with
noisy clicks (Table 7: each click moved by U[-n, n] x the box side).

--dataset coco_sample: the same comparison on real photos (configs/DELSE/{delse,pixel_wise}_R_18_
coco_sample.yaml), by 2-fold cross-validation over the sample's images (train on 5 images, test on
the other 5, swap; the scores of both held-out halves are pooled), since the sample is all there is.

    .venv/bin/python tools/benchmarks/bench_delse.py                       # the configs' budget (3000 iters)
    .venv/bin/python tools/benchmarks/bench_delse.py --iters 300 --eval-instances 300 --noise 0.05 0.1
    .venv/bin/python tools/benchmarks/bench_delse.py --dataset coco_sample --iters 500

Writes the table to output/bench_delse[_coco_sample]/results.md and, with --update-benchmarks, into
BENCHMARKS.md between the markers of its section (bench_delse / bench_delse_coco_sample).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from _benchmarks import run_train_net, update_section

REPO = Path(__file__).resolve().parents[2]
DATASETS = {  # --dataset -> (the two configs, [(train dataset, test dataset)] or None: the configs')
    "dsb2018": ({"DELSE": REPO / "configs/DELSE/delse_R_18_dsb2018.yaml",
                 "Pixel-wise (DEXTR-style)": REPO / "configs/DELSE/pixel_wise_R_18_dsb2018.yaml"}, None),
    "coco_sample": ({"DELSE": REPO / "configs/DELSE/delse_R_18_coco_sample.yaml",
                     "Pixel-wise (DEXTR-style)": REPO / "configs/DELSE/pixel_wise_R_18_coco_sample.yaml"},
                    [(f"coco_sample_val2017_fold{k}_train", f"coco_sample_val2017_fold{k}_test") for k in (0, 1)]),
}
CONFIGS = DATASETS["dsb2018"][0]  # set by main() from --dataset


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def load_cfg(name, opts):
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(CONFIGS[name]))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def train_opts(args, name, out_dir):
    """Overrides shared by both runs; the pre-training share of DELSE's schedule is kept."""
    cfg = load_cfg(name, [])
    share = cfg.MODEL.DELSE.PRETRAIN_ITERS / cfg.SOLVER.MAX_ITER
    opts = ["OUTPUT_DIR", out_dir, "SEED", args.seed, "SOLVER.MAX_ITER", args.iters,
            "SOLVER.STEPS", f"({int(args.iters * 0.8)},)", "SOLVER.CHECKPOINT_PERIOD", args.iters,
            "MODEL.DELSE.PRETRAIN_ITERS", max(1, round(args.iters * share)), "TEST.EVAL_PERIOD", 0,
            "MODEL.DEVICE", "cpu"]
    return [str(o) for o in opts + list(args.opts)]


def fold_opts(fold):
    """Config overrides selecting a (train, test) dataset pair; none for the configs' own."""
    if fold is None:
        return []
    return ["DATASETS.TRAIN", f"('{fold[0]}',)", "DATASETS.TEST", f"('{fold[1]}',)"]


def train(args, name, out_dir, log_path, fold=None):
    run_train_net(CONFIGS[name], [*train_opts(args, name, out_dir), *fold_opts(fold)], log_path, args.threads)


def evaluate(args, name, out_dir, noise=0.0, fold=None):
    """Per-instance scores of model_final.pth on the (subset of the) test instances.

    Returns:
        (records, evaluator, seconds): the DELSEEvaluator's per-instance records, the evaluator
        (its tolerances and threshold grids summarise them) and the wall time.
    """
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_cfg(name, train_opts(args, name, out_dir) + fold_opts(fold) + ["INPUT.DELSE.EXTREME_POINT_NOISE", noise])
    t0 = time.time()
    from delse.evaluation import score_instances

    records, evaluator = score_instances(cfg, Path(out_dir) / "model_final.pth", args.eval_instances)
    return records, evaluator, time.time() - t0


def summarize(records, evaluator, pixel_wise):
    """The evaluator's summary of pooled per-instance records (+ the instance count and whether the
    searched threshold sits at the edge of its grid)."""
    res = dict(evaluator.summarize(records, evaluator.tolerances, evaluator.thresholds))
    res["num_instances"] = len(records)
    if "best_threshold" in res:
        grid = evaluator.thresholds["prob" if pixel_wise else "phi"]
        res["threshold_at_grid_edge"] = res["best_threshold"] in (min(grid), max(grid))
    return res


def main():
    global CONFIGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="dsb2018")
    ap.add_argument("--iters", type=int, default=3000, help="training iterations of each model (each fold)")
    ap.add_argument("--eval-instances", type=int, default=0,
                    help="evaluate an evenly spaced subset of this many test instances (0: all)")
    ap.add_argument("--noise", type=float, nargs="*", default=[],
                    help="also evaluate with clicks moved by U[-n, n] x the box side (e.g. 0.05 0.1)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    ap.add_argument("--output-dir", default="", help="default: output/bench_delse[_coco_sample]")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing model_final.pth files")
    ap.add_argument("--update-benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every run (KEY VALUE ...)")
    args = ap.parse_args()
    CONFIGS, folds = DATASETS[args.dataset]
    suffix = "" if args.dataset == "dsb2018" else f"_{args.dataset}"
    args.output_dir = args.output_dir or str(REPO / f"output/bench_delse{suffix}")
    os.makedirs(args.output_dir, exist_ok=True)

    rows, times = [], {}
    for name in CONFIGS:
        pooled = {}  # noise -> per-instance records of every fold
        for k, fold in enumerate(folds or [None]):
            tag = slug(name) + (f"_fold{k}" if fold else "")
            out_dir = os.path.join(args.output_dir, tag)
            if not args.skip_train:
                t0 = time.time()
                train(args, name, out_dir, Path(args.output_dir) / f"{tag}.train.log", fold)
                times[f"train {name}" + (f" fold {k}" if fold else "")] = time.time() - t0
            for noise in [0.0] + list(args.noise):
                records, evaluator, sec = evaluate(args, name, out_dir, noise, fold)
                pooled.setdefault(noise, []).extend(records)
                label = name if noise == 0 else f"{name}, clicks ±{100 * noise:g}%"
                times[f"eval {label}"] = times.get(f"eval {label}", 0.0) + sec
        for noise, records in pooled.items():
            label = name if noise == 0 else f"{name}, clicks ±{100 * noise:g}%"
            res = summarize(records, evaluator, "Pixel" in name)
            rows.append((label, res))
            print(label, json.dumps(res), flush=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps({"rows": rows, "seconds": times}, indent=1))

    f = lambda r, k: f"{r[k]:.1f}" if k in r else "–"
    lines = ["| model | mIoU | F@1px | F@2px | IoU, 0 drags | 1 drag | 2 drags | mIoU at searched threshold (threshold) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        unit = " px of φ_T" if label.startswith("DELSE") else " on p"
        thr = (f"{r['mIoU@best_threshold']:.1f} ({r['best_threshold']:g}{unit}"
               f"{', edge of the grid' if r.get('threshold_at_grid_edge') else ''})" if "best_threshold" in r else "–")
        lines.append(f"| {label} | {f(r, 'mIoU')} | {f(r, 'F@1px')} | {f(r, 'F@2px')} | {f(r, 'mIoU')} "
                     f"| {f(r, 'mIoU@1drag')} | {f(r, 'mIoU@2drag')} | {thr} |")
    n_eval = rows[0][1]["num_instances"]
    where = ("dsb2018_dev instances" if not folds else
             f"held-out {args.dataset} instances, pooled over {len(folds)} folds by image")
    cmd = "tools/benchmarks/bench_delse.py " + " ".join(a for a in sys.argv[1:] if a != "--update-benchmarks")
    wall = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
    table = "\n".join([
        f"Command: `.venv/bin/python {cmd.strip()}`  ",
        f"Budget: {args.iters} iterations of batch 8 per model{' and fold' if folds else ''} (DELSE: the "
        f"configs' share of them pre-training), seed {args.seed}, {args.threads} torch thread(s); evaluated "
        f"on {n_eval} {where}{' (evenly spaced subset)' if args.eval_instances else ''}.  ",
        f"Wall time: {wall}.", "", *lines])
    (Path(args.output_dir) / "results.md").write_text(table + "\n")
    print(table)
    if args.update_benchmarks:
        update_section(f"bench_delse{suffix}", table, Path(args.output_dir) / "results.md")


if __name__ == "__main__":
    main()
