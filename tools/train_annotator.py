#!/usr/bin/env python
"""A ready annotator: train DELSE on real photos and print the `delse-serve` line that serves it in Label Studio.

By default the ImageNet R-50 DELSE of `configs/DELSE/delse_R_50_coco128.yaml` (`make pretrained` first) on
coco128-seg's instances; with --json / --image-root, on your own COCO-json instance annotations instead
(every non-crowd object is a training sample; categories are ignored: DELSE segments whatever the clicks
mark). The run is train_net.py's (resumable with --resume, multi-GPU with --num-gpus). With
--interactive-iters N, then N iterations of interactive fine-tuning from those weights on the same data (the
recipe of configs/DELSE/delse_R_50_coco128_interactive.yaml: U{0..3} simulated drags per sample through the
motion-editing block, which the first stage leaves untrained: without it a preview is the full pass). Off by
default: 100 such iterations cost 1.3 mIoU from the extreme points (200 COCO-MVal objects, BENCHMARKS.md
section 7d); they buy a 51 ms preview instead of a 257 ms pass and drags that beat extra clicks (+0.4 IoU at the
first correction, signed drag channels). At the end the command prints how to serve the model, with each
drag enforced on the contour (MODEL.DELSE.DRAG_EDIT "result", BENCHMARKS.md section 7b); with the override
SOLVER.EMA.ENABLED True, each stage keeps a moving average of the weights and the next stage and the printed line use
it (model_final_ema.pth).

    .venv/bin/python tools/train_annotator.py --num-gpus 8                       # coco128-seg, the config's budget
    .venv/bin/python tools/train_annotator.py --json my/train.json --image-root my/images \\
        --output-dir output/my_annotator SOLVER.MAX_ITER 3000                    # your photos

The config's budget (400 iterations of batch 8, ~5 s each with 2 threads) takes about 35 min on 2 CPU cores,
minutes on a GPU; interactive iterations take ~13 s each (every simulated drag is one more forward pass). On a
CPU with bfloat16 dot products (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo), the override
`SOLVER.AMP.ENABLED True` trains 1.8x faster (2.8 s per iteration, ~19 min), measured 0.4-0.8 mIoU below float32
(BENCHMARKS.md section 10).
"""
import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs/DELSE/delse_R_50_coco128.yaml"
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


def trained_weights(config_file, opts=()):
    """The weights a run of ``config_file`` with ``opts`` leaves in its OUTPUT_DIR: the moving average of the
    weights (``model_final_ema.pth``) where the run's SOLVER.EMA.ENABLED is on, else ``model_final.pth``."""
    from levelset_d2.config import get_cfg
    from levelset_d2.ema import EMA_WEIGHTS_FILE

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list([str(o) for o in opts])
    return Path(cfg.OUTPUT_DIR) / (EMA_WEIGHTS_FILE if cfg.SOLVER.EMA.ENABLED else "model_final.pth")


def interactive_opts(base_weights, iters):
    """Overrides of the interactive stage (delse_R_50_coco128_interactive.yaml's recipe on any config):
    joint training from the base weights with U{0..3} simulated drags through the motion-editing block."""
    return ["MODEL.WEIGHTS", str(base_weights), "MODEL.DELSE.PHASE", "joint", "MODEL.DELSE.PRETRAIN_ITERS", "0",
            "MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_SAMPLING", "uniform",
            "MODEL.DELSE.CORRECTION_MODE", "motion_editing", "MODEL.DELSE.TEST_NUM_CORRECTIONS", "3",
            "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({max(1, iters * 4 // 5)},)", "SOLVER.WARMUP_ITERS", str(min(10, iters))]


def _worker(args, json_file, image_root):
    import delse  # noqa: F401  (registration)
    from levelset_d2.engine import main

    if json_file:
        register(json_file, image_root)
    return main(args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    ap.add_argument("--json", help="your COCO-json instance annotations (default: the config's DATASETS.TRAIN)")
    ap.add_argument("--image-root", help="the folder the json's file_names are relative to")
    ap.add_argument("--output-dir", default=str(REPO / "output/annotator"))
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--interactive-iters", type=int, default=0,
                    help="iterations of the interactive fine-tuning, into OUTPUT/interactive (0: none; default %(default)s)")
    ap.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
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
    weights = trained_weights(args.config_file, stages[0])
    if args.interactive_iters > 0:
        stages.append(["OUTPUT_DIR", str(Path(args.output_dir) / "interactive"), *args.opts, *data,
                       *interactive_opts(weights, args.interactive_iters)])
    for opts in stages:
        train_args = default_argument_parser().parse_args(
            ["--config-file", args.config_file, "--num-gpus", str(args.num_gpus),
             *(["--resume"] if args.resume else []), *map(str, opts)])
        launch(_worker, args.num_gpus, dist_url=train_args.dist_url,
               args=(train_args, args.json and str(Path(args.json).resolve()),
                     args.image_root and str(Path(args.image_root).resolve())))
    if args.interactive_iters > 0:
        weights = trained_weights(args.config_file, stages[1])
    print("\nThe annotator is trained. Serve it to Label Studio (README, 'DELSE in Label Studio'):\n")
    print("  " + serve_command(args.config_file, weights, args.opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
