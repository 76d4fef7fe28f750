"""The PASCAL VOC / SBD / DAVIS 2016 / Cityscapes (Polygon-RNN split) loaders of delse.datasets,
on tiny copies of each dataset's standard folder layout written here."""
import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

import delse  # noqa: F401  (registers the datasets)
from delse import datasets
from delse.data import decode_mask, flatten_instances
from delse.evaluation import instance_scores
from detectron2.data import DatasetCatalog, MetadataCatalog

H, W = 20, 30


def _palette_png(path, array):
    img = Image.fromarray(array.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])  # colours != indices
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def _jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path)


def _write_list(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(ids) + "\n")


def _voc_maps():
    """Two objects: instance 1 a 'cat' (class 8) square, instance 2 a 'person' (15) bar; a void band."""
    obj = np.zeros((H, W), np.uint8)
    cls = np.zeros((H, W), np.uint8)
    obj[2:8, 3:9], cls[2:8, 3:9] = 1, 8
    obj[10:18, 20:24], cls[10:18, 20:24] = 2, 15
    obj[1, 2:10] = 255  # void band above the cat
    cls[1, 2:10] = 255
    return obj, cls


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    obj, cls = _voc_maps()
    for image_id in ("2007_000001", "2007_000002", "2007_000003"):
        _palette_png(str(root / "SegmentationObject" / f"{image_id}.png"), obj)
        _palette_png(str(root / "SegmentationClass" / f"{image_id}.png"), cls)
        _jpg(str(root / "JPEGImages" / f"{image_id}.jpg"))
    _write_list(str(root / "ImageSets" / "Segmentation" / "train.txt"), ["2007_000001"])
    _write_list(str(root / "ImageSets" / "Segmentation" / "val.txt"), ["2007_000002"])
    return root


@pytest.fixture
def sbd_root(tmp_path):
    root = tmp_path / "SBD"
    inst = np.zeros((H, W), np.uint8)
    inst[5:15, 5:15] = 1   # class 12 (dog)
    inst[0:4, 25:30] = 2   # class 1 (aeroplane)
    for image_id in ("2007_000001", "2007_000002", "2008_000009", "2008_000010"):
        os.makedirs(root / "inst", exist_ok=True)
        savemat(str(root / "inst" / f"{image_id}.mat"),
                {"GTinst": {"Segmentation": inst, "Categories": np.array([[12], [1]], np.uint8),
                            "Boundaries": np.zeros((2, 1), object)}})
        _jpg(str(root / "img" / f"{image_id}.jpg"))
    # 2007_000001 is in VOC train (VOC's copy wins), 2007_000002 in VOC val (left out).
    _write_list(str(root / "train.txt"), ["2007_000001", "2008_000009"])
    _write_list(str(root / "val.txt"), ["2007_000002", "2008_000010"])
    return root


def test_voc_instances_classes_masks_and_void(voc_root):
    (record,) = datasets.load_voc_instances(str(voc_root), "train")
    assert record["file_name"].endswith("JPEGImages/2007_000001.jpg") and (record["height"], record["width"]) == (H, W)
    anns = record["annotations"]
    assert [a["category_id"] for a in anns] == [datasets.VOC_CLASSES.index("cat"), datasets.VOC_CLASSES.index("person")]
    obj, _ = _voc_maps()
    for k, a in enumerate(anns, start=1):
        np.testing.assert_array_equal(decode_mask(a["segmentation"], H, W), obj == k)
    assert anns[0]["bbox"] == [3.0, 2.0, 9.0, 8.0]
    np.testing.assert_array_equal(decode_mask(record["void_segmentation"], H, W), obj == 255)


def test_void_pixels_are_left_out_of_the_iou(voc_root):
    (record,) = datasets.load_voc_instances(str(voc_root), "train")
    gt = decode_mask(record["annotations"][0]["segmentation"], H, W)
    void = decode_mask(record["void_segmentation"], H, W)
    pred = gt | void  # spills into the void band only
    assert instance_scores(pred, gt, [1.0], void)["iou"] == 1.0
    assert instance_scores(pred, gt, [1.0])["iou"] == pytest.approx(gt.sum() / (gt | void).sum())


def test_sbd_instances_and_the_augmented_set(voc_root, sbd_root):
    (record,) = datasets.load_sbd_instances(str(sbd_root), "val")[1:]
    assert [a["category_id"] for a in record["annotations"]] == [11, 0]
    assert record["annotations"][0]["bbox"] == [5.0, 5.0, 15.0, 15.0]
    aug = datasets.load_pascal_sbd_instances(str(voc_root), str(sbd_root))
    # VOC train's image (VOC annotation) + the two SBD-only images; the VOC val image is left out.
    assert [r["image_id"] for r in aug] == ["2007_000001", "2008_000009", "2008_000010"]
    assert aug[0]["file_name"].startswith(str(voc_root)) and "void_segmentation" in aug[0]
    assert all(r["file_name"].startswith(str(sbd_root)) for r in aug[1:])


def _davis(root, list_format):
    seqs = {"bear": "train", "car": "val"}
    for seq in seqs:
        for t in range(3):
            mask = np.zeros((H, W), np.uint8)
            if not (seq == "car" and t == 2):  # the car leaves the view in its last frame
                mask[4 + t:10 + t, 5:12] = 255
            os.makedirs(root / "Annotations" / "480p" / seq, exist_ok=True)
            Image.fromarray(mask).save(root / "Annotations" / "480p" / seq / f"{t:05d}.png")
            _jpg(str(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg"))
    for split in ("train", "val"):
        names = [s for s, sp in seqs.items() if sp == split]
        if list_format == "2016":
            lines = [f"/JPEGImages/480p/{s}/{t:05d}.jpg /Annotations/480p/{s}/{t:05d}.png" for s in names for t in range(3)]
            _write_list(str(root / "ImageSets" / "480p" / f"{split}.txt"), lines)
        else:
            _write_list(str(root / "ImageSets" / "2016" / f"{split}.txt"), names)


@pytest.mark.parametrize("list_format", ["2016", "2017"])
def test_davis2016_frames_from_either_list_format(tmp_path, list_format):
    root = tmp_path / "DAVIS"
    _davis(root, list_format)
    train = datasets.load_davis2016(str(root), "train")
    val = datasets.load_davis2016(str(root), "val")
    assert [r["image_id"] for r in train] == ["bear/00000", "bear/00001", "bear/00002"]
    assert [r["image_id"] for r in val] == ["car/00000", "car/00001"]  # the empty frame is skipped
    (ann,) = train[1]["annotations"]
    assert ann["category_id"] == 0 and ann["bbox"] == [5.0, 5.0, 12.0, 11.0]
    assert os.path.exists(train[1]["file_name"])


def test_registered_names_read_the_datasets_root(tmp_path, voc_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    records = DatasetCatalog.get("delse_pascal_voc2012_val")
    assert [r["image_id"] for r in records] == ["2007_000002"]
    assert len(flatten_instances(records)) == 2
    assert MetadataCatalog.get("delse_pascal_voc2012_val").thing_classes == list(datasets.VOC_CLASSES)
    assert MetadataCatalog.get("delse_cityscapes_polyrnn_test").evaluator_type == "delse"
    with pytest.raises(FileNotFoundError, match="DAVIS"):
        DatasetCatalog.get("delse_davis2016_val")


def test_a_broken_annotation_names_its_file(voc_root):
    (voc_root / "SegmentationObject" / "2007_000001.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="2007_000001"):
        datasets.load_voc_instances(str(voc_root), "train")


def test_cityscapes_polyrnn_split_by_city(monkeypatch):
    fake = [{"file_name": f"/cs/leftImg8bit/train/{c}/{c}_000000_000019_leftImg8bit.png"}
            for c in ("aachen", "weimar", "zurich", "bremen", "ulm")]
    import detectron2.data.datasets.cityscapes as cs

    monkeypatch.setattr(cs, "load_cityscapes_instances", lambda *a, **k: list(fake))
    monkeypatch.setattr(datasets, "_require", lambda p: p)
    city = lambda rs: [r["file_name"].split("/")[-2] for r in rs]
    assert city(datasets.load_cityscapes_polyrnn("/cs", "train")) == ["aachen", "bremen", "ulm"]
    assert city(datasets.load_cityscapes_polyrnn("/cs", "val")) == ["weimar", "zurich"]
    assert city(datasets.load_cityscapes_polyrnn("/cs", "train_10cities")) == ["aachen", "bremen"]
    assert city(datasets.load_cityscapes_polyrnn("/cs", "train_6cities")) == ["ulm"]
    assert len(datasets.load_cityscapes_polyrnn("/cs", "test")) == 5


def test_coco_sample_folds_partition_the_images(coco_sample_dir):
    import delse

    all_ids = {r["image_id"] for r in DatasetCatalog.get("coco_sample_val2017")}
    tests = []
    for k in (0, 1):
        train = {r["image_id"] for r in DatasetCatalog.get(f"coco_sample_val2017_fold{k}_train")}
        test = {r["image_id"] for r in DatasetCatalog.get(f"coco_sample_val2017_fold{k}_test")}
        assert train and test and not train & test and train | test == all_ids
        tests.append(test)
    assert not tests[0] & tests[1] and len(tests[0]) == len(tests[1]) == len(all_ids) // 2
