"""DELSE baselines and ablations (paper Tables 5-7): the ablation / baseline configs train, the
pixel-wise (DEXTR-style) baseline learns, the threshold search picks the IoU-maximising
threshold, and test-time click noise stays within its stated fraction of the box."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"
NEW_CONFIGS = sorted(str(p.relative_to(REPO / "configs/DELSE")) for folder in ("ablations", "baselines")
                     for p in (REPO / "configs/DELSE" / folder).glob("*.yaml")) + ["pixel_wise_R_18_dsb2018.yaml"]

# Paper's J mean (Table 6, Table 7) that each DAVIS config's header must quote.
PAPER_J_MEAN = {
    "level_set_regression": "81.7", "plus_motion": "84.0", "plus_modulation": "84.8",
    "plus_skip_features": "85.6", "minus_extreme_points": "83.9", "pixel_wise_R_101": "82.4",
    "click_noise_05": "85.1", "click_noise_10": "84.9",
}


# Paper's mIoU (Tables 1 and 5) that each baselines/ config's header must quote.
PAPER_MIOU = {
    "pixel_wise_R_101_cityscapes_stretching.yaml": "81.59", "pixel_wise_R_101_cityscapes_stretching_no_clicks": "79.11",
    "delse_R_101_cityscapes_stretching_no_clicks": "80.86", "level_set_regression_R_101_cityscapes_stretching": "81.54",
    "pixel_wise_R_101_pascal_sbd": "91.5", "level_set_regression_R_101_pascal_sbd": "88.7",
    "pixel_wise_R_101_pascal_voc2012": "90.5", "level_set_regression_R_101_pascal_voc2012": "87.7",
}


def _cfg(path=TINY, **overrides):
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def _shrink(cfg):
    """The tiny config's network and input sizes, the config's own switches kept."""
    tiny = _cfg()
    for key in ["MODEL.WEIGHTS", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.NORM", "MODEL.RESNETS.STEM_OUT_CHANNELS",
                "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.OUT_FEATURES", "MODEL.RESNETS.RES5_DILATION",
                "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.DELSE.ENCODER_FEATURES", "MODEL.DELSE.NORM",
                "MODEL.DELSE.PSP_CHANNELS", "MODEL.DELSE.SKIP_CHANNELS", "MODEL.DELSE.EDIT_CHANNELS",
                "MODEL.DELSE.TSDF_TRUNCATION", "INPUT.DELSE.INPUT_SIZE", "INPUT.DELSE.CROP_MARGIN",
                "INPUT.DELSE.HEATMAP_SIGMA", "MODEL.PIXEL_STD"]:
        node_t, node_c = tiny, cfg
        *path, last = key.split(".")
        for p in path:
            node_t, node_c = node_t[p], node_c[p]
        node_c[last] = node_t[last]
    return cfg


@pytest.fixture(scope="module")
def instances(coco_sample_dir):
    from detectron2.data import DatasetCatalog

    import delse

    return delse.flatten_instances(DatasetCatalog.get("coco_sample_val2017"), min_area=400)[:2]


def _build(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(cfg)


def _overfit(model, batch, steps, lr=2e-3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    return history, losses


# ------------------------------------------------------------------------------- configs
def test_table6_and_7_configs_are_there():
    names = {Path(n).stem for n in NEW_CONFIGS}
    for key in PAPER_J_MEAN:
        assert any(key in n for n in names), key


def test_table1_and_5_baseline_configs_quote_the_paper():
    for key, miou in PAPER_MIOU.items():
        (path,) = [REPO / "configs/DELSE" / n for n in NEW_CONFIGS if n.startswith("baselines/") and key in n]
        header = "".join(l for l in path.read_text().splitlines(True) if l.startswith("#"))
        assert f"mIoU {miou}" in header, (path.name, miou)


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_config_builds_and_trains_a_step(name, instances):
    """Each config with its own switches (network shrunk to the tiny sizes) takes a training step
    with the losses its switches imply, and the DAVIS headers quote the paper's J mean."""
    from delse import DELSEDatasetMapper

    path = REPO / "configs/DELSE" / name
    header = "".join(l for l in path.read_text().splitlines(True) if l.startswith("#"))
    for key, j in PAPER_J_MEAN.items():
        if key in name and "davis" in name:
            assert f"J mean {j}" in header, (name, j)
    cfg = _cfg(path)
    d = cfg.MODEL.DELSE
    _shrink(cfg)
    cfg.MODEL.DELSE.PRETRAIN_ITERS = 0
    model = _build(cfg)
    batch = [DELSEDatasetMapper(cfg, True)(x) for x in instances]
    history, losses = _overfit(model, batch, 1)
    if d.PIXEL_WISE:
        expected = {"loss_mask"}
    else:
        expected = {"loss_level_set"} | ({"loss_evolution"} if d.USE_MOTION or d.USE_MODULATION else set()) | (
            {"loss_direction"} if d.USE_MOTION else set())
    assert set(losses) == expected and np.isfinite(history).all()
    assert model.encoder.stem.conv1.in_channels == (4 if d.USE_EXTREME_POINTS else 3)
    assert len(model.skip_features.in_features) == (3 if d.SKIP_FEATURES else 1)


# ------------------------------------------------------------------------------- pixel-wise
def test_pixel_wise_baseline_learns_and_predicts_a_mask(instances):
    from delse import DELSEDatasetMapper

    cfg = _cfg(**{"MODEL.DELSE.PIXEL_WISE": True})
    assert cfg.MODEL.DELSE.NUM_CORRECTIONS == 1  # the tiny config trains with a simulated drag
    model = _build(cfg)
    batch = [DELSEDatasetMapper(cfg, True)(x) for x in instances]
    history, losses = _overfit(model, batch, 10)
    assert set(losses) == {"loss_mask"}
    assert np.mean(history[-3:]) < 0.7 * history[0], history
    # Only the encoder, skip features and the one mask branch learn.
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"encoder", "skip_features", "initial_level_set_branch"}
    model.eval()
    x = DELSEDatasetMapper(cfg, False)(instances[0])
    with torch.no_grad():
        (out,) = model([x])
    assert torch.equal(out["phi"], out["phi0"])  # no evolution
    assert torch.equal(out["crop_mask"], out["prob"][0] > 0.5)
    # Against the ground truth: the overfitted instance's crop is segmented (IoU ~0.7 after the 10
    # steps; ~0.2 at initialisation, where most of the crop is foreground).
    gt = x["gt_mask"].bool()
    assert (out["crop_mask"] & gt).sum() / (out["crop_mask"] | gt).sum() > 0.5
    assert len(out["corrections"]) == cfg.MODEL.DELSE.TEST_NUM_CORRECTIONS


def test_class_balanced_bce_matches_its_definition():
    from delse.modeling import evolution_loss, pixel_wise_loss

    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :1] = True  # a quarter foreground: fg weight 3/4, bg weight 1/4
    logits = torch.randn(1, 1, 4, 4)
    p = torch.sigmoid(logits)[:, 0]
    expected = -(0.75 * gt * torch.log(p) + 0.25 * (~gt) * torch.log(1 - p)).mean()
    assert torch.allclose(pixel_wise_loss(logits, gt), expected, atol=1e-6)
    # The evolution loss is the same balanced BCE of H_eps(phi) (eq. 14-15).
    h = 0.5 * (1 + 2 / np.pi * torch.atan(logits[:, 0] / 1.0))
    expected = -(0.75 * gt * torch.log(h) + 0.25 * (~gt) * torch.log(1 - h)).mean()
    assert torch.allclose(evolution_loss(logits, gt, 1.0), expected, atol=1e-5)


# ------------------------------------------------------------------------------- threshold search
def test_search_threshold_picks_the_best_mean():
    from delse.evaluation import search_threshold

    ious = [[0.5, 0.9, 0.7], [0.6, 0.5, 0.9]]  # means 0.55, 0.70, 0.80
    assert search_threshold(ious, [-1.0, 0.0, 1.0]) == pytest.approx((1.0, 0.8))


def test_evaluator_threshold_search_finds_the_iou_maximising_threshold():
    """phi = r + 2 - distance over a disk of radius r: phi > 0 is 2 px too large and phi > 2 is
    the GT; the search over [-3, 3] must return 2 with IoU ~1, above the default threshold's."""
    from delse import DELSEEvaluator
    from delse.data import paste_to_image

    S, r = 40, 10.0
    yy, xx = np.mgrid[:S, :S]
    dist = np.hypot(xx - 19.5, yy - 19.5)
    gt = dist < r
    phi = torch.from_numpy((r + 2 - dist).astype(np.float32))[None]
    crop_box = np.array([0.0, 0.0, S, S])  # the identity crop
    rle = mask_util.encode(np.asfortranarray(gt.astype(np.uint8)))
    x = {"annotation": {"segmentation": rle}, "height": S, "width": S, "crop_box": crop_box, "instance_id": "disk"}
    out = {"phi": phi, "mask": torch.from_numpy(paste_to_image(phi[0], crop_box, S, S))}
    ev = DELSEEvaluator("delse_test_threshold_search", tolerances=[1, 2], distributed=False,
                        threshold_search=True, phi_thresholds=[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    ev.process([x], [out])
    res = ev.evaluate()["delse"]
    assert res["best_threshold"] == 2.0
    assert res["mIoU@best_threshold"] > 99.0 > res["mIoU"]
    # A probability map is searched on the probability grid.
    ev = DELSEEvaluator("delse_test_threshold_search", tolerances=[1, 2], distributed=False,
                        threshold_search=True, prob_thresholds=[0.3, 0.5, 0.7, 0.9])
    ev.process([x], [dict(out, prob=torch.sigmoid(2 * (phi - 2.0)))])  # p > 0.5 is the GT
    res = ev.evaluate()["delse"]
    assert res["best_threshold"] == 0.5 and res["mIoU@best_threshold"] > 99.0


# ------------------------------------------------------------------------------- click noise
@pytest.mark.parametrize("noise", [0.05, 0.1])
def test_perturb_clicks_stays_within_the_fraction_of_the_box(noise):
    from delse.data import perturb_clicks

    rng = np.random.default_rng(0)
    points = np.array([[10, 50], [90, 40], [50, 20], [45, 80]], dtype=np.float32)
    box = np.array([10.0, 20.0, 91.0, 81.0])  # 81 x 61
    moves = np.stack([perturb_clicks(points, box, noise, rng) - points for _ in range(500)])
    side = np.array([81.0, 61.0])
    assert (np.abs(moves) <= noise * side + 1e-4).all()
    assert (np.abs(moves).max(axis=(0, 1)) > 0.9 * noise * side).all()  # it does use the range
    clipped = perturb_clicks(points, box, 0.5, rng, image_size=(60, 100))
    assert (clipped >= 0).all() and (clipped[:, 0] <= 99).all() and (clipped[:, 1] <= 59).all()


def test_test_mapper_applies_click_noise_and_crops_around_the_clicks(instances):
    from delse import DELSEDatasetMapper
    from delse.data import crop_box_around, decode_mask, mask_box, points_box, points_to_image

    x = instances[0]
    cfg = _cfg()
    clean = DELSEDatasetMapper(cfg, False)(x)
    mask = decode_mask(x["annotation"]["segmentation"], x["height"], x["width"])
    box = mask_box(mask)
    np.testing.assert_allclose(clean["crop_box"], crop_box_around(box, cfg.INPUT.DELSE.CROP_MARGIN, "stretch"))
    exact = points_to_image(clean["extreme_points"], clean["crop_box"], cfg.INPUT.DELSE.INPUT_SIZE)
    for noise in (0.05, 0.1):
        cfg.INPUT.DELSE.EXTREME_POINT_NOISE = noise
        noisy = DELSEDatasetMapper(cfg, False)(x)
        clicks = points_to_image(noisy["extreme_points"], noisy["crop_box"], cfg.INPUT.DELSE.INPUT_SIZE)
        move = np.abs(clicks - exact)
        side = box[2:] - box[:2]
        assert (move <= noise * side + 0.01).all() and move.max() > 0.1
        np.testing.assert_allclose(noisy["crop_box"], crop_box_around(points_box(clicks), cfg.INPUT.DELSE.CROP_MARGIN,
                                                                         "stretch"), atol=0.01)
    # Training draws are not noised (the noise is the test-time lazy annotator of Table 7).
    assert DELSEDatasetMapper(cfg, True).noise == 0.0
