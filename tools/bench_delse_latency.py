"""Per-object latency of DELSE's interactive predictor (paper: 160 ms per object on a GPU).

    .venv/bin/python tools/bench_delse_latency.py [--config configs/DELSE/delse_R_101_pascal_sbd.yaml]
        [--objects 5] [--device cpu|cuda]

Builds the paper-size model (ResNet-101 encoder, three PSP branches, 512x512 input, T = 5) with
random weights — latency does not depend on the weights — and times ``DELSEPredictor.predict``
(four extreme clicks) and ``DELSEPredictor.correct`` (one drag) on instances of the real COCO
val2017 sample, extreme points taken from their ground-truth masks.
"""
import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/DELSE/delse_R_101_pascal_sbd.yaml"))
    ap.add_argument("--objects", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    import delse
    from detectron2.data import DatasetCatalog
    from detectron2.structures import PolygonMasks

    cfg = delse.get_cfg()
    cfg.merge_from_file(args.config)
    # The editing block exists once the model is trained with simulated corrections.
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.DELSE.NUM_CORRECTIONS", "1"])
    torch.manual_seed(0)
    predictor = delse.DELSEPredictor(cfg)

    records = DatasetCatalog.get("coco_sample_val2017")
    objects = []
    for r in records:
        for a in r["annotations"]:
            if a.get("iscrowd", 0) == 0 and isinstance(a["segmentation"], list) and len(objects) < args.objects:
                m = PolygonMasks([a["segmentation"]]).polygons[0]
                pts = np.concatenate([p.reshape(-1, 2) for p in m])
                ext = [pts[pts[:, 0].argmin()], pts[pts[:, 0].argmax()], pts[pts[:, 1].argmin()], pts[pts[:, 1].argmax()]]
                objects.append((r["file_name"], [tuple(map(float, p)) for p in ext]))

    def timed(fn):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    image0 = cv2.imread(objects[0][0])
    predictor.predict(image0, objects[0][1])  # warm-up
    t_pred, t_corr = [], []
    for path, points in objects:
        image = cv2.imread(path)
        res, t = timed(lambda: predictor.predict(image, points))
        t_pred.append(t)
        left = np.array(points[0])
        _, t = timed(lambda: predictor.correct(tuple(left), tuple(left + [3.0, 0.0])))
        t_corr.append(t)
    print(f"DELSE {Path(args.config).name}: input {cfg.INPUT.DELSE.INPUT_SIZE}x{cfg.INPUT.DELSE.INPUT_SIZE}, "
          f"ResNet-{cfg.MODEL.RESNETS.DEPTH}, T = {cfg.MODEL.DELSE.EVOLUTION_STEPS}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {len(objects)} real COCO objects\n")
    print("| call | median latency per object (ms) |\n|---|---|")
    print(f"| predict (4 clicks) | {1000 * np.median(t_pred):.0f} |")
    print(f"| correct (1 drag) | {1000 * np.median(t_corr):.0f} |")


if __name__ == "__main__":
    main()
