"""The paper's Chan-Vese feature path, remedied (issue #21 item 4): the embedding F standardised per
RoI and channel with a learned, floored gain (MODEL.LEVELSET.STANDARDIZE_FEATURES), and F read from
the RoIs pooled again at 28 x 28 from p2 (MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION)."""
import math

import pytest
import torch
from torchvision.ops import roi_align

import levelset
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from _configs import tiny_cfg
from levelset_rcnn.mask_head import LevelSetMaskHead, hyperparameter_starts, standardize_embedding

FINE_OPTS = ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION", 28,
             "MODEL.LEVELSET.STANDARDIZE_FEATURES", True]


def test_standardised_embedding_has_the_gain_as_its_spread_and_never_less_than_the_floor():
    torch.manual_seed(0)
    C = 8
    x = torch.randn(3, C, 10, 10) * (torch.rand(3, C, 1, 1) * 5 + 0.5) + torch.randn(3, C, 1, 1) * 3
    for raw, gain in ((0.0, 1.0), (-100.0, 0.25), (3.0, 0.25 + 0.75 * math.log1p(math.exp(3.0)) / math.log(2.0))):
        y = standardize_embedding(x, torch.full((C,), raw), 0.25)
        assert torch.allclose(y.mean((2, 3)), torch.zeros(3, C), atol=1e-4)
        assert torch.allclose(y.std((2, 3)), torch.full((3, C), gain / math.sqrt(C)), rtol=1e-4), raw
    flat = standardize_embedding(torch.ones(1, C, 4, 4), torch.zeros(C), 0.25)
    assert torch.isfinite(flat).all() and (flat == 0).all()  # a constant channel stays 0, not noise


def _disk(side, radius):
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    c = (side - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= radius ** 2


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def test_a_weak_embedding_moves_the_contour_only_once_standardised():
    """F carries the object (a disk of radius 10 px on the 56 px grid) at 1e-2 of unit scale, as an
    untrained 1x1 conv can; phi_0 is a disk of radius 14 px. At the starting hyperparameters (data
    term ~2 -> ~1.3 px per step, config.py) the raw F leaves the contour where phi_0 put it (under
    0.5 px of movement); standardised, the same F pulls it at least 1.5 px inward in the 3 steps.
    A contour of radius r around the target has IoU 10^2 / r^2."""
    S = 56
    head = LevelSetMaskHead(
        ShapeSpec(channels=16, height=14, width=14), num_classes=1, conv_dims=[16], hyperparam_conv_dims=[16],
        hyperparam_fc_dim=16, features_conv_dims=[16], embed_channels=8, evolution_resolution=S, truncation=5.0,
    ).eval()
    assert head.num_steps == 3
    target, start = _disk(S, 10), _disk(S, 14)
    weak = 1e-2 * target.float().expand(1, 8, S, S)
    phi0 = levelset.mask_to_tsdf(start[None], 5.0)[:, None]
    hyper = hyperparameter_starts([1.0, 1.0, 0.5, 2.0, 4.0], head.num_steps)[None]
    with torch.no_grad():
        raw = head.evolve(phi0, {"chan_vese_features": weak, "hyperparameters": hyper})
        std = head.evolve(phi0, {"chan_vese_features": standardize_embedding(weak, torch.zeros(8), 0.25),
                                 "hyperparameters": hyper})
    iou_raw, iou_std = _iou(raw[0, 0] > 0, target), _iou(std[0, 0] > 0, target)
    assert iou_raw < 10 ** 2 / 13.5 ** 2, iou_raw
    assert iou_std > 10 ** 2 / 12.5 ** 2, iou_std


def test_roi_heads_pool_p2_at_28_for_the_features_head_in_training_and_inference(coco_sample_dir):
    """The fine features the head receives are RoIAlign (aligned, the mask pooler's sampling) of p2
    at the boxes it predicts masks for; the embedding is 56 x 56; the loss reaches the features
    head's gain and its first conv."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    torch.manual_seed(0)
    cfg = tiny_cfg(*FINE_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    seen, embeddings = [], []
    head.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    head.chan_vese_features.register_forward_hook(lambda m, args, out: embeddings.append(out))
    record = DatasetCatalog.get("coco_sample_val2017")[0]
    image = torch.as_tensor(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1)
    image = image[:, :160, :224].float()  # a multiple of the FPN's 32: the batch is not padded

    def expected(boxes):
        with torch.no_grad():
            p2 = model.backbone(model.preprocess_image([{"image": image}]).tensor)["p2"]
        return roi_align(p2, [boxes], output_size=28, spatial_scale=0.25,
                         sampling_ratio=cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO, aligned=True)

    model.eval()
    with torch.no_grad():
        model([{"image": image}])
    (x, instances), kwargs = seen[-1]
    boxes = instances[0].pred_boxes.tensor
    assert len(boxes) > 0 and kwargs["fine_features"].shape == (len(boxes), x.shape[1], 28, 28)
    assert torch.allclose(kwargs["fine_features"], expected(boxes), atol=1e-5)
    assert embeddings[-1].shape[-2:] == (56, 56)

    model.train()
    m = torch.zeros(1, 160, 224, dtype=torch.bool)
    m[0, 40:130, 30:110] = True
    gt = Instances((160, 224), gt_boxes=Boxes(torch.tensor([[20.0, 30.0, 120.0, 140.0]])),
                   gt_classes=torch.tensor([3]), gt_masks=BitMasks(m))
    with EventStorage():
        losses = model([{"image": image, "instances": gt}])
    (x, instances), kwargs = seen[-1]
    boxes = instances[0].proposal_boxes.tensor
    assert (instances[0].gt_classes == 3).all() and len(boxes) == kwargs["fine_features"].shape[0] > 0
    assert torch.allclose(kwargs["fine_features"], expected(boxes), atol=1e-4)
    losses["loss_tsdf_final"].backward()
    features = head.chan_vese_features
    assert features.gain.grad is not None and features.gain.grad.abs().sum() > 0
    assert features.convs[0].weight.grad.abs().sum() > 0


def test_misconfigurations_are_named():
    with pytest.raises(ValueError, match="FEATURES_POOLER_RESOLUTION 28 needs MODEL.ROI_HEADS.NAME: LevelSetROIHeads"):
        build_model(tiny_cfg("MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION", 28))
    with pytest.raises(ValueError, match="NORMALIZE_FEATURES and STANDARDIZE_FEATURES"):
        build_model(tiny_cfg("MODEL.LEVELSET.NORMALIZE_FEATURES", True, "MODEL.LEVELSET.STANDARDIZE_FEATURES", True))
    with pytest.raises(ValueError, match="FEATURES_GAIN_FLOOR"):
        build_model(tiny_cfg("MODEL.LEVELSET.STANDARDIZE_FEATURES", True, "MODEL.LEVELSET.FEATURES_GAIN_FLOOR", 0.0))
    with pytest.raises(ValueError, match="FEATURES_IN_FEATURE 'p9'"):
        build_model(tiny_cfg(*FINE_OPTS, "MODEL.LEVELSET.FEATURES_IN_FEATURE", "p9"))
    head = build_model(tiny_cfg(*FINE_OPTS)).roi_heads.mask_head.eval()
    pred = Instances((64, 64), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0]])), pred_classes=torch.tensor([0]))
    with pytest.raises(ValueError, match="fine features, got None"):
        head(torch.randn(1, head.chan_vese_features.convs[0].in_channels, 14, 14), [pred])
