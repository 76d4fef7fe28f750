"""Per-object latency of DELSE's interactive predictor (paper: 160 ms per object on a GPU).

    .venv/bin/python tools/benchmarks/bench_delse_latency.py [--config configs/DELSE/delse_R_101_pascal_sbd.yaml]
        [--weights W] [--objects 5] [--device cpu|cuda] [--psp-widths psp_channels pspnet]

Builds the model of the config (default the paper size: ResNet-101 encoder, three PSP branches,
512x512 input, T = 5) with random weights or --weights — latency does not depend on the weights, but
a preview on an editing block that was never trained runs the full pass (DELSEPredictor.can_preview) — and times,
per object, ``DELSEPredictor.predict`` (four extreme clicks), ``correct`` (one drag, the full pass)
and ``correct(preview=True)`` (the editing block and the evolution only), medians over the real
COCO val2017 sample's objects, extreme points from their GT masks. For each MODEL.DELSE.PSP_BIN_WIDTH
given it also counts the FLOPs of one full pass (fvcore) and the share of the three PSP branches.
"""
import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/DELSE/delse_R_101_pascal_sbd.yaml"))
    ap.add_argument("--weights", default="", help="trained weights (default: random, seed 0; an untrained "
                    "editing block makes the preview the full pass)")
    ap.add_argument("--objects", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--psp-widths", nargs="+", default=["psp_channels", "pspnet"],
                    choices=["psp_channels", "pspnet"], help="MODEL.DELSE.PSP_BIN_WIDTH values to time")
    args = ap.parse_args()
    print("| PSP bin width | predict (4 clicks), ms | correct (1 drag, full pass), ms | correct(preview=True), ms "
          "| GFLOPs of a full pass | PSP branches' share |\n|---|---|---|---|---|---|")
    for width in args.psp_widths:
        run(args, width)


def flops(model, S, device):
    """fvcore's FLOP count (one multiply-add = 1) of one full pass, and the three branches' share."""
    from fvcore.nn import FlopCountAnalysis

    images = torch.zeros(1, 3, S, S, device=device)
    heat = torch.zeros(1, 1, S, S, device=device)

    class Full(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images, heat):
            t = self.m.layers(images, heat)
            return self.m.evolve(t["phi0"], t["motion"], t["modulation"])

    fca = FlopCountAnalysis(Full(model), (images, heat))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = fca.by_module()
    branches = sum(by_module.get(f"m.{b}", 0) for b in ("initial_level_set_branch", "motion_branch", "modulation_branch"))
    return fca.total() / 1e9, branches / max(fca.total(), 1)


def run(args, width):

    import delse
    from detectron2.data import DatasetCatalog
    from detectron2.structures import PolygonMasks

    cfg = delse.get_cfg()
    cfg.merge_from_file(args.config)
    # The editing block exists once the model is trained with simulated corrections.
    cfg.merge_from_list(["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", args.device, "MODEL.DELSE.NUM_CORRECTIONS", "1",
                         "MODEL.DELSE.PSP_BIN_WIDTH", width])
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
    t_pred, t_corr, t_prev = [], [], []
    for path, points in objects:
        image = cv2.imread(path)
        left = np.array(points[0])
        _, t = timed(lambda: predictor.predict(image, points))
        t_pred.append(t)
        _, t = timed(lambda: predictor.correct(tuple(left), tuple(left + [3.0, 0.0])))
        t_corr.append(t)
        predictor.predict(image, points)
        _, t = timed(lambda: predictor.correct(tuple(left), tuple(left + [3.0, 0.0]), preview=True))
        t_prev.append(t)
    gflops, share = flops(predictor.model, cfg.INPUT.DELSE.INPUT_SIZE, args.device)
    ms = lambda ts: f"{1000 * np.median(ts):.0f}"
    print(f"| {width} | {ms(t_pred)} | {ms(t_corr)} | {ms(t_prev)} | {gflops:.1f} | {100 * share:.0f} % |")
    print(f"<!-- {Path(args.config).name}: input {cfg.INPUT.DELSE.INPUT_SIZE}, ResNet-{cfg.MODEL.RESNETS.DEPTH}, "
          f"T = {cfg.MODEL.DELSE.EVOLUTION_STEPS}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {len(objects)} real COCO objects -->", flush=True)


if __name__ == "__main__":
    main()
