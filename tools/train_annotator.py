#!/usr/bin/env python
"""A ready annotator: train DELSE on real photos and print the `delse-serve` line that serves it in Label Studio.

By default the ImageNet R-50 DELSE of `configs/DELSE/delse_R_50_coco128_annotator.yaml` (`make pretrained` first)
on coco128-seg's instances; with --json / --image-root, on your own COCO-json instance annotations instead
(every non-crowd object is a training sample; categories are ignored: DELSE segments whatever the clicks
mark). Each stage is a train_net.py run (resumable with --resume, multi-GPU with --num-gpus):

1. the config's schedule (the annotator config: 1800 iterations, bfloat16 on the CPU, a moving average of
   the weights);
2. --restart-iters N (default 800), N more iterations from stage 1's weights (the trained ones, not their average)
   with the learning rate back at BASE_LR and its step at 4/5 of N: a warm restart, into OUTPUT/restart. With
   N = 800 this is BENCHMARKS.md section 6's recipe (mIoU 84-85 from the 4 extreme points on COCO-MVal,
   zero-shot); where SEED is set, the restart runs with SEED + 2, as the benchmarked runs did;
3. --interactive-iters N (default 200), N iterations of interactive fine-tuning from the weights served so far, on
   the same data, into OUTPUT/interactive: U{0..3} simulated drags per sample through the motion-editing
   block, which the earlier stages leave untrained (without it a preview is the full pass). Unlike
   configs/DELSE/delse_R_50_coco128_interactive.yaml (the paper's way: the whole network fine-tunes, which
   cost 1.3 mIoU from the extreme points in BENCHMARKS.md section 7d, ~13 s per iteration), the block alone
   trains (MODEL.DELSE.TRAIN_EDITING_ONLY): the prediction from the extreme points stays the served model's,
   ~2 s per iteration on 2 CPU cores. 200 iterations: drags +0.26 IoU at the first correction (paired, 800
   COCO-MVal objects), NoC@90 8.62 -> 7.93, a 35 ms preview (BENCHMARKS.md section 7e).

0 skips a stage.

At the end the command prints how to serve the model, with each drag enforced on the contour
(MODEL.DELSE.DRAG_EDIT "result", BENCHMARKS.md section 7b). Where a stage keeps a moving average of the
weights (SOLVER.EMA.ENABLED), the line serves it (model_final_ema.pth), and the interactive stage starts from it
(the interactive stage keeps none: its few hundred iterations are too few for one).

    .venv/bin/python tools/train_annotator.py                                   # the benchmarked annotator
    .venv/bin/python tools/train_annotator.py --num-gpus 8                      # the same on 8 GPUs
    .venv/bin/python tools/train_annotator.py --json my/train.json --image-root my/images \\
        --output-dir output/my_annotator                                        # your photos

Time on 2 CPU cores with bfloat16 dot products (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo): 1.67 s per
iteration, ~50 min for stage 1, ~22 min for the restart and ~7 min for the interactive stage; minutes on a GPU.
The quicker model of `--config-file configs/DELSE/delse_R_50_coco128.yaml --restart-iters 0` (400 iterations on
84 photos, float32, ~35 min) reads 78.0 mIoU from the extreme points.
"""
import argparse
import multiprocessing
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs/DELSE/delse_R_50_coco128_annotator.yaml"
DATASET = "annotator_train"  # the name a --json is registered under


def register(json_file, image_root):
    """Register the user's COCO json as DATASET (in every process of a multi-GPU run)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if DATASET not in DatasetCatalog.list():
        register_coco_instances(DATASET, {}, str(json_file), str(image_root))


def serve_command(config_file, weights, opts=()):
    """The `delse-serve` line for a trained model (what the README's Label Studio section runs)."""
    return shlex.join(["delse-serve", "--config-file", str(config_file), "--weights", str(weights), "--port", "9090",
                       *map(str, opts), "MODEL.DELSE.DRAG_EDIT", "result"])


def run_config(config_file, opts=()):
    """The config of a train_net.py run of ``config_file`` with the overrides ``opts``."""
    from levelset_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def trained_weights(config_file, opts=(), average=True):
    """The weights a run of ``config_file`` with ``opts`` leaves in its OUTPUT_DIR: the moving average of the
    weights (``model_final_ema.pth``) where ``average`` and the run's SOLVER.EMA.ENABLED are on, else
    ``model_final.pth`` (the trained weights)."""
    from levelset_d2.ema import EMA_WEIGHTS_FILE

    cfg = run_config(config_file, opts)
    return Path(cfg.OUTPUT_DIR) / (EMA_WEIGHTS_FILE if average and cfg.SOLVER.EMA.ENABLED else "model_final.pth")


def _schedule(iters):
    """SOLVER overrides of a stage of ``iters`` iterations, the learning rate's step at 4/5 of them."""
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({max(1, iters * 4 // 5)},)"]


def restart_opts(weights, iters, seed):
    """Overrides of the warm restart: ``iters`` more iterations from ``weights`` in the joint phase, the
    learning rate back at BASE_LR (with its warm-up) and its step at 4/5; SEED + 2 where ``seed`` is set
    (>= 0), as BENCHMARKS.md section 6's runs (seeds 7 / 8 / 9, restarts 9 / 10 / 11)."""
    return ["MODEL.WEIGHTS", str(weights), "MODEL.DELSE.PHASE", "joint", "MODEL.DELSE.PRETRAIN_ITERS", "0",
            *_schedule(iters), "SEED", str(seed + 2 if seed >= 0 else seed)]


def interactive_opts(base_weights, iters):
    """Overrides of the interactive stage (delse_R_50_coco128_interactive.yaml's recipe on any config):
    joint training from the base weights with U{0..3} simulated drags through the motion-editing block,
    without a moving average of the weights, and (unlike that config, which fine-tunes the whole network as
    the paper does) with MODEL.DELSE.TRAIN_EDITING_ONLY: the block alone learns, so the prediction from the
    extreme points stays the base model's and an iteration costs ~2 s instead of ~13 s on 2 CPU cores."""
    return ["MODEL.WEIGHTS", str(base_weights), "MODEL.DELSE.PHASE", "joint", "MODEL.DELSE.PRETRAIN_ITERS", "0",
            "MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_SAMPLING", "uniform",
            "MODEL.DELSE.CORRECTION_MODE", "motion_editing", "MODEL.DELSE.TEST_NUM_CORRECTIONS", "3",
            *_schedule(iters), "SOLVER.WARMUP_ITERS", str(min(10, iters)),
            # no moving average: after 200 iterations a 0.995 average would still be 37 % the untrained block
            "SOLVER.EMA.ENABLED", "False", "MODEL.DELSE.TRAIN_EDITING_ONLY", "True"]


def _worker(args, json_file, image_root):
    import delse  # noqa: F401  (registration)
    from levelset_d2.engine import main

    if json_file:
        register(json_file, image_root)
    return main(args)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    ap.add_argument("--json", help="your COCO-json instance annotations (default: the config's DATASETS.TRAIN)")
    ap.add_argument("--image-root", help="the folder the json's file_names are relative to")
    ap.add_argument("--output-dir", default=str(REPO / "output/annotator"))
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--restart-iters", type=int, default=800,
                    help="iterations of the warm restart from the first stage's weights, into OUTPUT/restart "
                         "(0: none; default %(default)s, the benchmarked recipe)")
    ap.add_argument("--interactive-iters", type=int, default=200,
                    help="iterations of the interactive fine-tuning, into OUTPUT/interactive (0: none; default %(default)s)")
    ap.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if bool(args.json) != bool(args.image_root):
        ap.error("--json and --image-root go together")
    if args.json and not Path(args.json).is_file():
        ap.error(f"--json {args.json}: no such file")
    if args.image_root and not Path(args.image_root).is_dir():
        ap.error(f"--image-root {args.image_root}: no such folder")

    from detectron2.engine import default_argument_parser, launch

    data = ["DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()"] if args.json else []  # the user's objects
    stages = [["OUTPUT_DIR", args.output_dir, *args.opts, *data]]
    if args.restart_iters > 0:
        seed = run_config(args.config_file, stages[0]).SEED
        stages.append(["OUTPUT_DIR", str(Path(args.output_dir) / "restart"), *args.opts, *data,
                       *restart_opts(trained_weights(args.config_file, stages[0], average=False), args.restart_iters,
                                     seed)])
    if args.interactive_iters > 0:
        stages.append(["OUTPUT_DIR", str(Path(args.output_dir) / "interactive"), *args.opts, *data,
                       *interactive_opts(trained_weights(args.config_file, stages[-1]), args.interactive_iters)])
    # Each stage in a process of its own: Detectron2's loggers keep the handlers a stage's default_setup adds
    # (its log.txt, the console) for the life of a process, so in one process every later stage would be
    # logged once more to the console and into the earlier stages' log.txt.
    spawn = multiprocessing.get_context("spawn")
    for number, opts in enumerate(stages, 1):
        train_args = default_argument_parser().parse_args(
            ["--config-file", args.config_file, "--num-gpus", str(args.num_gpus),
             *(["--resume"] if args.resume else []), *map(str, opts)])
        stage = spawn.Process(target=launch, args=(_worker, args.num_gpus),
                              kwargs={"dist_url": train_args.dist_url,
                                      "args": (train_args, args.json and str(Path(args.json).resolve()),
                                               args.image_root and str(Path(args.image_root).resolve()))})
        stage.start()
        stage.join()
        if stage.exitcode != 0:
            print(f"train_annotator: stage {number} of {len(stages)} ({opts[1]}) failed (exit code {stage.exitcode}); "
                  "fix the cause and run the same command with --resume", file=sys.stderr)
            return 1
    weights = trained_weights(args.config_file, stages[-1])
    print("\nThe annotator is trained. Serve it to Label Studio (README, 'DELSE in Label Studio'):\n")
    print("  " + serve_command(args.config_file, weights, args.opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
