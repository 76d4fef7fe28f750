#!/usr/bin/env python
"""How hard each loss pulls on the shared backbone: a diagnostic for "the mask branch's loss starves the detector".

For each model, from its config's starting weights (``MODEL.WEIGHTS``: the ImageNet R-50 of ``make pretrained``
for the R-50 configs) on the same training batches (the first model's loader, one RoI-sampling seed per batch),
the norm of the gradient of each group of losses alone with respect to the trainable backbone parameters (ResNet
stages and FPN), averaged over the batches:

- detector: ``loss_rpn_*``, ``loss_cls``, ``loss_box_reg``;
- mask: every other loss (Mask R-CNN's ``loss_mask``; LevelSet R-CNN's ``loss_tsdf_*``).

Both groups reach the backbone through the same features, and every config clips gradients per parameter
(``SOLVER.CLIP_GRADIENTS``, norm 1): where the mask group's gradient is many times the detector's, the clipped
update follows the mask branch and the detector's share of it shrinks. The ratio answers whether a loss weighting
hands the backbone to the mask branch; it does not say what that costs in AP (that is a training run).

    .venv/bin/python tools/analysis/backbone_gradients.py \\
        --model "Mask R-CNN" configs/LevelSetRCNN/mask_rcnn_R_50_FPN_dsb2018.yaml \\
        --model "LevelSet R-CNN" configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_dsb2018.yaml \\
        --model "LevelSet R-CNN, nuclei weights 1 / 5" configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_dsb2018.yaml \\
            MODEL.LEVELSET.LOSS_WEIGHT_PHI0 1.0 MODEL.LEVELSET.LOSS_WEIGHT_PHIN 5.0

``--model NAME CONFIG [KEY VALUE ...]``: the overrides after the config apply to that model only.
"""
import argparse
import itertools

import numpy as np
import torch

import levelset_rcnn  # noqa: F401  (registers the heads)
from detectron2.utils.events import EventStorage
from levelset_d2 import get_cfg
from levelset_d2.checkpoint import SafeDetectionCheckpointer
from levelset_d2.engine import Trainer

DETECTOR_LOSSES = ("loss_cls", "loss_box_reg")


def is_detector_loss(name: str) -> bool:
    return name.startswith("loss_rpn") or name in DETECTOR_LOSSES


def load_cfg(config_file, opts):
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    cfg.freeze()
    return cfg


def gradient_norms(model, batches, seed=0):
    """Per batch: {"detector": |grad|, "mask": |grad|, "mask loss": value} over the trainable backbone parameters."""
    params = [p for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad]
    rows = []
    model.train()
    with EventStorage(0):
        for k, batch in enumerate(batches):
            torch.manual_seed(seed + k)  # the same RoI sampling for every model
            losses = model(batch)
            groups = {"detector": [v for n, v in losses.items() if is_detector_loss(n)],
                      "mask": [v for n, v in losses.items() if not is_detector_loss(n)]}
            row = {"mask loss": float(sum(groups["mask"]))}
            for group, terms in groups.items():
                grads = torch.autograd.grad(sum(terms), params, retain_graph=True, allow_unused=True)
                row[group] = float(torch.sqrt(sum((g * g).sum() for g in grads if g is not None)))
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", action="append", required=True, metavar="NAME CONFIG [KEY VALUE]",
                    help="a model: its name, its config file, then overrides for it alone")
    ap.add_argument("--batches", type=int, default=4, help="training batches averaged over (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for spec in args.model:
        if len(spec) < 2 or len(spec) % 2:
            ap.error(f"--model {' '.join(spec)}: give NAME CONFIG and then KEY VALUE pairs")
    torch.set_num_threads(args.threads)

    batches = None
    print("| model | detector gradient | mask gradient | mask / detector | mask loss |")
    print("|---|---|---|---|---|")
    for name, config_file, *opts in args.model:
        cfg = load_cfg(config_file, opts)
        if batches is None:
            batches = list(itertools.islice(iter(Trainer.build_train_loader(cfg)), args.batches))
        torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        rows = gradient_norms(model, batches)
        det, mask = (float(np.mean([r[k] for r in rows])) for k in ("detector", "mask"))
        loss = float(np.mean([r["mask loss"] for r in rows]))
        print(f"| {name} | {det:.3g} | {mask:.3g} | {mask / det:.3g} | {loss:.3g} |", flush=True)


if __name__ == "__main__":
    main()
