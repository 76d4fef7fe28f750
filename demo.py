#!/usr/bin/env python
"""
LevelSet R-CNN demo.

    python demo.py
        Generate the synthetic shapes (if missing), train a tiny LevelSet R-CNN on CPU for a few
        minutes, evaluate it (COCO segm AP, boundary metrics) and write prediction overlays
        (masks + sub-pixel zero level sets) to output/demo/.

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
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

REPO = Path(__file__).resolve().parent
DEMO_CONFIG = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"
CONTOUR_COLOR = (1.0, 1.0, 0.0)


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


def train_and_evaluate(args):
    from train_net import Trainer  # repo root, beside this file

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(DEMO_CONFIG))
    cfg.merge_from_list([
        "OUTPUT_DIR", args.output,
        "SOLVER.MAX_ITER", args.iters,
        "SOLVER.STEPS", (int(0.8 * args.iters),),  # lr x0.1 for the last 20 %
        *args.opts,
    ])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    start = time.time()
    trainer = Trainer(cfg)  # builds the train loader: generates the synthetic shapes if missing
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with an evaluation on DATASETS.TEST
    results = trainer._last_eval_results
    train_minutes = (time.time() - start) / 60

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


if __name__ == "__main__":
    main()
