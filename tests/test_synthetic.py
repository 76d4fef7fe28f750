import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from scipy import ndimage

from levelset.synthetic import SYNTHETIC_CATEGORIES, generate_coco_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    json_path = generate_coco_dataset(root, num_images=40, image_size=96, seed=3)
    coco = COCO(str(json_path))
    return root, json_path, coco


def test_layout_and_coco_format(synthetic):
    root, json_path, coco = synthetic
    assert json_path == root / "train.json"
    assert len(coco.getImgIds()) == 40
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["disc", "ring", "blob", "pair"]
    for img in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(str(root / "train" / img["file_name"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (img["height"], img["width"], 3) == (96, 96, 3)
    kinds = {type(a["segmentation"]) for a in coco.dataset["annotations"]}
    assert kinds == {list, dict}  # polygons for simple shapes, RLE for holes / occlusion
    for ann in coco.dataset["annotations"]:
        assert ann["iscrowd"] == 0
        if isinstance(ann["segmentation"], dict):
            assert isinstance(ann["segmentation"]["counts"], str)
        if ann["category_id"] == 2:
            assert isinstance(ann["segmentation"], dict)


def test_masks_match_annotations_and_pixels(synthetic):
    root, _, coco = synthetic
    for img in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(str(root / "train" / img["file_name"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        union = np.zeros(image.shape[:2], bool)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y) == (xs.min(), ys.min())
            assert (w, h) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert not (union & mask).any()  # visible masks do not overlap
            union |= mask


def test_deterministic_and_idempotent(tmp_path):
    a = generate_coco_dataset(tmp_path / "a", num_images=5, image_size=64, seed=7)
    b = generate_coco_dataset(tmp_path / "b", num_images=5, image_size=64, seed=7)
    assert json.loads(a.read_text())["annotations"] == json.loads(b.read_text())["annotations"]
    for name in sorted(p.name for p in (tmp_path / "a" / "train").iterdir()):
        a_bytes = (tmp_path / "a" / "train" / name).read_bytes()
        assert a_bytes == (tmp_path / "b" / "train" / name).read_bytes()

    mtime = a.stat().st_mtime_ns
    assert generate_coco_dataset(tmp_path / "a", num_images=5, image_size=64, seed=7) == a
    assert a.stat().st_mtime_ns == mtime  # same parameters: not rewritten
    generate_coco_dataset(tmp_path / "a", num_images=5, image_size=64, seed=8)
    assert json.loads(a.read_text())["info"]["params"]["seed"] == 8

    c = generate_coco_dataset(tmp_path / "c", num_images=5, image_size=64, seed=8)
    assert json.loads(a.read_text())["annotations"] == json.loads(c.read_text())["annotations"]


def test_rings_have_holes_and_pairs_have_two_components(synthetic):
    _, _, coco = synthetic
    ring_id, pair_id = (c["id"] for c in SYNTHETIC_CATEGORIES if c["name"] in ("ring", "pair"))
    ring_anns = coco.loadAnns(coco.getAnnIds(catIds=[ring_id]))
    rings = [coco.annToMask(a).astype(bool) for a in ring_anns]
    with_hole = [ndimage.binary_fill_holes(m).sum() > m.sum() for m in rings]
    assert len(rings) >= 5 and np.mean(with_hole) > 0.5
    for m in (m for m, h in zip(rings, with_hole) if h):  # Euler number 0: one component, one hole
        components = ndimage.label(m, structure=np.ones((3, 3)))[1]
        holes = ndimage.label(ndimage.binary_fill_holes(m) & ~m)[1]
        assert components - holes <= 0

    pairs = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(catIds=[pair_id]))]
    num_components = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in pairs]
    assert len(pairs) >= 5 and sum(n >= 2 for n in num_components) >= len(pairs) // 2

