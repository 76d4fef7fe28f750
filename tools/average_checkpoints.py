#!/usr/bin/env python
"""Average the weights of several checkpoints of one training run into one model file (checkpoint averaging).

Late in a schedule the weights still move from checkpoint to checkpoint, and so does accuracy: the DELSE R-50
annotator's zero-shot mIoU@4 on COCO-MVal read 83.0, 84.2 and 83.0 at iterations 1400, 1600 and 1800 of one
run. Averaging the last few checkpoints gives one model without choosing a checkpoint on the evaluation set;
whether it beats the last checkpoint depends on the schedule (BENCHMARKS.md section 6, session 19: +1.0 mIoU@4
averaging iterations 1400 / 1600 / 1800, one before the LR drop and two after; -0.5 averaging 2200 / 2400 / 2600
of a restarted schedule, two before its drop), so no recipe of this project uses it by default.

    O=output/delse_R_50_coco128
    .venv/bin/python tools/average_checkpoints.py $O/model_0001399.pth $O/model_0001599.pth $O/model_0001799.pth \\
        --output $O/model_avg.pth
    .venv/bin/python tools/average_checkpoints.py --last 3 $O --output $O/model_avg.pth      # the same

The result loads as ``MODEL.WEIGHTS`` (train_net.py --eval-only, delse-serve, DefaultPredictor). Floating-point
tensors are averaged; see ``levelset_d2.checkpoint.average_checkpoints`` for BatchNorm statistics.
"""
import argparse
import sys
from pathlib import Path

from levelset_d2.checkpoint import UnsafeCheckpointError, average_checkpoints, save_weights


def last_checkpoints(folder, n):
    """The ``n`` highest-iteration ``model_XXXXXXX.pth`` of a training output folder, oldest first."""
    found = sorted(Path(folder).glob("model_[0-9]*.pth"))
    if len(found) < n:
        raise SystemExit(f"error: {folder} has {len(found)} numbered checkpoints (model_XXXXXXX.pth), --last {n} needs {n}")
    return [str(p) for p in found[-n:]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint files, or with --last one training output folder")
    ap.add_argument("--last", type=int, default=0, metavar="N",
                    help="average the N latest model_XXXXXXX.pth of the folder given (model_final.pth is not counted)")
    ap.add_argument("--output", required=True, help="the averaged model file to write")
    args = ap.parse_args(argv)
    if args.last:
        if len(args.checkpoints) != 1:
            ap.error("--last N takes one training output folder")
        paths = last_checkpoints(args.checkpoints[0], args.last)
    else:
        paths = args.checkpoints
    try:
        weights = average_checkpoints(paths)
    except (ValueError, OSError, UnsafeCheckpointError) as e:
        raise SystemExit(f"error: {e}")
    save_weights(weights, args.output, averaged_from=[str(p) for p in paths])
    print(f"averaged {len(paths)} checkpoints -> {args.output}: " + ", ".join(paths))


if __name__ == "__main__":
    sys.exit(main())
