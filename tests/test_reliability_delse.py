"""Issue 6, DELSE: clicks and drags outside the image are clipped, degenerate clicks still give a
valid crop, zero-length drags are no-ops, bad predictor input is a clear ValueError, and a bad
training instance is skipped instead of ending the run."""
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import delse
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "DELSE" / "tiny_delse_coco_sample.yaml"
H, W = 80, 120


def _cfg(*opts):
    cfg = delse.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def predictor():
    from delse import DELSEPredictor

    cfg = _cfg()
    torch.manual_seed(0)
    return DELSEPredictor(cfg, model=build_model(cfg))


@pytest.fixture(scope="module")
def image():
    img = np.full((H, W, 3), 40, np.uint8)
    cv2.circle(img, (60, 40), 20, (200, 180, 160), -1)
    return img


CLICKS = [(40, 40), (80, 40), (60, 20), (60, 60)]


def _valid(result):
    assert result.mask.shape == (H, W) and result.mask.dtype == bool
    assert np.isfinite(result.phi).all()
    assert np.isfinite(result.crop_box).all()
    assert result.crop_box[2] > result.crop_box[0] and result.crop_box[3] > result.crop_box[1]


@pytest.mark.parametrize("bad, match", [
    (lambda im: im.astype(np.float32), "uint8"),
    (lambda im: im[:, :, 0], r"\(H, W, 3\)"),
    (lambda im: np.dstack([im, im[:, :, :1]]), r"shape \(80, 120, 4\)"),
    (lambda im: torch.from_numpy(im), "Tensor"),
])
def test_predictor_rejects_bad_images(predictor, image, bad, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(bad(image), CLICKS)


@pytest.mark.parametrize("clicks", [CLICKS[:3], CLICKS + [(1, 1)], [(0, 0, 0)] * 4,
                                    [(np.nan, 1)] + CLICKS[1:]])
def test_predictor_rejects_anything_but_four_finite_clicks(predictor, image, clicks):
    with pytest.raises(ValueError, match="4 finite"):
        predictor.predict(image, clicks)


def test_clicks_outside_the_image_are_clipped_with_a_warning(predictor, image, caplog):
    inside = predictor.predict(image, [(0, 40), (W - 1, 40), (60, 0), (60, H - 1)])
    with caplog.at_level(logging.WARNING, logger="delse.predictor"):
        outside = predictor.predict(image, [(-30, 40), (W + 50, 40), (60, -5), (60, H + 9)])
    assert "outside the 120x80 image" in caplog.text
    np.testing.assert_allclose(outside.crop_box, inside.crop_box)
    np.testing.assert_array_equal(outside.mask, inside.mask)


@pytest.mark.parametrize("clicks", [[(60, 40)] * 4, [(30, 40), (50, 40), (70, 40), (90, 40)],
                                    [(0, 0)] * 4, [(W - 1, H - 1)] * 4])
def test_duplicated_or_collinear_clicks_give_a_valid_crop(predictor, image, clicks):
    _valid(predictor.predict(image, clicks))


def test_zero_length_drag_is_a_no_op_and_drags_outside_are_clipped(predictor, image, caplog):
    first = predictor.predict(image, CLICKS)
    with caplog.at_level(logging.WARNING, logger="delse.predictor"):
        same = predictor.correct((45, 40), (45, 40))
    assert "zero length" in caplog.text
    assert same is first
    assert predictor._state["interaction"]["drags"] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="delse.predictor"):
        moved = predictor.correct((45, 40), (-100, 40))
    assert "clipped" in caplog.text
    _valid(moved)
    # Both ends outside on the same side: clipped onto one point, i.e. a zero-length drag.
    with caplog.at_level(logging.WARNING, logger="delse.predictor"):
        assert predictor.correct((-5, 10), (-50, 10)) is moved
    with pytest.raises(ValueError, match="two finite"):
        predictor.correct((np.inf, 1), (2, 2))


def test_delse_train_loader_skips_an_unusable_instance(tmp_path, caplog):
    from delse import build_delse_train_loader

    cv2.imwrite(str(tmp_path / "good.png"), np.full((H, W, 3), 90, np.uint8))
    square = [[20.0, 20.0, 60.0, 20.0, 60.0, 60.0, 20.0, 60.0]]
    anns = lambda i: [dict(id=i, bbox=[20, 20, 40, 40], bbox_mode=1, segmentation=square, category_id=0)]
    records = [
        dict(file_name=str(tmp_path / "good.png"), height=H, width=W, image_id=1, annotations=anns(1)),
        dict(file_name=str(tmp_path / "gone.png"), height=H, width=W, image_id=2, annotations=anns(2)),
    ]
    name = f"reliability_delse_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["x"])
    cfg = _cfg("DATASETS.TRAIN", (name,), "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0)
    with caplog.at_level(logging.WARNING, logger="levelset_d2.robust_data"):
        it = iter(build_delse_train_loader(cfg))
        batches = [next(it) for _ in range(3)]
    assert all(d["file_name"].endswith("good.png") for b in batches for d in b)
    assert "gone.png" in caplog.text and "annotation id 2" in caplog.text


def test_delse_test_loader_leaves_out_images_that_do_not_open(tmp_path, caplog):
    from delse import build_delse_test_loader

    cv2.imwrite(str(tmp_path / "good.png"), np.full((H, W, 3), 90, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    square = [[20.0, 20.0, 60.0, 20.0, 60.0, 60.0, 20.0, 60.0]]
    records = [dict(file_name=str(tmp_path / f), height=H, width=W, image_id=i, annotations=[
        dict(id=i, bbox=[20, 20, 40, 40], bbox_mode=1, segmentation=square, category_id=0)])
        for i, f in enumerate(["good.png", "broken.png"])]
    name = f"reliability_delse_test_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["x"])
    with caplog.at_level(logging.WARNING, logger="levelset_d2.robust_data"):
        samples = [b[0] for b in build_delse_test_loader(_cfg("DATALOADER.NUM_WORKERS", 0), name)]
    assert [s["file_name"] for s in samples] == [str(tmp_path / "good.png")]
    assert "broken.png" in caplog.text
