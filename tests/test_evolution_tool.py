"""tools/analysis/evolution.py: `detections` reproduces the model's own masks (its phi_N and phi_0 IoUs are
those of DefaultPredictor's pred_masks with MODEL.LEVELSET.INFERENCE_TSDF final / initial); `frozen-phi0`
caches what the model's mask branch reads and trains on it."""
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tool(import_tool):
    return import_tool("analysis", "evolution")


# The image-crop option pools what LevelSetROIHeads passes the head; the tool must pool the same.
@pytest.mark.parametrize("opts", [[], ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "raw"]],
                         ids=["paper", "image_features"])
def test_ious_match_the_predictor_and_summary_counts(opts, tool):
    ae = tool
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


def test_frozen_phi0_caches_what_the_mask_branch_reads_and_scores_phi0(tool, monkeypatch):
    """The cached RoIs are the model's own (pooled features and phi_0 of its detections at the test
    size), and the held-out phi_0 IoU is the plain IoU of phi_0 > 0 with the cropped GT mask."""
    import random

    ev = tool
    import levelset_rcnn
    from levelset_rcnn import analysis
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/LevelSetRCNN/tiny_levelset_rcnn_synthetic.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Untrained boxes rarely overlap a shape by 0.5: match every detection to its best GT box.
    monkeypatch.setattr(ev, "match_to_ground_truth", lambda b, a, min_iou=0.5: analysis.match_to_ground_truth(b, a, 0.0))
    record = DatasetCatalog.get("synthetic_shapes_val")[0]
    cache = ev.cache_image(cfg, model, record, max_rois=6, rng=random.Random(0))
    trace = analysis.trace_evolution(cfg, model, read_image(record["file_name"], format="BGR"))
    S = cfg.MODEL.LEVELSET.EVOLUTION_RESOLUTION
    assert cache["x"].shape == (6, cfg.MODEL.FPN.OUT_CHANNELS, 14, 14)
    assert cache["phi0"].shape == (6, 1, S, S) and cache["gt"].shape == (6, S, S) and cache["img"].shape == (6, 3, S, S)
    for x, phi0 in zip(cache["x"], cache["phi0"]):  # each cached RoI is one of the model's detections
        i = int(torch.argmin((trace.pooled - x).flatten(1).abs().amax(1)))
        assert torch.equal(trace.pooled[i], x) and torch.equal(trace.phis[0][i], phi0)
    head = model.roi_heads.mask_head
    r = ev.evaluate("phi0", head, ev.ConvImageFeatures(False), cache, head.upsample, head.truncation, "half_pixel")
    phi0, gt = cache["phi0"][:, 0].numpy() > 0, cache["gt"].numpy()
    inter, union = (phi0 & gt).sum((1, 2)), (phi0 | gt).sum((1, 2))
    assert r["rois"] == 6
    assert r["iou0"] == pytest.approx(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)), abs=1e-6)
