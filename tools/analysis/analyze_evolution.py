"""What LevelSet R-CNN's Chan-Vese evolution does on a dataset.

For each detection matched to a GT instance (box IoU >= 0.5, score >= --score), the mask IoU of
phi_0 and of phi_N against that instance (both pasted into the image as Detectron2 does), how
often the N steps help or hurt and by how much, the share of the 112 x 112 grid whose sign they
flip, and the learned per-instance hyperparameters. It answers "is the evolution doing anything,
and is it the right thing?" when LevelSet R-CNN and its own phi_0 row score alike.

    .venv/bin/python tools/analysis/analyze_evolution.py \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_18_FPN_GN_dsb2018.yaml \\
        --weights output/bench_dsb2018/levelset_r-cnn/model_final.pth --dataset dsb2018_dev \\
        INPUT.MIN_SIZE_TEST 256

Prints a Markdown summary; --json writes the per-detection numbers.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util

import levelset
import levelset_rcnn
from levelset.metrics import to_rle
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from levelset_d2.checkpoint import SafeDetectionCheckpointer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figure_evolution import levelset_rcnn_detections  # noqa: E402  (same pipeline as the figures)


BAND_PX = 2.0  # the boundary band of "flipped_band", in pixels of the evolution grid


def _rles(masks):
    """(R, H, W) bool tensor -> list of RLEs."""
    return mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


def analyse_image(cfg, model, record, score_thresh, match_iou=0.5):
    """Per-detection records of one image: matched GT, IoU of phi_0 / phi_N, flipped share, hyperparameters."""
    image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    h, w = image.shape[:2]
    gt = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    if not gt:
        return []
    det, phis, hyper, scale = levelset_rcnn_detections(cfg, model, image, score_thresh)  # at the test size
    # Detections whose box is empty at the image's size are dropped, as detector_postprocess drops them.
    keep = Boxes(det.pred_boxes.tensor.cpu() * torch.from_numpy(scale))
    keep.clip((h, w))
    keep = keep.nonempty()
    det, phis, hyper = det[keep], [p[keep] for p in phis], {k: v[keep] for k, v in hyper.items()}
    if len(det) == 0:
        return []
    phi0, phin = phis[0], phis[-1]
    eps = model.roi_heads.mask_head.loss_eps
    pasted = {}
    for name, phi in (("phi0", phi0), ("phiN", phin)):
        inst = det[:]
        inst.pred_boxes = det.pred_boxes.clone()  # detector_postprocess scales the boxes in place
        inst.pred_masks = levelset.heaviside(phi.float(), eps)  # as levelset_inference
        pasted[name] = _rles(detector_postprocess(inst, h, w).pred_masks.cpu())
    det_boxes = Boxes(det.pred_boxes.tensor.cpu() * torch.from_numpy(scale))
    gt_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt],
                                  dtype=torch.float32))
    best_iou, best = pairwise_iou(det_boxes, gt_boxes).max(dim=1)
    gt_rles = [to_rle(a["segmentation"], h, w) for a in gt]
    flipped, flipped_band = levelset.sign_flips(phi0, phin, band=BAND_PX,
                                                pixels_per_unit=model.roi_heads.mask_head.truncation)
    rows = []
    for i in range(len(det)):
        if best_iou[i] < match_iou:
            continue
        g = gt_rles[int(best[i])]
        rows.append({
            "image_id": record.get("image_id"),
            "detection": i,
            "gt_index": int(best[i]),
            "score": float(det.scores[i]),
            "iou_phi0": float(mask_util.iou([pasted["phi0"][i]], [g], [0])[0, 0]),
            "iou_phiN": float(mask_util.iou([pasted["phiN"][i]], [g], [0])[0, 0]),
            "flipped": float(flipped[i]),
            "flipped_band": float(flipped_band[i]),
            "gt_area": float(mask_util.area(g)),
            **{k: v[i].cpu().tolist() for k, v in hyper.items()},
        })
    return rows


def summarise(rows):
    """Markdown lines summarising per-detection rows."""
    if not rows:
        return ["no matched detections"]
    d = {k: np.array([r[k] for r in rows]) for k in ("iou_phi0", "iou_phiN", "flipped", "flipped_band", "gt_area")}
    delta = d["iou_phiN"] - d["iou_phi0"]
    lines = [f"{len(rows)} matched detections.", "",
             "| | mean | median |", "|---|---|---|",
             f"| mask IoU of phi_0 | {d['iou_phi0'].mean():.4f} | {np.median(d['iou_phi0']):.4f} |",
             f"| mask IoU of phi_N | {d['iou_phiN'].mean():.4f} | {np.median(d['iou_phiN']):.4f} |",
             f"| IoU change phi_0 -> phi_N | {delta.mean():+.4f} | {np.median(delta):+.4f} |",
             f"| share of the grid whose sign the steps flip | {d['flipped'].mean():.4f} | {np.median(d['flipped']):.4f} |",
             f"| share of the boundary band (±{BAND_PX:g} px of phi_0's zero level) flipped | "
             f"{d['flipped_band'].mean():.4f} | {np.median(d['flipped_band']):.4f} |",
             "", f"Evolution helps (IoU +0.01 or more) {100 * (delta >= 0.01).mean():.1f}% of detections, "
             f"hurts (-0.01 or more) {100 * (delta <= -0.01).mean():.1f}%, leaves within 0.01 the rest."]
    order = np.argsort(d["gt_area"], kind="stable")
    small, large = order[: len(order) // 2], order[len(order) // 2:]
    if len(small):
        lines.append(f"IoU change on the smaller half of the objects (area <= {d['gt_area'][small].max():.0f} px): "
                     f"{delta[small].mean():+.4f}; larger half: {delta[large].mean():+.4f}.")
    hyper = ["lambda1", "lambda2", "mu", "eps", "dt"]
    lines += ["", "Learned hyperparameters (mean ± std over detections; eps and dt per step):", ""]
    for k in hyper:
        if k in rows[0]:
            v = np.array([r[k] for r in rows], dtype=np.float64)
            mean, std = v.mean(0), v.std(0)
            fmt = (lambda a, b: f"{a:.3f} ± {b:.3f}")
            lines.append(f"- {k}: " + (", ".join(fmt(a, b) for a, b in zip(np.atleast_1d(mean), np.atleast_1d(std)))))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--images", type=int, default=0, help="first N images (0: all)")
    ap.add_argument("--score", type=float, default=0.5, help="score threshold of the analysed detections")
    ap.add_argument("--json", help="write the per-detection numbers here")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", args.weights, *args.opts])
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    records = DatasetCatalog.get(args.dataset)
    records = records[: args.images] if args.images else records
    rows = []
    for k, record in enumerate(records):
        rows += analyse_image(cfg, model, record, args.score)
        print(f"[{k + 1}/{len(records)}] {len(rows)} matched detections", flush=True)
    print("\n".join(summarise(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
