#!/usr/bin/env python
"""
LevelSet R-CNN and DELSE demo.

    python demo.py
        Generate the synthetic shapes (if missing), train a tiny LevelSet R-CNN on CPU for a few
        minutes, evaluate it (COCO segm AP, boundary metrics) and write prediction overlays
        (masks + sub-pixel zero level sets) to output/demo/. Then train a tiny DELSE on the same
        shapes, evaluate it (mIoU, boundary F, IoU after simulated drags) and write annotation
        pictures to output/demo/delse/: the four extreme clicks and DELSE's contour, then the
        simulated annotator's drag and the corrected contour. --skip-delse leaves DELSE out.

    python demo.py --input img1.jpg img2.png --config-file <cfg.yaml> --weights <model.pth>
        Overlays of a trained model's predictions on your own images.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import levelset_rcnn
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

REPO = Path(__file__).resolve().parent
DEMO_CONFIG = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"
DELSE_DEMO_CONFIG = REPO / "configs" / "DELSE" / "demo_delse_synthetic.yaml"
CONTOUR_COLOR = (1.0, 1.0, 0.0)
# BGR colours of the DELSE pictures.
GT_BGR, PRED_BGR, CLICK_BGR, DRAG_BGR = (0, 255, 0), (0, 230, 255), (60, 60, 255), (255, 200, 0)


def overlay(image_bgr, instances, metadata, ground_truth=None):
    """
    Visualizer masks/boxes/labels of ``instances`` with their zero-level contours drawn on top.
    With ``ground_truth`` (a dataset dict), the GT drawing is placed on the left.
    Returns an RGB uint8 image.
    """
    instances = levelset_rcnn.add_polygons(instances.to("cpu"))
    vis = Visualizer(image_bgr[:, :, ::-1], metadata, scale=2.0)
    vis.draw_instance_predictions(instances)
    for contours in instances.get("pred_polygons") if instances.has("pred_polygons") else []:
        for c in contours:
            closed = np.concatenate([c, c[:1]])
            vis.draw_line(closed[:, 0], closed[:, 1], color=CONTOUR_COLOR, linewidth=1.0)
    pred = vis.output.get_image()
    if ground_truth is None:
        return pred
    gt_vis = Visualizer(image_bgr[:, :, ::-1], metadata, scale=2.0)
    gt = gt_vis.draw_dataset_dict(ground_truth).get_image()
    return np.concatenate([gt, np.full((gt.shape[0], 8, 3), 255, np.uint8), pred], axis=1)


def predictor_for(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.LEVELSET.RETURN_POLYGONS = True  # pred_tsdf -> sub-pixel contours in the overlays
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return DefaultPredictor(cfg)


def run_on_images(args):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", args.weights, *args.opts])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence
    predictor = predictor_for(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    for path in args.input:
        image = cv2.imread(path)
        if image is None:
            sys.exit(f"cannot read image {path}")
        instances = predictor(image)["instances"]
        out = os.path.join(args.output, Path(path).stem + "_levelset.png")
        cv2.imwrite(out, overlay(image, instances, metadata)[:, :, ::-1])
        print(f"{path}: {len(instances)} instances -> {out}")


def train(config_file, opts):
    """Train ``config_file`` + ``opts`` with train_net's Trainer, which ends with an evaluation on
    DATASETS.TEST; the config is saved beside the weights. Returns (cfg, results, minutes)."""
    from train_net import Trainer  # repo root, beside this file

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    start = time.time()
    trainer = Trainer(cfg)  # builds the train loader: generates the synthetic shapes if missing
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer.last_eval_results or {}, (time.time() - start) / 60


def train_and_evaluate(args):
    cfg, results, train_minutes = train(DEMO_CONFIG, [
        "OUTPUT_DIR", args.output,
        "SOLVER.MAX_ITER", args.iters,
        "SOLVER.STEPS", (int(0.8 * args.iters),),  # lr x0.1 for the last 20 %
        *args.opts,
    ])

    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    val = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(val)
    pred_cfg = cfg.clone()
    pred_cfg.defrost()
    pred_cfg.MODEL.WEIGHTS = weights
    pred_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence
    predictor = predictor_for(pred_cfg)
    overlays = []
    for d in DatasetCatalog.get(val)[: args.num_overlays]:
        image = cv2.imread(d["file_name"])
        out = os.path.join(cfg.OUTPUT_DIR, f"overlay_{Path(d['file_name']).stem}.png")
        cv2.imwrite(out, overlay(image, predictor(image)["instances"], metadata, d)[:, :, ::-1])
        overlays.append(out)

    segm = results.get("segm", {}) if results else {}
    print("\n=== LevelSet R-CNN demo ===")
    print(f"trained {cfg.SOLVER.MAX_ITER} iterations + evaluation in {train_minutes:.1f} min")
    if segm:
        print(f"COCO segm AP on {val}: {segm['AP']:.1f} (AP50 {segm['AP50']:.1f}, AP75 {segm['AP75']:.1f})")
    if results and "boundary" in results:
        print("boundary: " + ", ".join(f"{k} {v:.1f}" for k, v in results["boundary"].items()))
    print(f"model:    {weights}")
    print(f"config:   {os.path.join(cfg.OUTPUT_DIR, 'config.yaml')}")
    print(f"overlays: {len(overlays)} PNGs in {cfg.OUTPUT_DIR} (left GT, right prediction with "
          "its zero level set in yellow)")
    print(f"try:      python demo.py --input <image> --config-file {cfg.OUTPUT_DIR}/config.yaml "
          f"--weights {weights}")


def _draw_polygons(canvas, polygons, scale, color):
    for poly in polygons:
        pts = np.round((np.asarray(poly) + 0.5) * scale - 0.5).astype(np.int32)  # pixel centres
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], True, color, 1, cv2.LINE_AA)


def delse_picture(image_bgr, gt_mask, points, first, drag, corrected, scale=4):
    """Two panels, BGR uint8: clicks + DELSE's contour | the drag + the corrected contour; the GT
    contour in green in both. ``points``: (4, 2) image (x, y); ``first``/``corrected``:
    DELSEResult; ``drag``: (from_xy, to_xy) in image pixels or None."""
    from levelset.metrics import jaccard

    x0, y0, x1, y1 = [int(v) for v in np.round(first.crop_box)]
    H, W = gt_mask.shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    # The GT's 0.5 level, as the polygons of a whole-image "RoI"; -0.5: continuous -> pixel-index (x, y).
    whole = Boxes(torch.tensor([[0.0, 0.0, W, H]]))
    gt_contours = [c - 0.5 for c in levelset_rcnn.tsdf_to_polygons(torch.from_numpy(gt_mask - 0.5)[None], whole)[0]]
    panels = []
    for k, result in enumerate((first, corrected)):
        canvas = cv2.resize(image_bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        _draw_polygons(canvas, gt_contours, scale, GT_BGR)
        _draw_polygons(canvas, result.polygons, scale, PRED_BGR)
        if k == 0:
            for x, y in points:
                cv2.circle(canvas, (int((x + 0.5) * scale), int((y + 0.5) * scale)), 4, CLICK_BGR, -1, cv2.LINE_AA)
        elif drag is not None:
            (fx, fy), (tx, ty) = drag
            cv2.arrowedLine(canvas, (int((fx + 0.5) * scale), int((fy + 0.5) * scale)),
                            (int((tx + 0.5) * scale), int((ty + 0.5) * scale)), DRAG_BGR, 2, cv2.LINE_AA, tipLength=0.3)
        m = 4 * scale  # a little context around the crop
        panel = canvas[max(y0 * scale - m, 0): y1 * scale + m, max(x0 * scale - m, 0): x1 * scale + m].copy()
        label = f"{'4 clicks' if k == 0 else '+1 drag' if drag is not None else 'no drag needed'}: IoU {100 * jaccard(result.mask, gt_mask):.1f}"
        cv2.putText(panel, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        panels.append(panel)
    h = max(p.shape[0] for p in panels)
    panels = [cv2.copyMakeBorder(p, 0, h - p.shape[0], 0, 6, cv2.BORDER_CONSTANT, value=(255, 255, 255)) for p in panels]
    return np.concatenate(panels, axis=1)


def train_and_show_delse(args):
    """Train the demo DELSE, evaluate it, and draw click -> contour -> drag -> contour pictures."""
    import delse
    from delse.data import decode_mask, extreme_points, warp_to_crop, points_to_image
    from delse.interactive import simulate_correction

    cfg, results, minutes = train(DELSE_DEMO_CONFIG, ["OUTPUT_DIR", os.path.join(args.output, "delse"), *args.delse_opts])
    results = results.get("delse", {})  # DELSEEvaluator on synthetic_shapes_val

    pred_cfg = cfg.clone()
    pred_cfg.defrost()
    pred_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    predictor = delse.DELSEPredictor(pred_cfg)
    pictures, S = [], cfg.INPUT.DELSE.INPUT_SIZE
    for record in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        if len(pictures) >= args.num_overlays:
            break
        image = cv2.imread(record["file_name"])
        H, W = image.shape[:2]
        # The largest object of the image: an annotator's clicks are its extreme points.
        masks = [decode_mask(a["segmentation"], H, W) for a in record["annotations"] if not a.get("iscrowd", 0)]
        if not masks:
            continue
        gt = max(masks, key=lambda m: m.sum())
        points = extreme_points(gt)
        first = predictor.predict(image, points)
        # The simulated annotator (section 4.4) drags the worst boundary point onto the GT.
        gt_crop = torch.from_numpy(warp_to_crop(gt.astype(np.float32), first.crop_box, S) >= 0.5)
        drag = simulate_correction(torch.from_numpy(first.phi), gt_crop) if gt_crop.any() else None
        corrected = first
        if drag is not None:
            drag = points_to_image(torch.stack(drag).numpy(), first.crop_box, S)
            corrected = predictor.correct(drag[0], drag[1])
        out = os.path.join(cfg.OUTPUT_DIR, f"delse_{Path(record['file_name']).stem}.png")
        cv2.imwrite(out, delse_picture(image, gt, points, first, drag, corrected))
        pictures.append(out)

    print("\n=== DELSE demo ===")
    print(f"trained {cfg.SOLVER.MAX_ITER} iterations + evaluation in {minutes:.1f} min")
    if results:
        print(f"on {cfg.DATASETS.TEST[0]}: mIoU {results['mIoU']:.1f}, F@1px {results['F@1px']:.1f}, "
              f"F@2px {results['F@2px']:.1f}; mIoU after 1 / 2 simulated drags "
              f"{results.get('mIoU@1drag', float('nan')):.1f} / {results.get('mIoU@2drag', float('nan')):.1f}")
    print(f"pictures: {len(pictures)} PNGs in {cfg.OUTPUT_DIR} (green GT, yellow DELSE contour, red clicks, "
          "blue drag; left 4 clicks, right after one drag)")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--input", nargs="+", help="images to run a trained model on")
    parser.add_argument("--config-file", help="config of the trained model (with --input)")
    parser.add_argument("--weights", help="model weights (with --input)")
    parser.add_argument("--confidence", type=float, default=0.3, help="score threshold of the overlays")
    parser.add_argument("--output", default="output/demo", help="where PNGs (and the model) go")
    parser.add_argument("--iters", type=int, default=250,
                        help="training iterations (demo mode; ~0.5-1.3 s each on 2 CPU cores)")
    parser.add_argument("--num-overlays", type=int, default=8, help="validation overlays (demo mode)")
    parser.add_argument("--skip-delse", action="store_true", help="demo mode: LevelSet R-CNN only")
    parser.add_argument("--delse-opts", nargs="*", default=[], help="config overrides KEY VALUE of the DELSE demo")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE")
    return parser


def main():
    args = get_parser().parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="levelset_rcnn")
    if args.input:
        if not (args.config_file and args.weights):
            sys.exit("--input needs --config-file and --weights")
        run_on_images(args)
    else:
        train_and_evaluate(args)
        if not args.skip_delse:
            train_and_show_delse(args)


if __name__ == "__main__":
    main()
