"""MODEL.LEVELSET.IMAGE_FEATURES "raw": LevelSetROIHeads pools each RoI's crop of the normalised
input and the Chan-Vese steps evolve on it beside the head's embedding (not in the paper)."""

import pytest
import torch

import levelset
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from _configs import tiny_cfg
from levelset_rcnn.mask_head import LevelSetMaskHead, standardize_crops
from levelset_rcnn.roi_heads import pool_image_crops, with_image

IMAGE_OPTS = ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "raw"]


def test_pool_image_crops_samples_the_box_at_pixel_centres():
    """On a ramp image (value = column / row index) RoIAlign is exact: crop pixel (i, j) of a box
    [x0, y0, x1, y1] at side S has its centre at x0 + (j + 0.5) (x1 - x0) / S in continuous
    coordinates, i.e. pixel index x0 + (j + 0.5) (x1 - x0) / S - 0.5."""
    H, W = 40, 48
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    image = torch.stack([xs, ys, torch.full_like(xs, 7.0)])[None]
    boxes = torch.tensor([[8.0, 4.0, 24.0, 20.0], [10.0, 6.0, 42.0, 30.0]])
    crops = pool_image_crops(image, [Boxes(boxes)], 16)
    assert crops.shape == (2, 3, 16, 16)
    j = torch.arange(16, dtype=torch.float32)
    for r, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cols = x0 + (j + 0.5) * (x1 - x0) / 16 - 0.5
        rows = y0 + (j + 0.5) * (y1 - y0) / 16 - 0.5
        assert torch.allclose(crops[r, 0], cols[None].expand(16, 16), atol=1e-4)
        assert torch.allclose(crops[r, 1], rows[:, None].expand(16, 16), atol=1e-4)
        assert torch.allclose(crops[r, 2], torch.full((16, 16), 7.0))
    z = standardize_crops(crops)
    assert torch.allclose(z.mean((2, 3))[:, :2], torch.zeros(2, 2), atol=1e-5)
    assert torch.allclose(z.std((2, 3))[:, :2], torch.ones(2, 2), atol=1e-5)
    assert torch.isfinite(z).all() and (z[:, 2] == 0).all()  # a flat channel stays flat, not noise


def _disk(side, radius):
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = (side - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= radius ** 2


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize("image_features", ["none", "raw"])
def test_image_channels_pull_the_contour_to_the_image_edge(image_features):
    """phi_0 a disk of radius 14 px around a bright disk of radius 10 px in the crop; the head's own
    embedding is constant (no information). Only with the image channels do the three steps at
    their starting values move the zero level towards the bright disk's edge."""
    torch.manual_seed(0)
    S = 56
    head = LevelSetMaskHead(
        ShapeSpec(channels=16, height=14, width=14), num_classes=1, conv_dims=[16, 16],
        hyperparam_conv_dims=[16], hyperparam_fc_dim=16, features_conv_dims=[16], embed_channels=8,
        evolution_resolution=S, truncation=5.0, image_features=image_features,
    ).eval()
    torch.nn.init.zeros_(head.chan_vese_features.embedding.weight)
    torch.nn.init.zeros_(head.chan_vese_features.embedding.bias)
    target, start = _disk(S, 10), _disk(S, 14)
    crops = (target.float() * 100.0 + 20.0).expand(2, 3, S, S).clone()  # two RoIs, any brightness
    phi0 = levelset.mask_to_tsdf(start.expand(2, S, S), 5.0)[:, None]
    x = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        outputs = head.layers(x, crops) if image_features == "raw" else head.layers(x)
        phin = head.evolve(phi0, outputs)
    assert phin.abs().max() <= 1.0 + 1e-6  # bounded like the targets
    iou0 = _iou(start, target)  # 0.51: 10^2 / 14^2 of the disks
    ious = [_iou(phin[r, 0] > 0, target) for r in range(2)]
    if image_features == "raw":
        assert all(v > iou0 + 0.25 for v in ious), (iou0, ious)
    else:
        assert all(abs(v - iou0) < 0.1 for v in ious), (iou0, ious)  # curvature alone barely moves it


def test_roi_heads_pass_the_crops_of_the_normalised_input(coco_sample_dir):
    """The crops the head receives are RoIAlign of (pixel - PIXEL_MEAN) / PIXEL_STD at the boxes it
    predicts masks for, in training (foreground proposals) and inference (detections)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    cfg = tiny_cfg(*IMAGE_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    S = cfg.MODEL.LEVELSET.EVOLUTION_RESOLUTION
    assert head.image_crop_resolution == S
    seen = []
    head.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    record = DatasetCatalog.get("coco_sample_val2017")[0]
    image = torch.as_tensor(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1)
    image = image[:, :160, :224].float()  # a multiple of the FPN's 32: the batch is not padded
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    normalised = ((image - mean) / std)[None]

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image}])
    (x, instances), kwargs = seen[-1]
    boxes = instances[0].pred_boxes.tensor
    assert len(boxes) > 0 and x.shape[0] == len(boxes)
    expected = roi_align(normalised, [boxes], output_size=S, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    assert torch.allclose(kwargs["image_crops"], expected, atol=1e-5)
    assert out["instances"].pred_masks.shape[1:] == (160, 224)
    # The same through forward_with_given_boxes, with the image put beside the features by hand.
    dets = Instances((160, 224), pred_boxes=instances[0].pred_boxes.clone(), pred_classes=instances[0].pred_classes.clone())
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        model.roi_heads.forward_with_given_boxes(with_image(model.backbone(images.tensor), images), [dets])
    assert torch.allclose(seen[-1][1]["image_crops"], expected, atol=1e-5)

    model.train()
    gt = Instances((160, 224), gt_boxes=Boxes(torch.tensor([[20.0, 30.0, 120.0, 140.0]])),
                   gt_classes=torch.tensor([3]))
    from detectron2.structures import BitMasks

    m = torch.zeros(1, 160, 224, dtype=torch.bool)
    m[0, 40:130, 30:110] = True
    gt.gt_masks = BitMasks(m)
    with EventStorage():
        losses = model([{"image": image, "instances": gt}])
    (x, instances), kwargs = seen[-1]
    boxes = instances[0].proposal_boxes.tensor
    assert x.shape[0] == len(boxes) == kwargs["image_crops"].shape[0] > 0
    assert (instances[0].gt_classes == 3).all()  # foreground proposals only, as the mask pooler's
    expected = roi_align(normalised, [boxes], output_size=S, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    assert torch.allclose(kwargs["image_crops"], expected, atol=1e-5)
    assert torch.isfinite(losses["loss_tsdf_final"]) and losses["loss_tsdf_final"] > 0
    losses["loss_tsdf_final"].backward()
    assert sum(float(p.grad.abs().sum()) for p in head.chan_vese_features.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("image_features", ["none", "raw"])
def test_tta_passes_the_image_crop_and_averages_phi_n_for_polygons(image_features, coco_sample_dir):
    """Trainer.test_with_TTA's model (LevelSetRCNNWithTTA): with the image crop too, and pred_tsdf
    is phi_N of the merged boxes averaged over the augmentations (here the image and its mirror
    image, whose phi_N is flipped back), so polygons can be written."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from levelset_rcnn import LevelSetRCNNWithTTA, add_polygons

    opts = (IMAGE_OPTS if image_features == "raw" else []) + [
        "MODEL.LEVELSET.RETURN_POLYGONS", True, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "TEST.DETECTIONS_PER_IMAGE", 5, "TEST.AUG.FLIP", True,
        "TEST.AUG.MIN_SIZES", (160,), "TEST.AUG.MAX_SIZE", 256]  # the image's own size: no resize
    cfg = tiny_cfg(*opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("coco_sample_val2017")[0]
    image = torch.as_tensor(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1)
    image = image[:, :160, :224].contiguous()
    tta = LevelSetRCNNWithTTA(cfg, model)
    with torch.no_grad():
        (out,) = tta([{"image": image, "height": 160, "width": 224}])
        inst = out["instances"]
        assert len(inst) > 0 and inst.has("pred_tsdf") and inst.pred_masks.shape[1:] == (160, 224)

        def phi_n(img, boxes):
            dets = Instances((160, 224), pred_boxes=Boxes(boxes), pred_classes=inst.pred_classes)
            images = model.preprocess_image([{"image": img}])
            (res,) = model.roi_heads.forward_with_given_boxes(with_image(model.backbone(images.tensor), images), [dets])
            return res.pred_tsdf

        boxes = inst.pred_boxes.tensor
        mirrored = torch.stack([224 - boxes[:, 2], boxes[:, 1], 224 - boxes[:, 0], boxes[:, 3]], dim=1)
        expected = (phi_n(image, boxes) + phi_n(image.flip(-1), mirrored).flip(-1)) / 2
    assert torch.allclose(inst.pred_tsdf, expected, atol=1e-5)
    polygons = add_polygons(inst).pred_polygons
    assert len(polygons) == len(inst) and any(len(p) > 0 for p in polygons)


def test_checkpoints_are_interchangeable_and_misconfiguration_is_named():
    """LevelSetROIHeads adds no parameters: a StandardROIHeads checkpoint loads as is. A head that
    needs crops without the ROI heads that pass them fails when built, naming the key."""
    plain, image = build_model(tiny_cfg()), build_model(tiny_cfg(*IMAGE_OPTS))
    a, b = plain.state_dict(), image.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    image.load_state_dict(a)  # strict
    with pytest.raises(ValueError, match="ROI_HEADS.NAME: LevelSetROIHeads"):
        build_model(tiny_cfg("MODEL.LEVELSET.IMAGE_FEATURES", "raw"))
    with pytest.raises(ValueError, match="IMAGE_FEATURES must be"):
        build_model(tiny_cfg("MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "edges"))
    head = image.roi_heads.mask_head.eval()
    pred = Instances((64, 64), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0]])), pred_classes=torch.tensor([0]))
    with pytest.raises(ValueError, match="image\\s+crops"):
        head(torch.randn(1, 256, 14, 14), [pred])
    with pytest.raises(ValueError, match="with_image"):
        image.eval()
        image.roi_heads.forward_with_given_boxes({}, [pred])
