#!/usr/bin/env python
"""The mask branch alone, on ground-truth boxes: what the level-set module is for (boundaries given a box).

Runs each trained model's mask head on the ground-truth boxes of any COCO-json per-object set (every
annotation is one object; sets that annotate only some objects, such as COCO-MVal, are fine) and
reports, per model, mean mask IoU, boundary F at 1 and 2 px (DAVIS matching, ``levelset.metrics``) and
Boundary IoU (Cheng et al., dilation 0.02 of the image diagonal), on the original image's pixels.
LevelSet R-CNN models give two paired rows from one backbone pass: phi_0 (``INFERENCE_TSDF initial``)
and phi_N; every pair of rows is compared object by object (mean difference with a 95 % bootstrap
interval, share of objects helped / hurt).

    .venv/bin/python tools/analysis/eval_gt_boxes.py --json ../shared/data/coco_mval/dev.json \\
        --image-root ../shared/data/coco_mval/images \\
        --model "Mask R-CNN" configs/LevelSetRCNN/mask_rcnn_R_50_FPN_coco128.yaml output/mask_rcnn_R_50_FPN_coco128/model_final.pth \\
        --model "LevelSet R-CNN" configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_coco128.yaml output/levelset_rcnn_R_50_FPN_coco128/model_final.pth

Class of each box: class-agnostic models (one class) use it; class-specific ones use the class their
box head predicts on that box, or, with ``--class-from-json``, the json's category when the model's
training metadata maps that id (an error names the annotation otherwise). Images are resized as
``DefaultPredictor`` does (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``) and the boxes with them.
"""
import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

import levelset_rcnn  # noqa: F401  (registers the heads)
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from levelset.metrics import boundary_f_measure, boundary_iou, paired_difference
from levelset_d2 import get_cfg
from levelset_d2.checkpoint import SafeDetectionCheckpointer
from levelset_rcnn.roi_heads import with_image

METRICS = ("iou", "f1px", "f2px", "boundary_iou")


def load_model(config_file, weights, opts=()):
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    cfg.freeze()
    model = build_model(cfg).eval()
    SafeDetectionCheckpointer(model).load(weights)
    return cfg, model


def object_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    return {"iou": float(inter / union) if union else 1.0,
            "f1px": boundary_f_measure(pred, gt, 1)[2], "f2px": boundary_f_measure(pred, gt, 2)[2],
            "boundary_iou": boundary_iou(gt, pred)}


def box_classes(cfg, model, features, boxes: Boxes, anns, class_from_json: bool) -> torch.Tensor:
    """(R,) class of each ground-truth box for the mask head (see the module docstring)."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if num_classes == 1:
        return torch.zeros(len(boxes), dtype=torch.int64)
    if class_from_json:
        mapping = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_dataset_id_to_contiguous_id
        missing = [a["id"] for a in anns if a["category_id"] not in mapping]
        if missing:
            raise SystemExit(f"--class-from-json: annotations {missing[:5]} have categories the model "
                             f"({cfg.DATASETS.TRAIN[0]}) does not know")
        return torch.tensor([mapping[a["category_id"]] for a in anns], dtype=torch.int64)
    heads = model.roi_heads
    x = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], [boxes]))
    scores, _ = heads.box_predictor(x)
    return scores[:, :num_classes].argmax(1)


@torch.no_grad()
def masks_on_boxes(cfg, model, image_bgr, anns, class_from_json):
    """{row suffix: list of (H, W) bool masks}, one per annotation: "" for the model's output, and for a
    LevelSet R-CNN head "φ0" and "φN" from the same features."""
    h, w = image_bgr.shape[:2]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    transform = resize.get_transform(image_bgr)
    image = transform.apply_image(image_bgr if cfg.INPUT.FORMAT == "BGR" else image_bgr[:, :, ::-1])
    xyxy = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in anns], dtype=np.float32)
    boxes = Boxes(torch.from_numpy(transform.apply_box(xyxy)).float())
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    images = ImageList.from_tensors([(tensor - model.pixel_mean) / model.pixel_std],
                                    model.backbone.size_divisibility)
    features = with_image(model.backbone(images.tensor), images)
    classes = box_classes(cfg, model, features, boxes, anns, class_from_json)
    head = model.roi_heads.mask_head
    variants = {"": None}
    if hasattr(head, "inference_tsdf"):  # LevelSet R-CNN: both TSDFs, paired
        variants = {", φ0": "initial", ", φN": "final"}
    out = {}
    for suffix, which in variants.items():
        if which is not None:
            head.inference_tsdf = which
        inst = Instances(images.image_sizes[0], pred_boxes=boxes.clone(), pred_classes=classes,
                         scores=torch.ones(len(boxes)))
        inst = model.roi_heads.forward_with_given_boxes(features, [inst])[0]
        out[suffix] = detector_postprocess(inst, h, w).pred_masks.numpy().astype(bool)
    if len(variants) > 1:
        head.inference_tsdf = cfg.MODEL.LEVELSET.INFERENCE_TSDF
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--json", required=True, action="append",
                    help="COCO json; every annotation is one object (crowd ones skipped); repeat to pool several "
                         "files of one image folder (COCO-MVal's train.json and dev.json: all 800 objects)")
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--model", nargs=3, action="append", default=[], metavar=("NAME", "CONFIG", "WEIGHTS"))
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="per-object values written by earlier runs (--output X: X.json) on the same objects, "
                         "tabulated and compared with this run's (run one model per process, then merge)")
    ap.add_argument("--class-from-json", action="store_true", help="class-specific models: the json's category")
    ap.add_argument("--max-images", type=int, default=0, help="first N images only (a quick look)")
    ap.add_argument("--output", help="write the table (.md) and per-object values (.json) here (without suffix)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every model (KEY VALUE ...)")
    args = ap.parse_args(argv)

    sets = [(coco, image_id) for coco in map(COCO, args.json) for image_id in sorted(coco.getImgIds())]
    if args.max_images:
        sets = sets[: args.max_images]
    values, times = {}, {}
    for name, config_file, weights in args.model:
        cfg, model = load_model(config_file, weights, args.opts)
        t0 = time.perf_counter()
        for coco, image_id in sets:
            info = coco.loadImgs(image_id)[0]
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
            if not anns:
                continue
            path = Path(args.image_root) / info["file_name"]
            image = cv2.imread(str(path))
            if image is None:
                raise SystemExit(f"cannot read image {path} (image id {image_id})")
            for suffix, masks in masks_on_boxes(cfg, model, image, anns, args.class_from_json).items():
                for ann, mask in zip(anns, masks):
                    m = object_metrics(mask, coco.annToMask(ann) > 0)
                    for k in METRICS:
                        values.setdefault(name + suffix, {}).setdefault(k, []).append(m[k])
        times[name] = time.perf_counter() - t0
        print(f"{name}: {len(sets)} images in {times[name]:.0f} s", flush=True)

    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        if earlier["json"] != args.json:
            raise SystemExit(f"{path} was measured on {earlier['json']}, not {args.json}")
        values.update(earlier["values"])
    if not values:
        raise SystemExit("nothing to tabulate: give --model and/or --merge")
    n = len(next(iter(values.values()))["iou"])
    lines = [f"{n} objects of {', '.join(f'`{j}`' for j in args.json)} on their ground-truth boxes; means in percent.", "",
             "| model | mask IoU | F@1px | F@2px | Boundary IoU |", "|---|---|---|---|---|"]
    for row, v in values.items():
        lines.append(f"| {row} | " + " | ".join(f"{100 * np.mean(v[k]):.1f}" for k in METRICS) + " |")
    rows = list(values)
    rng = np.random.default_rng(0)
    comparisons = [(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    if comparisons:
        lines += ["", "Paired, object by object (B − A, mean and 95 % bootstrap interval, points; "
                  "share of objects B helps / hurts by more than 0.1 point):", "",
                  "| A | B | Δ mask IoU | Δ F@1px | Δ F@2px | Δ Boundary IoU | helped / hurt (IoU) |", "|---|---|---|---|---|---|---|"]
        for a, b in comparisons:
            cells = []
            for k in METRICS:
                d = paired_difference(values[a][k], values[b][k], rng)
                cells.append(f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]")
                if k == "iou":
                    share = f"{100 * d['helped']:.0f} % / {100 * d['hurt']:.0f} %"
            lines.append(f"| {a} | {b} | " + " | ".join(cells) + f" | {share} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output + ".md").write_text(table + "\n")
        Path(args.output + ".json").write_text(json.dumps({"json": args.json, "times_s": times, "values": values}))


if __name__ == "__main__":
    main()
