"""DELSE data pipeline on real COCO val2017 instances: extreme points, crops, heatmap, TSDF and
direction-field targets, and the crop/paste geometry."""
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    import delse

    c = delse.get_cfg()
    c.merge_from_file(str(REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"))
    c.INPUT.DELSE.INPUT_SIZE = 96
    c.INPUT.DELSE.CROP_MARGIN = 20
    c.MODEL.DELSE.TSDF_TRUNCATION = 10.0
    c.MODEL.DEVICE = "cpu"
    return c


@pytest.fixture(scope="module")
def instances(coco_sample_dir):
    from detectron2.data import DatasetCatalog

    import delse

    return delse.flatten_instances(DatasetCatalog.get("coco_sample_val2017"), min_area=50)


def test_flatten_skips_crowd_and_tiny(coco_sample_dir, instances):
    from pycocotools.coco import COCO

    coco = COCO(str(coco_sample_dir / "instances_val2017_subset.json"))
    anns = list(coco.anns.values())
    assert sum(a["iscrowd"] for a in anns) >= 1
    # Tiny = fewer than 50 mask pixels once rasterised.
    usable = [a for a in anns if not a["iscrowd"] and coco.annToMask(a).sum() >= 50]
    assert 0 < len(usable) < len(anns)
    assert len(instances) == len(usable)
    assert all(not x["annotation"].get("iscrowd", 0) for x in instances)
    assert len({x["instance_id"] for x in instances}) == len(instances)


def test_extreme_points_on_real_masks(instances):
    from delse.data import decode_mask, extreme_points

    rng = np.random.default_rng(0)
    for inst in instances[:15]:
        mask = decode_mask(inst["annotation"]["segmentation"], inst["height"], inst["width"])
        ys, xs = np.nonzero(mask)
        pts = extreme_points(mask, 0, rng).astype(int)
        assert all(mask[y, x] for x, y in pts)  # every point is a mask pixel
        (lx, _), (rx, _), (_, ty), (_, by) = pts
        assert (lx, rx, ty, by) == (xs.min(), xs.max(), ys.min(), ys.max())
        jittered = extreme_points(mask, 3, rng).astype(int)
        assert all(mask[y, x] for x, y in jittered)
        assert jittered[0, 0] <= xs.min() + 3 and jittered[1, 0] >= xs.max() - 3
        assert jittered[2, 1] <= ys.min() + 3 and jittered[3, 1] >= ys.max() - 3


def test_mapper_targets_on_real_instances(cfg, instances):
    from delse import DELSEDatasetMapper
    from delse.data import decode_mask, paste_to_image

    mapper = DELSEDatasetMapper(cfg, is_train=False)
    S, D = cfg.INPUT.DELSE.INPUT_SIZE, cfg.MODEL.DELSE.TSDF_TRUNCATION
    ious = []
    for inst in instances[:8]:
        out = mapper(inst)
        assert out["image"].shape == (3, S, S) and out["extreme_heatmap"].shape == (1, S, S)
        mask = out["gt_mask"].numpy()
        heat = out["extreme_heatmap"][0].numpy()
        # Heatmap: a peak of ~1 at each extreme point, which lies on (or next to) the GT mask.
        dist_to_mask = ndimage.distance_transform_edt(~mask)
        for x, y in out["extreme_points"].numpy():
            xi, yi = int(round(x)), int(round(y))
            assert heat[yi, xi] > 0.95
            assert dist_to_mask[yi, xi] <= 1.5
        peak_y, peak_x = np.unravel_index(heat.argmax(), heat.shape)
        assert np.min(np.hypot(*(out["extreme_points"].numpy() - [peak_x, peak_y]).T)) <= 1.0
        # TSDF in input pixels: positive inside, truncated at D, equal to the exact signed EDT to the
        # boundary between inside and outside pixels (0.5 px less than between pixel centres).
        tsdf = out["gt_tsdf"][0].numpy()
        assert out["gt_tsdf"].shape == (1, S, S)
        assert (tsdf[mask] > 0).all() and (tsdf[~mask] < 0).all()
        assert np.abs(tsdf).max() <= D + 1e-4
        exact = np.clip(np.where(mask, ndimage.distance_transform_edt(mask) - 0.5,
                                 0.5 - ndimage.distance_transform_edt(~mask)), -D, D)
        np.testing.assert_allclose(tsdf, exact, atol=1e-3)
        assert (tsdf == -D).any()  # the 20 px margin leaves background beyond the truncation
        # Direction field: unit vectors; a step along them gets closer to the GT boundary.
        v = out["gt_direction"].numpy()
        dt = np.abs(ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask))
        yy, xx = np.nonzero((dt >= 3) & (dt <= 8) & (np.linalg.norm(v, axis=0) > 0.5))
        step_x = np.clip(np.round(xx + 2 * v[0, yy, xx]).astype(int), 0, S - 1)
        step_y = np.clip(np.round(yy + 2 * v[1, yy, xx]).astype(int), 0, S - 1)
        assert np.mean(dt[step_y, step_x] < dt[yy, xx]) > 0.95
        # Crop -> paste round trip reproduces the GT mask in image coordinates.
        full = decode_mask(inst["annotation"]["segmentation"], inst["height"], inst["width"])
        pasted = paste_to_image(out["gt_tsdf"][0], out["crop_box"], inst["height"], inst["width"])
        ious.append((pasted & full).sum() / (pasted | full).sum())
    assert np.mean(ious) > 0.85, ious


def test_crop_modes_stretch_and_square(cfg, instances):
    from delse import DELSEDatasetMapper
    from delse.data import decode_mask, mask_box

    # The widest instance shows the difference best.
    def aspect(inst):
        x, y, w, h = inst["annotation"]["bbox"]
        return w / h

    inst = max(instances, key=aspect)
    box = mask_box(decode_mask(inst["annotation"]["segmentation"], inst["height"], inst["width"]))
    true_aspect = (box[2] - box[0]) / (box[3] - box[1])
    assert true_aspect > 1.5
    results = {}
    for mode in ("stretch", "square"):
        c = cfg.clone()
        c.INPUT.DELSE.CROP_MODE = mode
        out = DELSEDatasetMapper(c, is_train=False)(inst)
        ys, xs = np.nonzero(out["gt_mask"].numpy())
        results[mode] = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
        x0, y0, x1, y1 = out["crop_box"]
        if mode == "square":
            assert abs((x1 - x0) - (y1 - y0)) < 1e-6
    # Stretch: the margin-expanded box fills the square input, so the mask spans w / (w + 2m) of
    # the width and h / (h + 2m) of the height.
    m, w, h = cfg.INPUT.DELSE.CROP_MARGIN, box[2] - box[0], box[3] - box[1]
    assert results["stretch"] == pytest.approx((w / (w + 2 * m)) / (h / (h + 2 * m)), rel=0.15)
    assert results["stretch"] < 0.6 * true_aspect
    assert results["square"] == pytest.approx(true_aspect, rel=0.15)  # aspect kept


def test_train_mapper_jitter_and_flip_are_random(cfg, instances):
    from delse import DELSEDatasetMapper

    mapper = DELSEDatasetMapper(cfg, is_train=True)
    outs = [mapper(instances[0]) for _ in range(6)]
    points = {tuple(o["extreme_points"].numpy().round(2).ravel()) for o in outs}
    assert len(points) > 1
    assert "annotation" not in outs[0]
    for o in outs:  # targets stay consistent with the (possibly flipped) crop
        tsdf, mask = o["gt_tsdf"][0], o["gt_mask"]
        assert bool((tsdf[mask] > 0).all()) and bool((tsdf[~mask] < 0).all())
    test_mapper = DELSEDatasetMapper(cfg, is_train=False)
    a, b = test_mapper(instances[0]), test_mapper(instances[0])
    assert torch.equal(a["extreme_points"], b["extreme_points"])  # deterministic evaluation


def test_gt_direction_field_evolves_shifted_level_set_back(cfg, instances):
    """Sign conventions of the mapper's targets and levelset.delse_evolve agree: evolving the
    shifted GT level set of eq. 12 in the GT motion field (eq. 5) moves the contour back to the GT,
    which is what L_T asks the motion branch to learn during pre-training."""
    import levelset

    from delse import DELSEDatasetMapper

    mapper = DELSEDatasetMapper(cfg, is_train=False)
    big = [x for x in instances if x["annotation"]["bbox"][2] * x["annotation"]["bbox"][3] > 3000][:4]
    for inst in big:
        out = mapper(inst)
        gt = out["gt_mask"]
        for shift in (-4.0, 4.0):
            phi = out["gt_tsdf"][None] + shift
            evolved = levelset.delse_evolve(
                phi, out["gt_direction"][None], torch.zeros_like(phi),
                curvature_weight=1.0, dist_reg_weight=0.04, dt=1.0, steps=5,
            )

            def iou(p):
                p = p[0, 0] > 0
                return float((p & gt).sum() / (p | gt).sum())

            assert iou(evolved) > iou(phi) + 0.03, (inst["instance_id"], shift, iou(phi), iou(evolved))


def test_mapper_on_rle_nuclei(cfg, dsb2018_dir):
    """DSB2018 masks are RLE: the same pipeline works and keeps tiny nuclei inside the crop."""
    from detectron2.data import DatasetCatalog

    import delse

    instances = delse.flatten_instances(DatasetCatalog.get("dsb2018_dev")[:3], min_area=20)
    assert len(instances) > 10
    assert isinstance(instances[0]["annotation"]["segmentation"], dict)  # RLE
    mapper = delse.DELSEDatasetMapper(cfg, is_train=False)
    S = cfg.INPUT.DELSE.INPUT_SIZE
    for inst in instances[:10]:
        out = mapper(inst)
        mask, tsdf = out["gt_mask"], out["gt_tsdf"][0]
        assert mask.any() and not mask.all()
        assert bool((tsdf[mask] > 0).all()) and bool((tsdf[~mask] < 0).all())
        pts = out["extreme_points"]
        assert ((pts >= 0) & (pts <= S - 1)).all()


def test_rotate_and_scale_moves_image_and_mask_together():
    """A 100 x 10 bar rotated by 30 degrees about its centre: its box becomes
    100 cos 30 + 10 sin 30 = 91.6 wide and 100 sin 30 + 10 cos 30 = 58.7 high (scale 1); at
    scale 1.2 both sides grow by 1.2; the image's bright pixels stay the mask's."""
    from delse.data import mask_box, rotate_and_scale

    mask = np.zeros((200, 240), bool)
    mask[95:105, 70:170] = True
    image = np.zeros((200, 240, 3), np.uint8)
    image[mask] = 255
    for scale in (1.0, 1.2):
        warped_image, warped_mask = rotate_and_scale(image, mask, 30.0, scale)
        x0, y0, x1, y1 = mask_box(warped_mask)
        assert abs((x1 - x0) - 91.6 * scale) <= 2 and abs((y1 - y0) - 58.7 * scale) <= 2
        assert abs(warped_mask.sum() - 1000 * scale**2) <= 0.05 * 1000 * scale**2  # area x scale^2
        bright = warped_image[..., 0] >= 128
        assert (bright & warped_mask).sum() / (bright | warped_mask).sum() > 0.95
        # Rotated about the box centre (119.5, 99.5 in pixel indices): the centre stays.
        ys, xs = np.nonzero(warped_mask)
        assert abs(xs.mean() - 119.5) < 1 and abs(ys.mean() - 99.5) < 1


def test_mapper_rotation_only_in_training(cfg, instances):
    """With RANDOM_ROTATION the training crops of one elongated instance vary in how much of the
    crop the mask fills; at test time the option is ignored (the crop is the un-augmented one)."""
    from delse.data import DELSEDatasetMapper

    c = cfg.clone()
    c.INPUT.DELSE.RANDOM_ROTATION = 30.0
    c.INPUT.DELSE.RANDOM_SCALE = (0.8, 1.2)
    c.INPUT.DELSE.RANDOM_FLIP = False
    c.INPUT.DELSE.EXTREME_POINT_JITTER = 0
    plain = cfg.clone()
    plain.INPUT.DELSE.RANDOM_FLIP = False
    plain.INPUT.DELSE.EXTREME_POINT_JITTER = 0
    inst = instances[0]
    np.random.seed(0)
    fills = {float(DELSEDatasetMapper(c, True)(inst)["gt_mask"].float().mean()) for _ in range(6)}
    reference = float(DELSEDatasetMapper(plain, True)(inst)["gt_mask"].float().mean())
    assert len(fills) >= 5 and max(abs(f - reference) for f in fills) > 0.01
    test_sample = DELSEDatasetMapper(c, False)(inst)
    assert torch.equal(test_sample["gt_mask"], DELSEDatasetMapper(plain, False)(inst)["gt_mask"])
    with pytest.raises(ValueError, match="RANDOM_SCALE"):
        bad = cfg.clone()
        bad.INPUT.DELSE.RANDOM_SCALE = (1.2, 0.8)
        DELSEDatasetMapper(bad, True)
