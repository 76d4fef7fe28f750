"""LevelSet R-CNN heads, targets, losses, inference and checkpoint loading (CPU, tiny configs)."""
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

import levelset
import levelset_rcnn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from levelset_rcnn.mask_head import (
    GlobalHyperparameters,
    HighResMaskRCNNHead,
    LevelSetMaskHead,
    conv1x1,
    split_hyperparameters,
    tsdf_loss,
    tsdf_targets,
)
from levelset_rcnn.postprocessing import polygons_to_coco, tsdf_to_polygons

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "LevelSetRCNN"


def tiny_cfg(name="tiny_levelset_rcnn_coco_sample.yaml", *opts):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def small_head(**kwargs):
    args = dict(
        num_classes=3, conv_dims=[16, 16], hyperparam_conv_dims=[16], hyperparam_fc_dim=16,
        features_conv_dims=[16], embed_channels=8, evolution_resolution=56, truncation=5.0,
    )
    args.update(kwargs)
    return LevelSetMaskHead(ShapeSpec(channels=16, height=14, width=14), **args)


@pytest.fixture(scope="module")
def coco_batch(coco_sample_dir):
    """Two real COCO val2017 images (polygons) through Detectron2's training mapper."""
    cfg = tiny_cfg()
    dicts = DatasetCatalog.get("coco_sample_val2017")
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    batch = [mapper(d) for d in dicts if len(d["annotations"]) >= 3][:2]
    assert len(batch) == 2
    return batch


def test_registration_and_config_keys():
    for name in ["LevelSetMaskHead", "TSDFMaskRCNNHead", "HighResMaskRCNNHead", "DELSEMaskHead"]:
        cfg = tiny_cfg("tiny_levelset_rcnn_synthetic.yaml", "MODEL.ROI_MASK_HEAD.NAME", name)
        head = build_mask_head(cfg, ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, height=14, width=14))
        assert type(head).__name__ == name
    for name in ["synthetic_shapes_train", "synthetic_shapes_val", "dsb2018_train", "dsb2018_dev",
                 "coco_sample_val2017"]:
        assert name in DatasetCatalog.list()
    assert MetadataCatalog.get("synthetic_shapes_train").thing_classes == ["disc", "ring", "blob", "pair"]
    cfg = levelset_rcnn.get_cfg()
    ls = cfg.MODEL.LEVELSET
    assert (ls.EVOLUTION_STEPS, ls.EMBED_CHANNELS, ls.EVOLUTION_RESOLUTION, ls.TSDF_RESOLUTION) == (3, 64, 112, 28)
    assert (ls.LOSS_WEIGHT_PHI0, ls.LOSS_WEIGHT_PHIN, ls.LOSS_EPS) == (0.2, 1.0, 0.1)
    # Every config of the project merges into get_cfg() (no undeclared key anywhere).
    for path in sorted(CONFIGS.rglob("*.yaml")):
        c = levelset_rcnn.get_cfg()
        c.merge_from_file(str(path))


def test_a_config_saved_with_the_old_step_key_names_is_read_with_a_warning(tmp_path, caplog):
    saved = tmp_path / "config.yaml"
    saved.write_text("MODEL:\n  LEVELSET:\n    NUM_STEPS: 2\n    DELSE_HEAD:\n      STEPS: 7\n")
    cfg = levelset_rcnn.get_cfg()
    with caplog.at_level(logging.WARNING, logger="levelset_d2.config"):
        cfg.merge_from_file(str(saved))
        cfg.merge_from_list(["MODEL.LEVELSET.NUM_STEPS", 4])
    assert (cfg.MODEL.LEVELSET.EVOLUTION_STEPS, cfg.MODEL.LEVELSET.DELSE_HEAD.EVOLUTION_STEPS) == (4, 7)
    assert "NUM_STEPS" not in cfg.MODEL.LEVELSET and "STEPS" not in cfg.MODEL.LEVELSET.DELSE_HEAD
    assert caplog.text.count("MODEL.LEVELSET.NUM_STEPS is now MODEL.LEVELSET.EVOLUTION_STEPS") == 2
    assert "MODEL.LEVELSET.DELSE_HEAD.STEPS is now MODEL.LEVELSET.DELSE_HEAD.EVOLUTION_STEPS" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text("MODEL:\n  LEVELSET:\n    NUM_STEPS: 2\n    EVOLUTION_STEPS: 3\n")
    with pytest.raises(KeyError, match="both MODEL.LEVELSET.NUM_STEPS and its new name"):
        levelset_rcnn.get_cfg().merge_from_file(str(both))


def test_head_layer_shapes_and_ranges():
    head = small_head(num_steps=3)
    x = torch.randn(5, 16, 14, 14)
    out = head.layers(x)
    assert out["initial_tsdf_logits"].shape == (5, 3, 28, 28)
    # phi_0 of each RoI's class: tanh of that class's logits, bilinearly upsampled to S.
    classes = torch.tensor([0, 2, 1, 1, 0])
    phi0 = head.initial_phi(out["initial_tsdf_logits"], classes)
    assert phi0.shape == (5, 1, head.evolution_resolution, head.evolution_resolution)
    expected = F.interpolate(torch.tanh(out["initial_tsdf_logits"])[torch.arange(5), classes][:, None],
                             size=head.evolution_resolution, mode="bilinear", align_corners=False)
    assert torch.allclose(phi0, expected, atol=1e-6) and phi0.abs().max() <= 1.0
    assert out["hyperparameters"].shape == (5, 2 * 3 + 3)
    # Starting values (cfg.MODEL.LEVELSET.HYPERPARAM_INIT defaults): lambda1, lambda2, mu, eps x3, dt x3.
    starts = torch.tensor([1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0])
    assert torch.allclose(out["hyperparameters"], starts.expand(5, -1), rtol=1e-2)
    # Unit L2 norm per pixel of the Chan-Vese features (where the embedding is not exactly zero).
    assert torch.equal(out["chan_vese_features"], head.chan_vese_features(x))  # NORMALIZE_FEATURES off
    head.normalize_features = True
    raw_norm = head.chan_vese_features(x).norm(dim=1)
    norm = head.layers(x)["chan_vese_features"].norm(dim=1)
    assert (raw_norm > 1e-3).float().mean() > 0.9
    assert torch.allclose(norm[raw_norm > 1e-3], torch.tensor(1.0), atol=1e-5)
    # Coarse embedding (2x the 14x14 RoI); the evolution uses its exact bilinear upsampling to S.
    assert out["chan_vese_features"].shape == (5, 8, 28, 28)
    hp = split_hyperparameters(out["hyperparameters"], 3)
    assert hp["lambda1"].shape == (5,) and hp["eps"].shape == (5, 3) and hp["dt"].shape == (5, 3)

    head = small_head(num_steps=2, hyperparam_mode="global")
    assert isinstance(head.hyperparameter_head, GlobalHyperparameters)
    h = head.layers(torch.randn(4, 16, 14, 14))["hyperparameters"]
    assert h.shape == (4, 7)
    assert torch.allclose(h, torch.tensor([1.0, 1.0, 0.5, 2.0, 2.0, 4.0, 4.0]).expand(4, -1))


@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_equals_the_convolution_and_its_gradients(bias):
    """The features head's 1 x 1 embedding as a matrix product: same values and gradients as the conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, kernel_size=1, bias=bias)
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    y = conv1x1(conv, x)
    assert torch.allclose(y, conv(x), atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *conv.parameters()])
    expected = torch.autograd.grad((conv(x) * g).sum(), [x, *conv.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected))
    assert conv1x1(conv, torch.zeros(0, 6, 5, 7)).shape == (0, 4, 5, 7)


def test_features_head_can_share_the_tsdf_convs():
    """FEATURES_INPUT "tsdf_convs": the embedding reads the initial TSDF head's conv stack (one
    computation for both), phi_0 stays Detectron2's mask head layers + tanh, and the phi_N loss
    reaches the shared convs through the embedding too."""
    torch.manual_seed(0)
    head = small_head(features_input="tsdf_convs", features_conv_dims=[]).train()
    x = torch.randn(5, 16, 14, 14)
    out = head.layers(x)
    d2 = head.initial_tsdf_head
    assert torch.allclose(out["initial_tsdf_logits"], d2.layers(x), atol=1e-6)
    convs = d2.mask_fcn1(x)  # small_head: one conv, then the deconv
    assert torch.allclose(out["chan_vese_features"], head.chan_vese_features(convs), atol=1e-6)
    assert len(head.chan_vese_features.convs) == 0  # only its deconv and 1x1 of its own
    # The gradient of the features alone (phi_0's path cut) reaches the conv stack, not the TSDF deconv.
    out["chan_vese_features"].square().sum().backward()
    assert d2.mask_fcn1.weight.grad.abs().sum() > 0
    assert d2.deconv.weight.grad is None
    # The default reads the RoI features: the conv stack gets no gradient from the features.
    head = small_head().train()
    head.layers(x)["chan_vese_features"].square().sum().backward()
    assert head.initial_tsdf_head.mask_fcn1.weight.grad is None
    with pytest.raises(ValueError, match="FEATURES_INPUT"):
        small_head(features_input="mask")
    cfg = levelset_rcnn.get_cfg()
    assert cfg.MODEL.LEVELSET.FEATURES_INPUT == "roi"  # the paper's Fig. 1


def test_hyperparameters_are_bounded_by_floor_and_start():
    from levelset_rcnn.mask_head import bounded_positive, hyperparameter_starts

    start = hyperparameter_starts([1.0, 1.0, 0.5, 2.0, 4.0], 2)
    assert start.tolist() == [1.0, 1.0, 0.5, 2.0, 2.0, 4.0, 4.0]
    raw = torch.tensor([[-1e4] * 7, [0.0] * 7, [1e4] * 7])
    v = bounded_positive(raw, start, 0.1)
    assert torch.allclose(v[0], 0.1 * start) and torch.allclose(v[1], start) and torch.allclose(v[2], 1.9 * start)
    # floor 0 is 2 * sigmoid times the start: the parametrisation before HYPERPARAM_FLOOR existed.
    r = torch.randn(3, 7)
    assert torch.allclose(bounded_positive(r, torch.ones(7), 0.0), 2 * torch.sigmoid(r))
    with pytest.raises(ValueError, match="HYPERPARAM_INIT"):
        hyperparameter_starts([1.0, 1.0, 0.5, 2.0], 3)


def test_evolution_in_pixels_is_bounded_and_finite_on_flat_and_saturated_phi0():
    torch.manual_seed(0)
    head = small_head(num_steps=3)  # truncation 5 px on a 56 x 56 grid
    head.train()
    x = torch.randn(2, 16, 14, 14)
    flat = torch.zeros(2, 1, 56, 56)  # phi_0 at initialisation (tanh of ~0)
    saturated = torch.cat([torch.ones(1, 1, 56, 56), -torch.ones(1, 1, 56, 56)])  # beyond the truncation
    for phi0 in (flat, saturated):
        phi0 = phi0.clone().requires_grad_()
        out = head.layers(x)
        # Strong features: the data term alone would take phi far beyond the truncation.
        out["chan_vese_features"] = out["chan_vese_features"] * 50
        phin = head.evolve(phi0, out)
        assert phin.abs().max() <= 1.0 + 1e-6  # bounded like the targets (BOUND_PHI)
        assert phin.abs().max() > 0.5  # ... and it did move (the bound is what stopped it)
        (phin * torch.randn_like(phin)).sum().backward()
        assert torch.isfinite(phi0.grad).all()
        grads = [p.grad for p in head.hyperparameter_head.parameters()] + [p.grad for p in head.chan_vese_features.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        head.zero_grad()


def test_relative_grad_eps_bounds_the_curvature_gradient_on_flat_phi():
    """On a nearly flat phi (|grad phi| ~ 0.01) the curvature's derivative grows like 1 / grad_eps."""
    g = torch.Generator().manual_seed(0)
    phi = 0.01 * torch.randn(1, 1, 32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, 32, 32, generator=g, dtype=torch.float64)

    def grad_norm(grad_eps):
        p = phi.clone().requires_grad_()
        (levelset.curvature(p, "sobel", grad_eps) * w).sum().backward()
        return p.grad.abs().max().item()

    small, relative = grad_norm(1e-3), grad_norm(0.1)
    assert small > 5 * relative  # the old absolute 1e-3 amplifies noise on plateaus
    # With grad_eps = 0.1 the unit normal is ~grad phi / 0.1: the derivative is that of a Sobel
    # Laplacian-like stencil (coefficients <= 1 in sum) over 0.1, times the weights' size.
    assert relative <= 10.0 * w.abs().max().item() * 2


def test_highres_mask_rcnn_head_outputs_112():
    head = HighResMaskRCNNHead(ShapeSpec(channels=16, height=14, width=14), num_classes=2,
                               conv_dims=[16, 16], output_resolution=112)
    assert head.layers(torch.randn(3, 16, 14, 14)).shape == (3, 2, 112, 112)


def test_tsdf_targets_on_real_coco_polygons(coco_sample_dir):
    dicts = DatasetCatalog.get("coco_sample_val2017")
    d = max(dicts, key=lambda d: len(d["annotations"]))
    annos = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
    inst = utils.annotations_to_instances(annos, (d["height"], d["width"]), mask_format="polygon")
    # Proposals: GT boxes shifted and enlarged, so the crop is not the trivial one.
    boxes = inst.gt_boxes.tensor.clone()
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes[:, :2] -= 0.2 * wh
    boxes[:, 2:] += 0.1 * wh
    inst.proposal_boxes = Boxes(boxes)
    masks, tsdf = tsdf_targets([inst], 112, 10.0)
    assert masks.shape == tsdf.shape == (len(inst), 112, 112)
    # Independent oracle for the crop: scikit-image rasterises each json polygon, mapped to the
    # RoI's 112 x 112 grid, at the pixel centres (pycocotools, which Detectron2 uses, rasterises
    # edges slightly differently: a few boundary pixels in 10^3 may differ).
    for a, m, box in zip(annos, masks.numpy(), boxes.numpy()):
        expected = _rasterize_in_roi(a["segmentation"], box, 112)
        assert (expected == m).mean() > 0.998
        assert (expected & m).sum() / (expected | m).sum() > 0.99
    # Independent oracle: scipy's exact EDT to the boundary between pixels (0.5 px less than
    # between pixel centres), truncated at 10 px and normalised.
    for m, t in zip(masks.numpy(), tsdf.numpy()):
        sdf = np.where(m, ndimage.distance_transform_edt(m) - 0.5, 0.5 - ndimage.distance_transform_edt(~m))
        np.testing.assert_allclose(t, np.clip(sdf, -10, 10) / 10, atol=1e-5)
        assert ((t > 0) == m).all()


def test_tsdf_loss_is_stable_and_prefers_the_target():
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 10:20] = True
    gt = levelset.mask_to_tsdf(mask, 4.0)
    good = tsdf_loss(gt[:, None], gt, mask, 0.1)
    bad = tsdf_loss(-gt[:, None], gt, mask, 0.1)
    assert good < bad
    # By hand (section 4.2): mean |phi - phi_GT| + mean BCE(0.5 + atan(phi / eps) / pi, M).
    g, m = gt.double().numpy(), mask.numpy()

    def by_hand(phi):
        h = 0.5 + np.arctan(phi / 0.1) / np.pi
        return np.abs(phi - g).mean() - np.where(m, np.log(h), np.log(1 - h)).mean()

    assert math.isclose(float(good), by_hand(g), rel_tol=1e-5)
    assert math.isclose(float(bad), by_hand(-g), rel_tol=1e-5)
    # phi = 0: H = 1/2 everywhere, so the loss is mean |phi_GT| + log 2.
    zero = tsdf_loss(torch.zeros_like(gt[:, None]), gt, mask, 0.1)
    assert math.isclose(float(zero), np.abs(g).mean() + math.log(2), rel_tol=1e-5)
    phi = (1e4 * -gt[:, None]).requires_grad_()  # confidently wrong everywhere
    loss = tsdf_loss(phi, gt, mask, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(phi.grad).all()


def test_head_training_loss_and_inference_shapes():
    torch.manual_seed(0)
    head = small_head(num_steps=2, return_tsdf=True)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 5.0, 50.0, 60.0]])
    from detectron2.structures import BitMasks

    m = torch.zeros(2, 64, 64, dtype=torch.bool)
    m[0, 5:30, 5:30] = True
    m[1, 20:50, 15:45] = True
    inst = Instances((64, 64), proposal_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]),
                     gt_masks=BitMasks(m))
    head.train()
    with EventStorage():
        losses = head(torch.randn(2, 16, 14, 14), [inst])
    assert set(losses) == {"loss_tsdf_initial", "loss_tsdf_final"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    head.eval()
    pred = Instances((64, 64), pred_boxes=Boxes(boxes), pred_classes=torch.tensor([1, 0]))
    with torch.no_grad():
        (out,) = head(torch.randn(2, 16, 14, 14), [pred])
    assert out.pred_masks.shape == (2, 1, 56, 56)
    assert out.pred_tsdf.shape == (2, 1, 56, 56)
    # pred_masks = H_eps(phi_N) of eq. 4, written out: 0.5 (1 + 2/pi atan(phi / eps)), eps = LOSS_EPS.
    phi = out.pred_tsdf.double().numpy()
    np.testing.assert_allclose(out.pred_masks.numpy(), 0.5 * (1 + 2 / np.pi * np.arctan(phi / 0.1)), atol=1e-6)
    # The masks cut phi's zero level; within float32 rounding of it (|phi| << eps) H_eps is 0.5 exactly.
    decided = out.pred_tsdf.abs() > 1e-6
    assert ((out.pred_masks > 0.5) == (out.pred_tsdf > 0))[decided].all() and (out.pred_tsdf > 0).any()


def _rasterize_in_roi(polygons, box, side):
    """(side, side) bool: the union of COCO polygons (image coordinates) mapped to the box's grid,
    a pixel inside where its centre is (scikit-image's point-in-polygon test)."""
    from skimage.draw import polygon2mask

    x0, y0, x1, y1 = box
    out = np.zeros((side, side), bool)
    for p in polygons:
        p = np.asarray(p, np.float64).reshape(-1, 2)
        rows = (p[:, 1] - y0) * side / (y1 - y0) - 0.5
        cols = (p[:, 0] - x0) * side / (x1 - x0) - 0.5
        out |= polygon2mask((side, side), np.stack([rows, cols], axis=1))
    return out


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("detach", [False, True])
def test_final_tsdf_gradient_reaches_all_heads(coco_batch, detach):
    torch.manual_seed(0)
    cfg = tiny_cfg("tiny_levelset_rcnn_coco_sample.yaml", "MODEL.LEVELSET.DETACH_PHI0", detach)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(coco_batch)
    losses["loss_tsdf_final"].backward()  # only the phi_N loss
    head = model.roi_heads.mask_head
    assert _grad_norm(head.hyperparameter_head) > 0
    assert _grad_norm(head.chan_vese_features) > 0
    assert _grad_norm(model.backbone.bottom_up) > 0
    assert (_grad_norm(head.initial_tsdf_head) > 0) != detach


@pytest.mark.slow
def test_a_few_iterations_reduce_the_loss(coco_batch):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mask_losses = []
    with EventStorage():
        for _ in range(12):
            losses = model(coco_batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            mask_losses.append((losses["loss_tsdf_initial"] + losses["loss_tsdf_final"]).item())
    assert np.mean(mask_losses[-2:]) < 0.9 * np.mean(mask_losses[:2]), mask_losses


def test_polygons_are_the_zero_level_set_in_image_coordinates():
    side = 112
    yy, xx = np.mgrid[:side, :side] + 0.5
    r = np.hypot(xx - 56, yy - 56)
    ring = np.minimum(40 - r, r - 20)[None, None]  # annulus: positive for 20 < r < 40
    box = Boxes(torch.tensor([[100.0, 50.0, 212.0, 274.0]]))  # x scale 1, y scale 2
    (contours,) = tsdf_to_polygons(torch.tensor(ring, dtype=torch.float32), box)
    assert len(contours) == 2  # outer boundary and the hole
    radii = []
    for c in contours:
        # back to the RoI grid: x = 100 + u, y = 50 + 2 v (u, v in grid pixels, centres at +0.5)
        u, v = c[:, 0] - 100, (c[:, 1] - 50) / 2
        radii.append(np.hypot(u - 56, v - 56))
    radii = sorted(radii, key=np.mean)
    np.testing.assert_allclose(radii[0], 20, atol=0.3)
    np.testing.assert_allclose(radii[1], 40, atol=0.3)
    coco = polygons_to_coco(contours)
    assert len(coco) == 2 and all(len(p) % 2 == 0 and len(p) >= 6 for p in coco)


def test_mask_rcnn_checkpoint_loads_with_new_heads_reported(tmp_path, caplog):
    torch.manual_seed(0)
    mask_rcnn = build_model(tiny_cfg("tiny_mask_rcnn_synthetic.yaml"))
    DetectionCheckpointer(mask_rcnn, save_dir=str(tmp_path)).save("mask_rcnn")
    model = build_model(tiny_cfg("tiny_levelset_rcnn_synthetic.yaml"))
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(str(tmp_path / "mask_rcnn.pth"))
    source = mask_rcnn.state_dict()
    shared = [k for k in model.state_dict()
              if k.startswith(("backbone.", "proposal_generator.", "roi_heads.box_"))]
    assert len(shared) > 50
    for key in shared:
        assert torch.equal(model.state_dict()[key], source[key]), key
    log = caplog.text
    assert "not found in the checkpoint" in log
    for new in ["roi_heads.mask_head.hyperparameter_head", "roi_heads.mask_head.chan_vese_features",
                "roi_heads.mask_head.initial_tsdf_head"]:
        assert new in log


def test_tsdf_targets_from_rle_bitmasks_on_dsb2018(dsb2018_dir):
    cfg = tiny_cfg("tiny_levelset_rcnn_synthetic.yaml")
    assert cfg.INPUT.MASK_FORMAT == "bitmask"
    d = DatasetCatalog.get("dsb2018_dev")[0]
    assert isinstance(d["annotations"][0]["segmentation"], dict)  # RLE
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[])
    inst = mapper(d)["instances"]
    inst.proposal_boxes = inst.gt_boxes
    masks, tsdf = tsdf_targets([inst], 112, 10.0)
    assert len(masks) == len(inst) == len(d["annotations"]) > 0
    # Independent oracle: SciPy's bilinear sampling of the decoded RLE at the 112 x 112 grid's
    # pixel centres (half-pixel aligned, edges clamped), thresholded at 0.5, as ROIAlign defines it.
    from pycocotools import mask as mask_util

    for a, m, (x0, y0, x1, y1) in zip(d["annotations"], masks.numpy(), inst.gt_boxes.tensor.numpy()):
        full = mask_util.decode(a["segmentation"]).astype(np.float64)
        ys = y0 + (np.arange(112) + 0.5) * (y1 - y0) / 112 - 0.5
        xs = x0 + (np.arange(112) + 0.5) * (x1 - x0) / 112 - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        expected = ndimage.map_coordinates(full, [yy, xx], order=1, mode="nearest") >= 0.5
        assert (expected == m).mean() > 0.999
    assert ((tsdf > 0) == masks).all()
    # Nuclei fill their boxes: every RoI has an inside and an outside.
    assert (masks.flatten(1).any(1) & ~masks.flatten(1).all(1)).float().mean() > 0.9


def test_head_handles_no_rois_and_initial_tsdf_inference():
    head = small_head(num_steps=2).eval()
    empty = Instances((64, 64), pred_boxes=Boxes(torch.zeros(0, 4)),
                      pred_classes=torch.zeros(0, dtype=torch.int64))
    with torch.no_grad():
        (out,) = head(torch.randn(0, 16, 14, 14), [empty])
    assert out.pred_masks.shape == (0, 1, 56, 56)

    head.train()
    from detectron2.structures import BitMasks

    no_fg = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64),
                      gt_masks=BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool)))
    with EventStorage():
        losses = head(torch.randn(0, 16, 14, 14), [no_fg])
    assert set(losses) == {"loss_tsdf_initial", "loss_tsdf_final"}
    assert all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()  # every parameter gets a (zero) gradient, as DDP requires
    assert all(p.grad is not None for p in head.parameters())

    # INFERENCE_TSDF "initial": pred_masks come from the upsampled phi_0 (Tables 2 and 4).
    torch.manual_seed(0)
    head = small_head(num_steps=2, inference_tsdf="initial").eval()
    x = torch.randn(2, 16, 14, 14)
    pred = Instances((64, 64), pred_boxes=Boxes(torch.tensor([[0.0, 0, 30, 30], [5, 5, 60, 40]])),
                     pred_classes=torch.tensor([2, 0]))
    with torch.no_grad():
        (out,) = head(x, [pred])
        # phi_0 by hand: tanh of the TSDF branch's logits, the predicted class (2, then 0), upsampled
        # 28 -> 56 bilinearly; pred_masks = 0.5 + atan(phi_0 / eps) / pi.
        logits = head.initial_tsdf_head.layers(x)
        phi0 = torch.tanh(torch.stack([logits[0, 2], logits[1, 0]]))[:, None]
        phi0 = F.interpolate(phi0, size=56, mode="bilinear", align_corners=False)
    assert torch.allclose(out.pred_masks, 0.5 + torch.atan(phi0 / 0.1) / math.pi, atol=1e-6)


@pytest.mark.parametrize("head,loss", [("TSDFMaskRCNNHead", "loss_tsdf_initial"),
                                       ("HighResMaskRCNNHead", "loss_mask")])
def test_ablation_heads_train_in_the_full_model(coco_batch, head, loss):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("tiny_levelset_rcnn_coco_sample.yaml", "MODEL.ROI_MASK_HEAD.NAME", head))
    model.train()
    with EventStorage():
        losses = model(coco_batch)
    assert loss in losses and torch.isfinite(losses[loss]) and losses[loss] > 0
    assert "loss_tsdf_final" not in losses
    losses[loss].backward()
    assert _grad_norm(model.roi_heads.mask_head) > 0


@pytest.mark.slow
def test_import_touches_no_disk_and_synthetic_data_is_made_on_first_use(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "synthetic"
    code = (
        "import levelset_rcnn, pathlib, sys\n"
        "from detectron2.data import DatasetCatalog\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "assert not root.exists(), 'import wrote to disk'\n"
        "dicts = DatasetCatalog.get('synthetic_shapes_val')\n"
        "assert len(dicts) == 24 and all(pathlib.Path(d['file_name']).exists() for d in dicts)\n"
        "assert all(str(root) in d['file_name'] for d in dicts)\n"
        "assert sum(len(d['annotations']) for d in dicts) > 24\n"
    )
    env = dict(__import__("os").environ, LEVELSET_DATA=str(root))
    proc = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "val.json").exists()


EXPECTED_HEADS = {
    "levelset_rcnn_R_50_FPN_1x_coco.yaml": "LevelSetMaskHead",
    "mask_rcnn_R_50_FPN_1x_coco.yaml": "MaskRCNNConvUpsampleHead",
    "levelset_rcnn_R_50_FPN_cityscapes.yaml": "LevelSetMaskHead",
    "ablation_tsdf_mask_rcnn_R_50_FPN_cityscapes.yaml": "TSDFMaskRCNNHead",
    "ablation_mask_rcnn_112_R_50_FPN_cityscapes.yaml": "HighResMaskRCNNHead",
    "ablation_global_hyperparams_R_50_FPN_cityscapes.yaml": "LevelSetMaskHead",
    "ablation_detach_phi0_R_50_FPN_cityscapes.yaml": "LevelSetMaskHead",
    "levelset_rcnn_R_18_FPN_GN_dsb2018.yaml": "LevelSetMaskHead",
    "ablation_tsdf_mask_rcnn_R_18_FPN_GN_dsb2018.yaml": "TSDFMaskRCNNHead",
    "levelset_rcnn_image_R_18_FPN_GN_dsb2018.yaml": "LevelSetMaskHead",
    "levelset_rcnn_std_R_50_FPN_coco128.yaml": "LevelSetMaskHead",
    "levelset_rcnn_std_fine_R_50_FPN_coco128.yaml": "LevelSetMaskHead",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADS))
def test_paper_configs_build(name):
    """Each experiment config builds its model (R-50 / R-18, randomly initialised, on CPU)."""
    cfg = tiny_cfg(name)
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert type(head).__name__ == EXPECTED_HEADS[name]
    ls = cfg.MODEL.LEVELSET
    if isinstance(head, LevelSetMaskHead):
        assert head.detach_phi0 == ls.DETACH_PHI0
        assert isinstance(head.hyperparameter_head, GlobalHyperparameters) == (ls.HYPERPARAM_MODE == "global")
        assert (head.loss_weight_phi0, head.loss_weight_phin) == (ls.LOSS_WEIGHT_PHI0, ls.LOSS_WEIGHT_PHIN)
        assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED
        assert (head.chan_vese_features.gain is not None) == ls.STANDARDIZE_FEATURES
        assert head.features_pooler_resolution == ls.FEATURES_POOLER_RESOLUTION
        if ls.FEATURES_POOLER_RESOLUTION:
            assert model.roi_heads.features_pooler is not None
    if isinstance(head, HighResMaskRCNNHead):
        assert head.layers(torch.randn(1, 256, 14, 14)).shape[-1] == 112
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES


def test_dsb2018_tsdf_ablation_matches_levelset_rcnn():
    """The DSB2018 'TSDF head alone' ablation differs from LevelSet R-CNN only in its mask head, and
    its phi_0 loss weight is the total LevelSet R-CNN puts on phi_0 while its steps stay near the identity."""
    def load(name):
        cfg = levelset_rcnn.get_cfg()
        cfg.merge_from_file(str(CONFIGS / name))
        return cfg

    ls, ab = load("levelset_rcnn_R_18_FPN_GN_dsb2018.yaml"), load("ablation_tsdf_mask_rcnn_R_18_FPN_GN_dsb2018.yaml")
    assert ab.MODEL.LEVELSET.LOSS_WEIGHT_PHI0 == ls.MODEL.LEVELSET.LOSS_WEIGHT_PHI0 + ls.MODEL.LEVELSET.LOSS_WEIGHT_PHIN
    for key in ("SOLVER", "INPUT", "DATASETS", "MODEL.RESNETS", "MODEL.ROI_HEADS", "MODEL.ANCHOR_GENERATOR"):
        a, b = ls, ab
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    assert (ls.MODEL.ROI_MASK_HEAD.NAME, ab.MODEL.ROI_MASK_HEAD.NAME) == ("LevelSetMaskHead", "TSDFMaskRCNNHead")
