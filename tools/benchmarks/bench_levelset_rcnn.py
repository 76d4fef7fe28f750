"""The real-data benchmark: Mask R-CNN vs LevelSet R-CNN, from scratch, on DSB2018 nuclei.

Both models share the backbone (R-18-FPN with GroupNorm), schedule, seed, image size and budget
(configs/LevelSetRCNN/{mask_rcnn,levelset_rcnn}_R_18_FPN_GN_dsb2018.yaml). Each is trained on the
train split with train_net.py, then evaluated on the dev split: mask AP / AP50 / AP75, AF1, AF2,
Boundary AP, plus LevelSet R-CNN's initial phi_0 as a third row (like the paper's Table 2).

    .venv/bin/python tools/benchmarks/bench_levelset_rcnn.py --parallel             # about an hour on 2 CPU cores (600 iterations)
    .venv/bin/python tools/benchmarks/bench_levelset_rcnn.py --iters 20000 --num-gpus 8 --size 512   # a GPU budget
    .venv/bin/python tools/benchmarks/bench_levelset_rcnn.py --models "TSDF head alone"   # + the ablation row (~35 min)
    .venv/bin/python tools/benchmarks/bench_levelset_rcnn.py --parallel --models "LevelSet R-CNN + image crop" \
        "LevelSet R-CNN + image crop, shared convs"   # IMAGE_FEATURES "raw", two features heads (~1-1.3 h)

Rows of models not trained in a run come from their earlier evaluation in the same output folder
(eval*.json newer than the model), so the ablation can be added to a finished table.

With --parallel (CPU) both trainings run at once, one thread each; each model's evaluations start
as soon as its own training ends, and LevelSet R-CNN's two (phi_N, phi_0) run side by side.

With --resume each training continues from the last checkpoint in its output folder (train_net.py
--resume: weights, optimiser, schedule and iteration), and checkpoints come every 100 iterations, so
a run longer than a session is rerun with the same command until it ends:

    .venv/bin/python tools/benchmarks/bench_levelset_rcnn.py --suite coco128 --iters 1500 --parallel --resume \
        --output-dir output/coco128_1500 --models "Mask R-CNN" "LevelSet R-CNN"

Writes the table to output/bench_dsb2018/results.md and, with --update-benchmarks, into
BENCHMARKS.md between the markers of its section.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _benchmarks import update_section

REPO = Path(__file__).resolve().parents[2]
LS = REPO / "configs/LevelSetRCNN"
# --suite: the models of each benchmark (rows by name; the first two are the default --models).
SUITES = {
    # DSB2018 nuclei from scratch, R-18-FPN with GroupNorm (BENCHMARKS.md, nuclei section).
    "dsb2018": {
        "Mask R-CNN": LS / "mask_rcnn_R_18_FPN_GN_dsb2018.yaml",
        "LevelSet R-CNN": LS / "levelset_rcnn_R_18_FPN_GN_dsb2018.yaml",
        # Optional (--models): LevelSet R-CNN's TSDF head alone, with the TSDF loss weight phi_0 gets there.
        "TSDF head alone": LS / "ablation_tsdf_mask_rcnn_R_18_FPN_GN_dsb2018.yaml",
        # Optional (--models), not in the paper: the RoI's image crop as 3 more Chan-Vese channels.
        "LevelSet R-CNN + image crop": LS / "levelset_rcnn_image_R_18_FPN_GN_dsb2018.yaml",
        # Variants of it: the features head with one conv of its own (session 6's image model, the
        # paper-feature model's head), unclipped, and reading the TSDF head's convs (FEATURES_INPUT).
        "LevelSet R-CNN + image crop, features conv": LS / "levelset_rcnn_image_R_18_FPN_GN_dsb2018.yaml",
        "LevelSet R-CNN + image crop, features conv, no clipping": LS / "levelset_rcnn_image_R_18_FPN_GN_dsb2018.yaml",
        "LevelSet R-CNN + image crop, shared convs": LS / "levelset_rcnn_image_R_18_FPN_GN_dsb2018.yaml",
    },
    # coco128-seg from ImageNet R-50-FPN (`make pretrained`), class-agnostic; evaluated on its dev
    # split and on the 10-image COCO val2017 sample (the configs' DATASETS.TEST).
    "coco128": {
        "Mask R-CNN": LS / "mask_rcnn_R_50_FPN_coco128.yaml",
        "LevelSet R-CNN": LS / "levelset_rcnn_R_50_FPN_coco128.yaml",
        "LevelSet R-CNN + image crop": LS / "levelset_rcnn_image_R_50_FPN_coco128.yaml",
        # Issue #21 item 4: the paper's feature path with F standardised (learned floored gain), and
        # with F also read from p2 pooled at 28 x 28 (MODEL.LEVELSET.STANDARDIZE_FEATURES and
        # FEATURES_POOLER_RESOLUTION; config.py says why).
        "LevelSet R-CNN, standardised F": LS / "levelset_rcnn_std_R_50_FPN_coco128.yaml",
        "LevelSet R-CNN, standardised F from p2 at 28": LS / "levelset_rcnn_std_fine_R_50_FPN_coco128.yaml",
    },
    # DSB2018 nuclei from ImageNet R-50-FPN (`make pretrained`), Detectron2's R-50 recipe at a CPU budget.
    "dsb2018_r50": {
        "Mask R-CNN": LS / "mask_rcnn_R_50_FPN_dsb2018.yaml",
        "LevelSet R-CNN": LS / "levelset_rcnn_R_50_FPN_dsb2018.yaml",
        # Optional (--models), not in the paper: the RoI's image crop as 3 more Chan-Vese channels.
        "LevelSet R-CNN + image crop": LS / "levelset_rcnn_image_R_50_FPN_dsb2018.yaml",
    },
}
CONFIGS = {}  # the chosen suite's (main() sets it)
# Overrides of a model beside its config file (and the run's own).
FEATURES_CONV = ("MODEL.LEVELSET.FEATURES_NUM_CONV", "1")
MODEL_OPTS = {
    "LevelSet R-CNN + image crop, features conv": FEATURES_CONV,
    "LevelSet R-CNN + image crop, features conv, no clipping": (*FEATURES_CONV, "SOLVER.CLIP_GRADIENTS.ENABLED", "False"),
    "LevelSet R-CNN + image crop, shared convs": ("MODEL.LEVELSET.FEATURES_INPUT", "tsdf_convs"),
}
DEFAULT_MODELS = ["Mask R-CNN", "LevelSet R-CNN"]


def with_phi0(name):
    """Models whose phi_0 is evaluated too (a paired row: the same weights, INFERENCE_TSDF initial)."""
    return name.startswith("LevelSet R-CNN")


def table_rows():
    rows = ["Mask R-CNN", "LevelSet R-CNN", "LevelSet R-CNN, initial φ0", "TSDF head alone"]
    return rows + [row for name in CONFIGS if with_phi0(name) and name != "LevelSet R-CNN"
                   for row in (name, f"{name}, initial φ0")]


def evaluations(name):
    """(table row, config overrides) of each evaluation of a model: its phi_N, then (LevelSet R-CNN) its phi_0."""
    if with_phi0(name):
        return [(name, ()), (f"{name}, initial φ0", ("MODEL.LEVELSET.INFERENCE_TSDF", "initial"))]
    return [(name, ())]


def start(cmd, log_path, threads=None, append=False):
    """Start a command with its output going to a log file (appended to with ``append``)."""
    print("$", " ".join(str(c) for c in cmd), f"{'>>' if append else '>'} {log_path}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen([str(c) for c in cmd], stdout=open(log_path, "a" if append else "w"),
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def wait(procs):
    """Wait for (proc, log_path) pairs, echoing training progress; fail loudly if one fails."""
    while any(p.poll() is None for p, _ in procs):
        time.sleep(60)
        for _, log in procs:
            # Detectron2's progress: the trainer's "eta: ... iter: N", the evaluator's "Inference done i/n ... ETA=".
            lines = [l for l in Path(log).read_text().splitlines() if " eta: " in l or "Inference done" in l]
            if lines:
                last = lines[-1]
                start = last.index("eta:") if " eta: " in last else last.index("Inference done")
                print(Path(log).parent.name + "/" + Path(log).name, last[start:][:60],
                      last[last.index("ETA="):] if "ETA=" in last else "", flush=True)
    for p, log in procs:
        if p.returncode != 0:
            raise SystemExit(f"command failed ({p.returncode}); see {log}")


def run(cmd, log_path, threads=None, append=False):
    wait([(start(cmd, log_path, threads, append), log_path)])


def in_parallel(*jobs):
    """Run callables in threads (each starts and waits for its own subprocesses); return their results."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def train_opts(args, out_dir):
    opts = ["OUTPUT_DIR", out_dir, "SEED", args.seed, "SOLVER.MAX_ITER", args.iters,
            "SOLVER.STEPS", f"({int(args.iters * 0.8)},)",
            "SOLVER.CHECKPOINT_PERIOD", min(args.iters, 100) if args.resume else args.iters,
            "TEST.EVAL_PERIOD", 0]
    if args.size:
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MIN_SIZE_TEST", args.size]
    if args.batch:
        opts += ["SOLVER.IMS_PER_BATCH", args.batch]
    return [str(o) for o in opts + list(args.opts)]


def _eval_file(out_dir, extra=()):
    """Where the evaluation of out_dir/model_final.pth with config overrides `extra` is saved."""
    return Path(out_dir) / f"eval{'_'.join(extra[1::2])}.json"


def _reusable(out_dir, extra=()):
    """The saved evaluation of out_dir/model_final.pth (with config overrides `extra`), if newer than it."""
    res_file = _eval_file(out_dir, extra)
    model_file = Path(out_dir) / "model_final.pth"
    if res_file.exists() and model_file.exists() and res_file.stat().st_mtime > model_file.stat().st_mtime:
        return res_file
    return None


def evaluate(args, name, out_dir, extra=(), threads=None):
    """--eval-only on the config's test sets; returns {dataset: {'segm': {...}, 'boundary': {...}}}.

    A result saved after the model was written is reused (a rerun after an interruption, or with
    --skip-train, does not redo finished evaluations)."""
    res_file = _reusable(out_dir, extra)
    if res_file:
        print(f"reusing {res_file} (newer than the model)", flush=True)
        return json.loads(res_file.read_text())
    res_file = _eval_file(out_dir, extra)
    cmd = [sys.executable, "train_net.py", "--config-file", CONFIGS[name], "--eval-only",
           "--num-gpus", args.num_gpus, *train_opts(args, out_dir),
           *MODEL_OPTS.get(name, ()), "MODEL.WEIGHTS", Path(out_dir) / "model_final.pth", *extra]
    run(cmd, Path(out_dir) / f"eval{len(extra)}.log", threads)
    # Detectron2 logs "Evaluation results for <dataset> in csv format:", then per task
    # "copypaste: Task: segm" and the metric names and values.
    text = (Path(out_dir) / f"eval{len(extra)}.log").read_text()
    results = {}
    for dataset, chunk in re.findall(r"Evaluation results for (\S+) in csv format:\n(.*?)(?=Evaluation results for|\Z)",
                                     text, flags=re.S):
        for task, keys, values in re.findall(r"copypaste: Task: (\w+)\n.*copypaste: ([\w,]+)\n.*copypaste: ([\d.,nan-]+)",
                                             chunk):
            results.setdefault(dataset, {})[task] = dict(zip(keys.split(","), (float(v) for v in values.split(","))))
    res_file.write_text(json.dumps(results, indent=1))
    return results


CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")


def split_models_and_opts(models, opts):
    """argparse gives ``--models A B KEY VALUE ...`` all to --models (nargs="+"): split the names from the config
    overrides at the first config key (``MODEL.X``), which go before the trailing ``opts``. A ``--`` separator
    is dropped."""
    start = next((i for i, m in enumerate(models) if CONFIG_KEY.fullmatch(m)), len(models))
    return models[:start], [*models[start:], *(o for o in opts if o != "--")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="dsb2018", help="which benchmark (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--size", type=int, default=0, help="short side of training/test images (default: the config's)")
    ap.add_argument("--batch", type=int, default=0, help="images per batch (default: the config's 2)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--output-dir", help="default: output/bench_<suite>")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="models to train and evaluate in this run (default: %(default)s); config overrides "
                         "may follow them directly")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing model_final.pth files")
    ap.add_argument("--resume", action="store_true",
                    help="continue each training from its last checkpoint (checkpoints every 100 iterations; "
                         "the training log is appended to)")
    ap.add_argument("--parallel", action="store_true", help="train both models at once, one thread each (CPU)")
    ap.add_argument("--update-benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every run (KEY VALUE ...)")
    args = ap.parse_args()
    args.models, args.opts = split_models_and_opts(args.models, args.opts)
    CONFIGS.update(SUITES[args.suite])
    if not args.models:
        ap.error("--models needs at least one model name before the config overrides")
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        ap.error(f"--models {unknown} are not in suite {args.suite!r}: {list(CONFIGS)}")
    args.output_dir = args.output_dir or str(REPO / f"output/bench_{args.suite}")
    os.makedirs(args.output_dir, exist_ok=True)

    slug = lambda name: re.sub(r"[^\w-]+", "_", name)  # "LevelSet R-CNN" -> LevelSet_R-CNN, as before
    out_dirs = {name: os.path.join(args.output_dir, slug(name).lower()) for name in CONFIGS}
    logs = {name: Path(args.output_dir) / f"{slug(name)}.train.log" for name in CONFIGS}
    threads = 1 if args.parallel else None
    times, results = {}, {}

    def train(name):
        # DATASETS.TEST () : no evaluation at the end of training; evaluate() does it below.
        cmd = [sys.executable, "train_net.py", "--config-file", CONFIGS[name], "--num-gpus", args.num_gpus,
               *(["--resume"] if args.resume else []),
               *train_opts(args, out_dirs[name]), *MODEL_OPTS.get(name, ()), "DATASETS.TEST", "()"]
        t0 = time.time()
        run(cmd, logs[name], threads, append=args.resume)
        times[name] = time.time() - t0

    def evaluate_all(name, reuse_only=False):
        out_dir = out_dirs[name]
        if not (Path(out_dir) / "model_final.pth").exists():
            print(f"{name}: no {out_dir}/model_final.pth yet; row left out", flush=True)
            return
        evals = evaluations(name)
        if reuse_only:
            for row, extra in evals:
                res_file = _reusable(out_dir, extra)
                if res_file:
                    results[row] = json.loads(res_file.read_text())
            return
        jobs = [lambda e=extra: evaluate(args, name, out_dir, e, threads) for _, extra in evals]
        outs = in_parallel(*jobs) if args.parallel else [job() for job in jobs]
        results.update(zip((row for row, _ in evals), outs))

    def pipeline(name):
        if not args.skip_train:
            train(name)
        evaluate_all(name)

    t_start = time.time()
    if args.parallel and len(args.models) > 1:  # on 2 cores, two one-thread jobs at once beat two-thread jobs in turn
        in_parallel(*[lambda n=n: pipeline(n) for n in args.models])
    else:
        for name in args.models:
            pipeline(name)
    total = time.time() - t_start
    for name in CONFIGS:  # earlier rows of the other models (reused evaluations, never new ones)
        if name not in args.models and (Path(out_dirs[name]) / "model_final.pth").exists():
            evaluate_all(name, reuse_only=True)
    for name in CONFIGS:  # training times not measured in this run: from the logs Detectron2 wrote
        if name not in times:
            found = re.findall(r"Total training time: (\d+):(\d+):(\d+)", logs[name].read_text()) if logs[name].exists() else []
            if found:
                h, m, sec = map(int, found[-1])
                times[name] = 3600 * h + 60 * m + sec
    rows = [(name, results[name]) for name in table_rows() if name in results]
    datasets = list(dict.fromkeys(d for _, r in rows for d in r))

    lines = []
    for dataset in datasets:
        if len(datasets) > 1:
            lines += [f"{dataset}:", ""]
        lines += ["| model | mask AP | AP50 | AP75 | AF1 | AF2 | Boundary AP | box AP |", "|---|---|---|---|---|---|---|---|"]
        for name, r in rows:
            r = r.get(dataset, {})
            s, b, bb = r.get("segm", {}), r.get("boundary", {}), r.get("bbox", {})
            f = lambda d, k: f"{d[k]:.1f}" if k in d else "–"
            lines.append(f"| {name} | {f(s, 'AP')} | {f(s, 'AP50')} | {f(s, 'AP75')} | {f(b, 'AF1')} | {f(b, 'AF2')} "
                         f"| {f(b, 'BoundaryAP')} | {f(bb, 'AP')} |")
        lines.append("")
    cmd = "tools/benchmarks/bench_levelset_rcnn.py " + shlex.join(a for a in sys.argv[1:] if a != "--update-benchmarks")
    train_times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
    size = f"short side {args.size} px" if args.size else "the configs' image sizes"
    table = "\n".join([f"Command: `.venv/bin/python {cmd.strip()}`  ",
                       f"Budget: {args.iters} iterations, batch {args.batch or 2}, {size}, "
                       f"seed {args.seed}. Training wall time: {train_times or 'n/a (--skip-train)'}; "
                       f"wall time of this run ({' + '.join(args.models)}{', evaluations only' if args.skip_train else ''}): "
                       f"{total / 60:.1f} min.",
                       "", *lines])
    (Path(args.output_dir) / "results.md").write_text(table + "\n")
    print(table)
    if args.update_benchmarks:
        update_section(f"bench_{args.suite}", table, Path(args.output_dir) / "results.md")


if __name__ == "__main__":
    main()
