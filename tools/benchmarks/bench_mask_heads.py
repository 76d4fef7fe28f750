"""Mask heads alone, in one process, alternating: Mask R-CNN's, LevelSet R-CNN's (paper features),
LevelSet R-CNN's with MODEL.LEVELSET.IMAGE_FEATURES "raw" (crops pooled from the image included), and
the cheaper Chan-Vese features heads (FEATURES_INPUT "tsdf_convs" / FEATURES_NUM_CONV 0).

    .venv/bin/python tools/benchmarks/bench_mask_heads.py [--rois 50] [--rounds 15] [--threads 2]
    .venv/bin/python tools/benchmarks/bench_mask_heads.py --profile "+ image crop, no features conv" [--rois 100]

``--profile HEAD`` times nothing else: it prints ``torch.profiler``'s operator table (self CPU time)
for ``--rounds`` calls of that head (where its time goes).

Random weights and inputs (R-50 COCO configs: 256 x 14 x 14 pooled features, 80 classes, boxes of
5-35 % of an 800 x 1216 image). Alternating the heads round by round keeps machine drift out of the
ratios, which the per-process timings of tools/benchmarks/bench_speed.py cannot (BENCHMARKS.md section 5).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

import levelset_rcnn
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Boxes, Instances
from levelset_rcnn.roi_heads import pool_image_crops

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "LevelSetRCNN"
IMAGE = ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "raw"]
NO_CONV = ["MODEL.LEVELSET.FEATURES_NUM_CONV", "0"]
SHARED = ["MODEL.LEVELSET.FEATURES_INPUT", "tsdf_convs", *NO_CONV]
HEADS = {
    "Mask R-CNN": ("mask_rcnn_R_50_FPN_1x_coco.yaml", []),
    "LevelSet R-CNN": ("levelset_rcnn_R_50_FPN_1x_coco.yaml", []),
    "+ image crop": ("levelset_rcnn_R_50_FPN_1x_coco.yaml", IMAGE),
    "+ image crop, shared convs": ("levelset_rcnn_R_50_FPN_1x_coco.yaml", IMAGE + SHARED),
    "+ image crop, no features conv": ("levelset_rcnn_R_50_FPN_1x_coco.yaml", IMAGE + NO_CONV),
    "paper features, shared convs": ("levelset_rcnn_R_50_FPN_1x_coco.yaml", SHARED),
}


def build(name):
    file, opts = HEADS[name]
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS / file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return build_mask_head(cfg, ShapeSpec(channels=256, height=14, width=14)).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rois", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", choices=list(HEADS), help="profile this head instead of timing all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = {name: build(name) for name in HEADS}
    R, (H, W) = args.rois, (800, 1216)
    x, image = torch.randn(R, 256, 14, 14), torch.randn(1, 3, H, W)
    g = torch.Generator().manual_seed(0)
    wh = (torch.rand(R, 2, generator=g) * 0.3 + 0.05) * torch.tensor([W, H])
    xy = torch.rand(R, 2, generator=g) * (torch.tensor([W, H]) - wh)
    boxes = Boxes(torch.cat([xy, xy + wh], 1))
    classes = torch.randint(0, 80, (R,), generator=g)

    def run(name):
        inst = Instances((H, W), pred_boxes=boxes, pred_classes=classes)
        head = heads[name]
        t0 = time.perf_counter()
        with torch.no_grad():
            if getattr(head, "image_crop_resolution", 0):
                head(x, [inst], image_crops=pool_image_crops(image, [boxes], head.image_crop_resolution))
            else:
                head(x, [inst])
        return time.perf_counter() - t0

    for name in heads:  # warm-up
        run(name)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(args.rounds):
                run(args.profile)
        print(f"{args.profile}: {R} RoIs, {args.rounds} calls, {args.threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    times = {name: [] for name in heads}
    for _ in range(args.rounds):
        for name in heads:
            times[name].append(run(name))
    ms = {name: 1000 * float(np.median(t)) / R for name, t in times.items()}
    print(f"{R} RoIs, {args.rounds} rounds, {args.threads} threads; median ms per RoI:")
    base = ms["Mask R-CNN"]
    for name, v in ms.items():
        print(f"  {name}: {v:.2f} ({v / base:.2f}x Mask R-CNN)")


if __name__ == "__main__":
    main()
