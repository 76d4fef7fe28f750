"""tools/analysis/eval_gt_boxes.py: the mask branch on ground-truth boxes gives exactly what Detectron2's own
given-boxes inference (``GeneralizedRCNN.inference(detected_instances=...)``, through DefaultPredictor's
resize) gives, for φN and φ0; and its per-object metrics are the hand-countable ones."""
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tool(import_tool):
    return import_tool("analysis", "eval_gt_boxes")


def test_object_metrics_by_hand(tool):
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True  # 400 px
    pred = np.zeros_like(gt)
    pred[10:30, 10:40] = True  # 600 px, 400 of them shared
    m = tool.object_metrics(pred, gt)
    assert m["iou"] == pytest.approx(400 / 600)
    assert tool.object_metrics(gt, gt) == {"iou": 1.0, "f1px": 1.0, "f2px": 1.0, "boundary_iou": 1.0}
    # Shifted by 2 px: matched at 2 px, not all at 1 px.
    shifted = np.roll(gt, 2, axis=1)
    m = tool.object_metrics(shifted, gt)
    assert m["f2px"] == pytest.approx(1.0) and m["f1px"] < 1.0


@pytest.mark.parametrize("which", ["final", "initial"])
def test_masks_equal_detectron2_given_boxes_inference(tool, which):
    import levelset_rcnn
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, BoxMode, Instances
    from levelset_d2.inference import test_time_input

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/LevelSetRCNN/tiny_levelset_rcnn_synthetic.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160  # boxes must be resized with the image
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1  # class-agnostic: every box is class 0 in both paths
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("synthetic_shapes_val")[0]
    image = read_image(record["file_name"], format="BGR")
    anns = [dict(a, bbox=BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYWH_ABS)) for a in record["annotations"]]
    got = tool.masks_on_boxes(cfg, model, image, anns, class_from_json=False)
    assert set(got) == {", φ0", ", φN"}

    inputs, transform = test_time_input(cfg, image)
    xyxy = np.array([BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in anns], np.float32)
    h, w = inputs["image"].shape[1:]
    given = Instances((h, w), pred_boxes=Boxes(torch.from_numpy(transform.apply_box(xyxy))),
                      pred_classes=torch.zeros(len(anns), dtype=torch.int64), scores=torch.ones(len(anns)))
    model.roi_heads.mask_head.inference_tsdf = which
    with torch.no_grad():
        expected = model.inference([inputs], detected_instances=[given])[0]["instances"].pred_masks.numpy()
    np.testing.assert_array_equal(got[", φN" if which == "final" else ", φ0"], expected)
    if which == "final":
        assert (got[", φN"] != got[", φ0"]).any()  # the two rows are not the same masks
