"""DELSEMaskHead (LevelSet R-CNN Table 3 baseline): both loss settings train, inference gives
masks, and a Mask R-CNN with the head runs a training step on a real COCO image."""
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/LevelSetRCNN/tiny_delse_mask_head_synthetic.yaml"


def _cfg(**overrides):
    import levelset_rcnn

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _instances():
    """Two images' positive RoIs: discs and rectangles, boxes slightly off the objects."""
    from detectron2.structures import BitMasks, Boxes, Instances

    out = []
    yy, xx = np.mgrid[:128, :128]
    for i in range(2):
        masks = np.stack([
            (xx - 40 - 10 * i) ** 2 + (yy - 50) ** 2 < 20 ** 2,
            (abs(xx - 90) < 15 + 5 * i) & (abs(yy - 80) < 25),
        ])
        inst = Instances((128, 128))
        inst.proposal_boxes = Boxes(torch.tensor([[16.0 - 10 * i, 26, 66 - 10 * i, 76], [70, 50, 112, 110]]))
        inst.gt_masks = BitMasks(torch.from_numpy(masks))
        inst.gt_classes = torch.tensor([0, 1])
        out.append(inst)
    return out


def _head(cfg):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.mask_head import build_mask_head


    torch.manual_seed(0)
    return build_mask_head(cfg, ShapeSpec(channels=64, height=14, width=14))


@pytest.mark.parametrize(
    "loss,hp_head,keys",
    [
        ("delse", False, {"loss_level_set", "loss_evolution", "loss_direction"}),
        ("levelset_rcnn", True, {"loss_tsdf_initial", "loss_tsdf_final", "loss_direction"}),
    ],
)
def test_delse_mask_head_trains(loss, hp_head, keys):
    from detectron2.utils.events import EventStorage

    from levelset_rcnn.delse_mask_head import DELSEMaskHead

    cfg = _cfg(**{"MODEL.LEVELSET.DELSE_HEAD.LOSS": loss, "MODEL.LEVELSET.DELSE_HEAD.HYPERPARAMETER_HEAD": hp_head,
                  "MODEL.LEVELSET.DELSE_HEAD.CLAMP_TO_TRUNCATION": hp_head})
    head = _head(cfg)
    assert isinstance(head, DELSEMaskHead) and (head.hyperparameter_head is not None) == hp_head
    torch.manual_seed(1)
    features = torch.randn(4, 64, 14, 14)
    instances = _instances()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    history = []
    with EventStorage():
        for _ in range(15):
            losses = head(features, instances)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            history.append(total.item())
    assert set(losses) == keys
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.7 * history[0], history

    head.eval()
    from detectron2.structures import Boxes, Instances

    pred = Instances((128, 128))
    pred.pred_boxes = Boxes(torch.tensor([[16.0, 26, 66, 76]]))
    pred.pred_classes = torch.tensor([0])
    with torch.no_grad():
        (out,) = head(features[:1], [pred])
    S = cfg.MODEL.LEVELSET.EVOLUTION_RESOLUTION
    assert out.pred_masks.shape == (1, 1, S, S)
    assert 0 <= out.pred_masks.min() and out.pred_masks.max() <= 1


@pytest.mark.parametrize("loss,hp_head", [("delse", False), ("levelset_rcnn", True)])
def test_a_batch_without_foreground_gives_zero_gradients_to_every_parameter(loss, hp_head):
    """No foreground RoI: the losses of a normal batch (same keys, for the metrics of every process),
    each zero, with every parameter in the graph (DDP waits for a gradient of each)."""
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = _cfg(**{"MODEL.LEVELSET.DELSE_HEAD.LOSS": loss, "MODEL.LEVELSET.DELSE_HEAD.HYPERPARAMETER_HEAD": hp_head})
    head = _head(cfg)
    with EventStorage():
        full = head(torch.randn(4, 64, 14, 14), _instances())
        empty = Instances((128, 128))
        empty.proposal_boxes = Boxes(torch.zeros(0, 4))
        empty.gt_masks = BitMasks(torch.zeros(0, 128, 128, dtype=torch.bool))
        empty.gt_classes = torch.zeros(0, dtype=torch.int64)
        losses = head(torch.zeros(0, 64, 14, 14), [empty, empty])
    assert set(losses) == set(full) == set(head.loss_names())
    assert all(float(v) == 0.0 for v in losses.values())
    head.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.count_nonzero(p.grad) == 0 for p in head.parameters())


def test_mask_rcnn_with_delse_head_on_real_image(coco_sample_dir):
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = _cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 80, "INPUT.MASK_FORMAT": "polygon"})
    torch.manual_seed(0)
    model = build_model(cfg)
    record = next(r for r in DatasetCatalog.get("coco_sample_val2017") if len(r["annotations"]) >= 3)
    data = DatasetMapper(cfg, is_train=True)(record)
    model.train()
    with EventStorage():
        losses = model([data])
    assert "loss_mask" not in losses
    assert {"loss_level_set", "loss_evolution", "loss_direction"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": data["image"], "height": record["height"], "width": record["width"]}])
    inst = out["instances"]
    assert inst.pred_masks.shape[1:] == (record["height"], record["width"])
