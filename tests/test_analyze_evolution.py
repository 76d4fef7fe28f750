"""tools/analysis/analyze_evolution.py reproduces the model's own masks: its phi_N and phi_0 IoUs are those
of DefaultPredictor's pred_masks with MODEL.LEVELSET.INFERENCE_TSDF final / initial."""
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]


# The image-crop option pools what LevelSetROIHeads passes the head; the tool must pool the same.
@pytest.mark.parametrize("opts", [[], ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "raw"]],
                         ids=["paper", "image_features"])
def test_ious_match_the_predictor_and_summary_counts(opts, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools" / "analysis"))  # undone after the test
    import analyze_evolution as ae
    import levelset_rcnn
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/LevelSetRCNN/tiny_levelset_rcnn_synthetic.yaml"))
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # A test size unlike the 128 px images: a tool that feeds raw images is compared at a wrong scale.
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("synthetic_shapes_val")[0]
    # Untrained: match every detection to its best GT box (match_iou 0), to compare all of them.
    rows = ae.analyse_image(cfg, model, record, 0.0, match_iou=0.0)
    assert len(rows) > 5 and any(r["iou_phiN"] > 0 for r in rows) and any(r["iou_phi0"] > 0 for r in rows)
    image = read_image(record["file_name"], format="BGR")
    h, w = image.shape[:2]
    gt = []  # COCO polygons or RLE (synthetic annotations mix both) -> one compressed RLE each
    for a in record["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            gt.append(mask_util.merge(mask_util.frPyObjects(seg, h, w)))
        else:
            gt.append(mask_util.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
    for mode, key in (("final", "iou_phiN"), ("initial", "iou_phi0")):
        c = cfg.clone()
        c.MODEL.LEVELSET.INFERENCE_TSDF = mode
        predictor = DefaultPredictor(c)
        predictor.model.load_state_dict(model.state_dict())
        masks = predictor(image)["instances"].pred_masks.numpy()
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        ious = mask_util.iou(rles, gt, [0] * len(gt))  # (detections, GT)
        for r in rows:  # the same detection against its box-matched GT instance
            assert r[key] == pytest.approx(ious[r["detection"], r["gt_index"]], abs=1e-6), (mode, r)
    lines = ae.summarise([{"iou_phi0": 0.5, "iou_phiN": 0.6, "flipped": 0.1, "flipped_band": 0.3, "gt_area": 10.0},
                          {"iou_phi0": 0.5, "iou_phiN": 0.4, "flipped": 0.1, "flipped_band": 0.5, "gt_area": 20.0},
                          {"iou_phi0": 0.5, "iou_phiN": 0.5, "flipped": 0.0, "flipped_band": 0.1, "gt_area": 30.0}])
    text = "\n".join(lines)
    assert "helps (IoU +0.01 or more) 33.3%" in text and "hurts (-0.01 or more) 33.3%" in text
    assert "| IoU change phi_0 -> phi_N | +0.0000 |" in text
    assert "| share of the boundary band (±2 px of phi_0's zero level) flipped | 0.3000 | 0.3000 |" in text
