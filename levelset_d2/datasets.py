"""
Datasets of this repository, registered (lazily: importing touches no disk) on import:

- ``synthetic_shapes_train`` / ``synthetic_shapes_val``: ``levelset.synthetic`` shapes (holes,
  several components, textures), generated on first use under ``$LEVELSET_DATA`` (default
  ``<repo>/datasets/synthetic``). Mixed polygon/RLE masks: use ``INPUT.MASK_FORMAT: bitmask``.
- ``dsb2018_train`` / ``dsb2018_dev``: DSB2018 nuclei (RLE masks) from the shared data folder.
- ``coco128_seg_train`` / ``coco128_seg_dev``: coco128-seg, 126 real COCO train2017 photos with every
  instance annotated (100 / 26 images), the 80 official category ids (RLE masks; the polygons are kept
  in the json as ``segmentation_polygon``).
- ``coco128_seg_{train,dev}_agnostic``, ``coco_sample_val2017_agnostic``: the same images and masks
  with one class, ``object`` (crowd regions stay crowd), for a class-agnostic detector.
- ``coco_sample_val2017``: 10 real COCO val2017 images with the official annotations and the 80
  official category ids (same metadata as Detectron2's ``coco_2017_val``).
- ``coco_sample_val2017_fold{0,1}_{train,test}``: 2-fold cross-validation by image of that sample
  (fold k tests on the images at even / odd positions in image-id order and trains on the others), for
  honest held-out numbers on real photos (DELSE's comparison, ``tools/benchmarks/bench_delse.py``).

The shared data folder is ``$LEVELSET_SHARED_DATA`` (default ``<repo>/../shared/data``). COCO,
Cityscapes and LVIS (including ``lvis_v0.5_val_cocofied``) are Detectron2's builtin datasets,
found under ``$DETECTRON2_DATASETS`` (default ``./datasets``).
"""
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

__all__ = ["shared_data_root", "synthetic_root", "prepare_dataset", "image_fold", "SYNTHETIC_SPLITS"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (split, number of images, seed); 128 x 128 images.
SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": ("train", 300, 0),
    "synthetic_shapes_val": ("val", 24, 1),
}
SYNTHETIC_IMAGE_SIZE = 128


def shared_data_root() -> Path:
    """The shared data folder: ``$LEVELSET_SHARED_DATA``, default ``<repo>/../shared/data``. The one
    place that resolves it (datasets, tests, tools)."""
    return Path(os.environ.get("LEVELSET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def synthetic_root() -> Path:
    return Path(os.environ.get("LEVELSET_DATA", REPO_ROOT / "datasets" / "synthetic"))


def _generate_synthetic(name: str) -> Path:
    """Write a synthetic split under the root its metadata names, unless it is already there."""
    from levelset.synthetic import generate_coco_dataset

    split, num_images, seed = SYNTHETIC_SPLITS[name]
    root = Path(MetadataCatalog.get(name).json_file).parent
    # Idempotent: returns at once when the json and images with these parameters exist.
    return Path(
        generate_coco_dataset(root, num_images=num_images, image_size=SYNTHETIC_IMAGE_SIZE,
                              seed=seed, split=split)
    )


def _load_coco_json(json_file, image_root, name):
    """Detectron2's ``load_coco_json``, keeping each annotation's ``id`` (it drops it by default),
    so that a bad annotation is reported by the id it has in the json."""
    return load_coco_json(str(json_file), str(image_root), name, extra_annotation_keys=["id"])


def _register_synthetic(name: str) -> None:
    split = SYNTHETIC_SPLITS[name][0]
    json_file = synthetic_root() / f"{split}.json"  # root fixed at registration (import)

    def load():
        path = _generate_synthetic(name)
        return _load_coco_json(path, path.with_suffix(""), name)

    DatasetCatalog.register(name, load)
    from levelset.synthetic import SYNTHETIC_CATEGORIES

    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        image_root=str(json_file.with_suffix("")),
        evaluator_type="coco",
        thing_classes=[c["name"] for c in SYNTHETIC_CATEGORIES],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)},
    )


def _register_coco_json(name: str, json_file: Path, image_root: Path, **metadata) -> None:
    """``register_coco_instances`` with extra metadata; nothing is read until the dataset is used."""
    DatasetCatalog.register(name, lambda: _load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=str(json_file), image_root=str(image_root), evaluator_type="coco", **metadata
    )


def image_fold(records, fold: int, num_folds: int, split: str):
    """Cross-validation by image: sorted by image id, the images at positions ``i % num_folds == fold``
    are the ``"test"`` split of that fold, the others its ``"train"`` split."""
    records = sorted(records, key=lambda r: r["image_id"])
    return [r for i, r in enumerate(records) if (i % num_folds == fold) == (split == "test")]


# The class-agnostic sets' one class, written as category id 1 in the ground truth that COCOEvaluator
# converts from the relabelled dataset dicts.
AGNOSTIC_IDS = {1: 0}


def class_agnostic(records):
    """Dataset dicts with every instance relabelled to class 0 (``object``); the records are copied."""
    out = []
    for r in records:
        r = dict(r)
        r["annotations"] = [dict(a, category_id=0) for a in r["annotations"]]
        out.append(r)
    return out


def prepare_dataset(name: str) -> None:
    """Create a dataset's files if this repository generates them (the synthetic splits)."""
    if name in SYNTHETIC_SPLITS:
        _generate_synthetic(name)


def register_all() -> None:
    for name in SYNTHETIC_SPLITS:
        if name not in DatasetCatalog.list():
            _register_synthetic(name)
    shared = shared_data_root()
    dsb = shared / "dsb2018"
    for name, split in [("dsb2018_train", "train"), ("dsb2018_dev", "dev")]:
        if name not in DatasetCatalog.list():
            _register_coco_json(
                name, dsb / f"{split}.json", dsb / "images",
                thing_classes=["nucleus"], thing_dataset_id_to_contiguous_id={1: 0},
            )
    coco128 = shared / "coco128_seg"
    for split in ("train", "dev"):
        if f"coco128_seg_{split}" not in DatasetCatalog.list():
            _register_coco_json(f"coco128_seg_{split}", coco128 / f"{split}.json", coco128 / "images",
                                **_get_builtin_metadata("coco"))
    if "coco_sample_val2017" not in DatasetCatalog.list():
        coco = shared / "coco_val2017_sample"
        meta = _get_builtin_metadata("coco")  # the 80 official ids and class names, colors
        _register_coco_json(
            "coco_sample_val2017", coco / "instances_val2017_subset.json", coco / "images", **meta
        )
    for fold in (0, 1):
        for split in ("train", "test"):
            name = f"coco_sample_val2017_fold{fold}_{split}"
            if name not in DatasetCatalog.list():
                DatasetCatalog.register(name, lambda f=fold, s=split: image_fold(
                    DatasetCatalog.get("coco_sample_val2017"), f, 2, s))
                MetadataCatalog.get(name).set(**_get_builtin_metadata("coco"))
    for name in ("coco128_seg_train", "coco128_seg_dev", "coco_sample_val2017"):
        if f"{name}_agnostic" not in DatasetCatalog.list():
            DatasetCatalog.register(f"{name}_agnostic", lambda n=name: class_agnostic(DatasetCatalog.get(n)))
            # No json_file: Detectron2's COCOEvaluator writes the relabelled ground truth itself.
            MetadataCatalog.get(f"{name}_agnostic").set(
                image_root=MetadataCatalog.get(name).image_root, evaluator_type="coco",
                thing_classes=["object"], thing_dataset_id_to_contiguous_id=AGNOSTIC_IDS)


register_all()
