"""Issue 6, bad input: a bad image or annotation is repaired, or skipped with a warning naming the
file and the annotation (DATALOADER.STRICT: raised with the same message); never a crash mid-run.
Corrupted inputs are generated in tmp_path."""
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

import levelset_rcnn
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from levelset_d2.robust_data import (
    BadSampleError,
    LevelSetDatasetMapper,
    RobustDatasetMapper,
    read_image,
    repair_annotations,
)


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"


def _cfg(**overrides):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([x for kv in overrides.items() for x in (kv[0].replace("__", "."), kv[1])])
    return cfg


def _image(path, h=96, w=128, value=None):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    cv2.imwrite(str(path), img)
    return str(path)


def _ann(id, box, polygon=None, **kw):
    x0, y0, x1, y1 = box
    polygon = polygon if polygon is not None else [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return dict(id=id, bbox=[x0, y0, x1 - x0, y1 - y0], bbox_mode=BoxMode.XYWH_ABS,
                segmentation=polygon, category_id=0, iscrowd=0, **kw)


def _record(file_name, anns, h=96, w=128, image_id=1):
    return dict(file_name=file_name, height=h, width=w, image_id=image_id, annotations=anns)


# ------------------------------------------------------------------------------- images
def test_gray_rgba_and_16bit_images_become_8bit_bgr(tmp_path, caplog):
    gray = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    rgba = np.zeros((64, 128, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 200, 10, 255  # B=200, R=10 in cv2's BGRA
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    deep = (np.tile(np.arange(128, dtype=np.uint16), (64, 1)) * 512).astype(np.uint16)  # up to 65024
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    with caplog.at_level(logging.INFO, logger="levelset_d2.robust_data"):
        out = {n: read_image(str(tmp_path / f"{n}.png"), "BGR") for n in ("gray", "rgba", "deep")}
    for n, img in out.items():
        assert img.shape == (64, 128, 3) and img.dtype == np.uint8, n
    assert (out["gray"][..., 0] == gray).all()
    assert tuple(out["rgba"][0, 0]) == (200, 0, 10)
    # 16-bit: rescaled to the 8-bit range (PIL's own conversion would saturate at 255).
    assert out["deep"][0, 0, 0] == 0 and out["deep"][0, -1, 0] == round(127 * 512 * 255 / 65535)
    assert len(np.unique(out["deep"][..., 0])) > 100
    assert "deep.png" in caplog.text and "8-bit" in caplog.text


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated"])
def test_unreadable_image_is_skipped_with_its_name_or_raised_when_strict(tmp_path, caplog, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "truncated":
        _image(path)
        path.write_bytes(path.read_bytes()[:300])
    cfg = _cfg()
    record = _record(str(path), [_ann(7, (10, 10, 50, 40))])
    mapper = RobustDatasetMapper(LevelSetDatasetMapper(cfg, True))
    with caplog.at_level(logging.WARNING, logger="levelset_d2.robust_data"):
        assert mapper(record) is None
        assert mapper(record) is None
    assert mapper.num_skipped == 2
    assert str(path) in caplog.text and "skipping" in caplog.text
    strict = RobustDatasetMapper(LevelSetDatasetMapper(cfg, True), strict=True)
    with pytest.raises(BadSampleError, match=f"{kind}.jpg.*DATALOADER.STRICT"):
        strict(record)


def test_image_whose_size_is_not_the_records_is_skipped_naming_it(tmp_path, caplog):
    record = _record(_image(tmp_path / "small.jpg"), [_ann(4, (10, 10, 50, 40))], h=200, w=200)
    mapper = RobustDatasetMapper(LevelSetDatasetMapper(_cfg(), True))
    with caplog.at_level(logging.WARNING, logger="levelset_d2.robust_data"):
        assert mapper(record) is None
    assert "small.jpg" in caplog.text and mapper.num_skipped == 1
    assert "SizeMismatchError" in caplog.text


def test_a_dataset_where_nothing_opens_fails_instead_of_retrying_forever(tmp_path):
    mapper = RobustDatasetMapper(LevelSetDatasetMapper(_cfg(), True), max_failures_before_success=5)
    records = [_record(str(tmp_path / f"nope{i}.jpg"), [_ann(i, (10, 10, 50, 40))]) for i in range(5)]
    assert [mapper(r) for r in records[:4]] == [None] * 4
    with pytest.raises(BadSampleError, match=r"first 5 samples all failed.*nope4\.jpg.*image root"):
        mapper(records[4])
    # Once a sample has worked, failures are skipped however many there are.
    mapper = RobustDatasetMapper(LevelSetDatasetMapper(_cfg(), True), max_failures_before_success=5)
    assert mapper(_record(_image(tmp_path / "ok.jpg"), [_ann(1, (10, 10, 50, 40))])) is not None
    assert all(mapper(r) is None for r in records + records)


def test_strict_is_a_declared_config_key_off_by_default():
    assert levelset_rcnn.get_cfg().DATALOADER.STRICT is False


# ------------------------------------------------------------------------------- annotations
def test_bad_boxes_and_masks_are_clipped_or_dropped_with_their_annotation_id(tmp_path, caplog):
    h, w = 96, 128
    rle = mask_util.encode(np.asfortranarray(np.ones((h + 4, w), np.uint8)))  # wrong size
    anns = [
        _ann(1, (10, 10, 50, 40)),                                    # fine
        _ann(2, (20, 20, 20, 40)),                                    # zero width
        dict(_ann(3, (10, 10, 50, 40)), bbox=[50, 40, 10, 10], bbox_mode=BoxMode.XYXY_ABS),  # inverted
        _ann(4, (200, 10, 240, 40)),                                  # outside the image
        _ann(5, (-20, 60, 30, 120)),                                  # partly outside: clipped
        _ann(6, (10, 10, 50, 40), polygon=[[10, 10, 50, 10]]),        # 2-point polygon
        _ann(7, (10, 10, 50, 40), polygon=[[10, 10, 50, 10], [10, 10, 50, 10, 50, 40]]),  # one part ok
        dict(_ann(8, (0, 0, 128, 96)), segmentation=rle),             # RLE of another size
        dict(_ann(9, (0, 0, 128, 50)), iscrowd=1),                    # crowd: kept
    ]
    with caplog.at_level(logging.INFO, logger="levelset_d2.robust_data"):
        out = repair_annotations(_record("img.jpg", anns), h, w)
    kept = {a["id"]: a for a in out["annotations"]}
    assert sorted(kept) == [1, 5, 7, 9]
    assert kept[5]["bbox"] == [0.0, 60.0, 30.0, 96.0] and kept[5]["bbox_mode"] == BoxMode.XYXY_ABS
    assert kept[7]["segmentation"] == [[10, 10, 50, 10, 50, 40]]
    assert kept[9]["iscrowd"] == 1
    for i, reason in [(2, "no area"), (3, "no area"), (4, "outside"), (6, "3 points"), (8, "RLE size")]:
        assert f"annotation id {i} dropped: " in caplog.text and reason in caplog.text
    assert "'img.jpg'" in caplog.text
    assert len(anns) == 9 and anns[6]["segmentation"][0] == [10, 10, 50, 10]  # the input is untouched


def test_image_left_without_annotations_follows_filter_empty(tmp_path):
    cfg = _cfg()
    record = _record(_image(tmp_path / "a.jpg"), [_ann(1, (300, 300, 320, 320))])
    assert RobustDatasetMapper(LevelSetDatasetMapper(cfg, True), filter_empty=True)(record) is None
    kept = RobustDatasetMapper(LevelSetDatasetMapper(cfg, True), filter_empty=False)(record)
    assert len(kept["instances"]) == 0  # a negative image
    # An image with no annotations at all is a negative whatever the setting (Detectron2 filters
    # those when it builds the dataset).
    assert len(RobustDatasetMapper(LevelSetDatasetMapper(cfg, True))(_record(record["file_name"], []))["instances"]) == 0


def test_many_instances_tiny_rois_and_large_images_train(tmp_path):
    """300 instances in one image, RoIs of 1-3 px, a 3000x4000 image: mapped and trained on with
    finite losses (Detectron2 resizes the large image to the config's size)."""
    cfg = _cfg(SOLVER__IMS_PER_BATCH=2)
    mapper = RobustDatasetMapper(LevelSetDatasetMapper(cfg, True))
    anns = [_ann(i, (4 * (i % 30), 3 * (i // 30) + 40, 4 * (i % 30) + 1 + i % 3, 3 * (i // 30) + 42))
            for i in range(300)]
    crowded = mapper(_record(_image(tmp_path / "crowded.jpg"), anns))
    assert crowded is not None and len(crowded["instances"]) == 300
    big = mapper(_record(_image(tmp_path / "big.jpg", 3000, 4000, value=90), [_ann(1, (1000, 1000, 2500, 2000))],
                         h=3000, w=4000))
    assert big is not None and max(big["image"].shape[1:]) <= cfg.INPUT.MAX_SIZE_TRAIN
    assert len(big["instances"]) == 1
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage():
        losses = model([crowded, big])
    assert any("tsdf" in k for k in losses), losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_train_loader_of_train_net_runs_past_bad_files(tmp_path, caplog):
    sys.path.insert(0, str(REPO))
    try:
        from levelset_d2 import engine
    finally:
        sys.path.remove(str(REPO))
    good = _image(tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    records = [
        _record(good, [_ann(1, (10, 10, 50, 40))], image_id=1),
        _record(str(tmp_path / "missing.jpg"), [_ann(2, (10, 10, 50, 40))], image_id=2),
        _record(str(tmp_path / "corrupt.jpg"), [_ann(3, (10, 10, 50, 40))], image_id=3),
    ]
    name = f"reliability_bad_files_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c", "d"])
    cfg = _cfg(SOLVER__IMS_PER_BATCH=2, DATASETS__TRAIN=(name,))
    with caplog.at_level(logging.WARNING, logger="levelset_d2.robust_data"):
        it = iter(engine.Trainer.build_train_loader(cfg))
        batches = [next(it) for _ in range(4)]
    assert all(len(b) == 2 and all(d["file_name"] == good for d in b) for b in batches)
    assert "missing.jpg" in caplog.text and "corrupt.jpg" in caplog.text
    cfg = _cfg(SOLVER__IMS_PER_BATCH=2, DATASETS__TRAIN=(name,), DATALOADER__STRICT=True)
    with pytest.raises(BadSampleError, match=r"(missing|corrupt)\.jpg"):
        it = iter(engine.Trainer.build_train_loader(cfg))
        for _ in range(10):
            next(it)
    # The test loader leaves the unreadable images out (no image may be evaluated twice).
    loader = engine.Trainer.build_test_loader(_cfg(), name)
    assert [d[0]["file_name"] for d in loader] == [good]


def test_registered_coco_datasets_keep_the_annotation_ids_of_the_json(coco_sample_dir):
    """Bad-sample messages name the json's annotation id: load_coco_json must be asked to keep it."""
    import json

    from detectron2.data import DatasetCatalog

    raw = json.loads((coco_sample_dir / "instances_val2017_subset.json").read_text())
    by_image = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], set()).add(a["id"])
    records = DatasetCatalog.get("coco_sample_val2017")
    assert records
    for r in records:
        assert {a["id"] for a in r["annotations"]} <= by_image[r["image_id"]]
        assert len(r["annotations"]) > 0
