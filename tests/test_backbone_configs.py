"""The WRN-38 + DCN + PANet Cityscapes configs (paper Table 1) build and train one step on CPU with
tiny overrides, and Detectron2's multi-scale + flip test-time augmentation runs on our models."""
from pathlib import Path

import pytest
import torch

import levelset_rcnn
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from levelset_rcnn.backbone import DeformConv2dPack, PANetFPN, WideResNet38, add_wrn_config

CITYSCAPES = Path(__file__).resolve().parents[1] / "configs" / "LevelSetRCNN" / "Cityscapes"
CONFIGS = sorted(p.name for p in CITYSCAPES.glob("*WRN38*.yaml") if not p.name.startswith("Base"))

# Few channels, one unit per module, tiny heads; everything else (backbone type, DCN stages, mask
# head, SyncBN, number of classes) is the config's own.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WRN.STRUCTURE", [1, 1, 1, 1, 1, 1],
    "MODEL.WRN.WIDTH_DIVISOR", 16,
    "MODEL.FPN.OUT_CHANNELS", 16,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 16,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 16,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
    "MODEL.LEVELSET.EMBED_CHANNELS", 8, "MODEL.LEVELSET.EVOLUTION_RESOLUTION", 56,
    "MODEL.LEVELSET.TRUNCATION", 5.0, "MODEL.LEVELSET.HYPERPARAM_NUM_CONV", 1,
    "MODEL.LEVELSET.HYPERPARAM_FC_DIM", 16, "MODEL.LEVELSET.FEATURES_NUM_CONV", 1,
    "TEST.DETECTIONS_PER_IMAGE", 10,
]


def load_cfg(name, *opts):
    cfg = levelset_rcnn.get_cfg()
    if "WRN" not in cfg.MODEL:  # until levelset_rcnn's config declares the backbone keys itself
        add_wrn_config(cfg)
    cfg.merge_from_file(str(CITYSCAPES / name))
    cfg.merge_from_list([*TINY, *opts])
    return cfg


def training_image(num_classes, seed=0):
    """A 64x96 image with two box-shaped instances (boxes and bitmasks)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 8:40, 10:50] = True
    masks[1, 30:60, 55:90] = True
    inst = Instances((64, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 8, 50, 40], [55, 30, 90, 60]]))
    inst.gt_classes = torch.tensor([0, num_classes - 1])
    inst.gt_masks = BitMasks(masks)
    image = (torch.rand(3, 64, 96, generator=g) * 255).float()
    return {"image": image, "instances": inst, "height": 64, "width": 96}


def test_configs_found_and_paper_settings():
    assert len(CONFIGS) == 8, CONFIGS
    cfg = load_cfg("levelset_rcnn_WRN38_PANet_DCN_cityscapes.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_wide_resnet38_panet_backbone"
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "LevelSetMaskHead"
    assert (cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHI0, cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHIN) == (1.0, 5.0)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.BASE_LR) == (24000, (18000,), 0.01)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 8 and any(cfg.MODEL.WRN.DEFORM_ON_PER_STAGE)
    msf = load_cfg("levelset_rcnn_WRN38_PANet_DCN_cityscapes_MSF.yaml")
    assert msf.TEST.AUG.ENABLED and msf.TEST.AUG.FLIP and len(msf.TEST.AUG.MIN_SIZES) > 1
    coco = load_cfg("levelset_rcnn_WRN38_PANet_DCN_coco_pretrain.yaml")
    assert (coco.SOLVER.MAX_ITER, coco.SOLVER.STEPS, coco.SOLVER.BASE_LR) == (
        270000, (210000, 250000), 0.02)
    assert coco.MODEL.ROI_HEADS.NUM_CLASSES == 80 and coco.DATASETS.TRAIN == ("coco_2017_train",)
    fine = load_cfg("levelset_rcnn_WRN38_PANet_DCN_cityscapes_COCO.yaml")
    assert (fine.SOLVER.MAX_ITER, fine.SOLVER.STEPS) == (6000, (4000,))
    assert "coco_pretrain" in fine.MODEL.WEIGHTS
    mrcnn = load_cfg("mask_rcnn_WRN38_PANet_DCN_cityscapes_COCO.yaml")
    assert mrcnn.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert "mask_rcnn_WRN38_PANet_DCN_coco_pretrain" in mrcnn.MODEL.WEIGHTS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_trains_one_step(name):
    cfg = load_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    backbone = model.backbone
    assert isinstance(backbone, PANetFPN) and isinstance(backbone.bottom_up, WideResNet38)
    assert isinstance(backbone.bottom_up.mod7.block1.convs.conv2, DeformConv2dPack)
    assert type(model.roi_heads.mask_head).__name__ == (
        "LevelSetMaskHead" if name.startswith("levelset") else "MaskRCNNConvUpsampleHead")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    offset_conv = backbone.bottom_up.mod7.block1.convs.conv2.conv_offset
    before = offset_conv.weight.detach().clone()
    with EventStorage():
        losses = model([training_image(cfg.MODEL.ROI_HEADS.NUM_CLASSES)])
    mask_losses = {"loss_tsdf_initial", "loss_tsdf_final"} if name.startswith("levelset") else {
        "loss_mask"}
    assert mask_losses <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(offset_conv.weight, before)  # the DCN offsets are trained


def run_tta(cfg):
    cfg.merge_from_list(["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", (32, 48),
                         "TEST.AUG.MAX_SIZE", 200, "TEST.AUG.FLIP", True,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tta = GeneralizedRCNNWithTTA(cfg, model, batch_size=2)
    image = training_image(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    inputs = {"image": image["image"], "height": 64, "width": 96}
    assert len(tta.tta_mapper(inputs)) == 4  # 2 scales x (original, flipped)
    with torch.no_grad():
        out = tta([inputs])[0]["instances"]
    assert len(out) > 0, "untrained model with score threshold 0 still detects boxes"
    assert out.image_size == (64, 96)
    assert out.pred_masks.shape == (len(out), 64, 96) and out.pred_masks.dtype == torch.bool
    assert out.pred_boxes.tensor.shape == (len(out), 4) and out.scores.shape == (len(out),)
    return out


def test_tta_multiscale_flip_mask_rcnn():
    run_tta(load_cfg("mask_rcnn_WRN38_PANet_DCN_cityscapes.yaml"))


def test_tta_multiscale_flip_levelset_rcnn():
    run_tta(load_cfg("levelset_rcnn_WRN38_PANet_DCN_cityscapes.yaml"))


@pytest.mark.parametrize("name", ["mask_rcnn_WRN38_PANet_DCN_cityscapes.yaml",
                                  "levelset_rcnn_WRN38_PANet_DCN_cityscapes.yaml"])
def test_tta_with_one_scale_and_no_flip_equals_plain_inference(name):
    """The independent value for TTA: with one scale and no flip, its merged detections and
    averaged masks are those of the model itself run on the image resized to that scale."""
    import numpy as np
    from detectron2.data import transforms as T

    cfg = load_cfg(name, "TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", (48,), "TEST.AUG.MAX_SIZE", 200,
                   "TEST.AUG.FLIP", False, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = training_image(cfg.MODEL.ROI_HEADS.NUM_CLASSES)["image"]
    hwc = image.permute(1, 2, 0).numpy()
    resized = T.ResizeShortestEdge(48, 200).get_transform(hwc).apply_image(hwc)
    assert resized.shape == (48, 72, 3)
    with torch.no_grad():
        tta = GeneralizedRCNNWithTTA(cfg, model, batch_size=2)([{"image": image, "height": 64, "width": 96}])
        plain = model([{"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                        "height": 64, "width": 96}])
    tta, plain = tta[0]["instances"], plain[0]["instances"]
    assert len(tta) == len(plain) == cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    assert torch.allclose(tta.scores, plain.scores, atol=1e-6)
    assert torch.allclose(tta.pred_boxes.tensor, plain.pred_boxes.tensor, atol=1e-3)
    assert plain.pred_masks.any() and (tta.pred_masks != plain.pred_masks).float().mean() < 1e-3


def test_mapillary_checkpoint_converts_and_loads(tmp_path):
    """A checkpoint laid out as Mapillary's WRN-38 ImageNet file (``module.`` prefix, ``classifier``,
    under ``state_dict``) converts and loads into the backbone of a model by name matching."""
    from detectron2.checkpoint import DetectionCheckpointer
    from levelset_rcnn.backbone import convert_mapillary_checkpoint

    cfg = load_cfg("mask_rcnn_WRN38_PANet_DCN_cityscapes.yaml")
    torch.manual_seed(1)
    source = build_model(cfg).backbone.bottom_up.state_dict()
    new = ("bn_out_", "conv_offset")  # our additions: absent from Mapillary's file
    state = {"module." + k: v for k, v in source.items() if not any(n in k for n in new)}
    state["module.classifier.fc.weight"] = torch.randn(1000, 256)
    torch.save({"state_dict": state, "epoch": 90}, tmp_path / "wrn38.pth.tar")
    pkl = convert_mapillary_checkpoint(tmp_path / "wrn38.pth.tar", tmp_path / "wrn38.pkl")

    torch.manual_seed(2)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(pkl))
    loaded = model.backbone.bottom_up.state_dict()
    for k, v in source.items():
        if k.startswith("bn_out_") or k.endswith("num_batches_tracked"):
            continue  # new in our backbone / not saved
        if "conv_offset" in k:  # not in the file: stays at its zero init
            assert torch.equal(loaded[k], torch.zeros_like(v))
            continue
        assert torch.equal(loaded[k], v), k
