"""tools/analysis/backbone_gradients.py: the per-group backbone gradient norms are those of the loss groups
alone, so scaling the mask branch's loss weights scales the mask norm by exactly that factor and leaves the
detector's unchanged (the same weights, batches and RoI sampling)."""
import pytest
import torch

from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model

from _configs import tiny_cfg


@pytest.fixture
def tool(import_tool):
    return import_tool("analysis", "backbone_gradients")


def test_loss_groups(tool):
    assert all(tool.is_detector_loss(n) for n in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"))
    assert not any(tool.is_detector_loss(n) for n in ("loss_mask", "loss_tsdf_initial", "loss_tsdf_final"))


def test_mask_norm_scales_with_the_mask_loss_weights(tool, coco_sample_dir):
    cfg = tiny_cfg()
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    batches = [[mapper(d)] for d in DatasetCatalog.get("coco_sample_val2017") if len(d["annotations"]) >= 3][:2]

    def norms(scale):
        cfg = tiny_cfg("MODEL.LEVELSET.LOSS_WEIGHT_PHI0", 0.2 * scale, "MODEL.LEVELSET.LOSS_WEIGHT_PHIN", 1.0 * scale)
        torch.manual_seed(0)
        return tool.gradient_norms(build_model(cfg), batches)

    base, scaled = norms(1.0), norms(3.0)
    for a, b in zip(base, scaled):
        assert a["mask"] > 0 and a["detector"] > 0
        assert b["mask"] == pytest.approx(3.0 * a["mask"], rel=1e-4)
        assert b["mask loss"] == pytest.approx(3.0 * a["mask loss"], rel=1e-4)
        assert b["detector"] == pytest.approx(a["detector"], rel=1e-4)
