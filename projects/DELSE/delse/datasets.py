"""The paper's datasets that Detectron2 has no builtin for, read from their standard folders and
registered (lazily) on import, under ``$DETECTRON2_DATASETS`` (default ``./datasets``):

- PASCAL VOC 2012 (``VOC2012/``, the ``VOCdevkit/VOC2012`` folder of the official tar):
  ``JPEGImages/``, ``SegmentationObject/`` (palette PNG, value k = instance k, 255 = void),
  ``SegmentationClass/`` and ``ImageSets/Segmentation/{train,val}.txt``.
  Names: ``delse_pascal_voc2012_train`` (1464 images), ``delse_pascal_voc2012_val`` (1449).
- SBD (``SBD/``, the ``benchmark_RELEASE/dataset`` folder of the official tar): ``img/*.jpg``,
  ``inst/*.mat`` (``GTinst.Segmentation`` instance map, ``GTinst.Categories``), ``{train,val}.txt``.
  ``delse_pascal_sbd_train``: PASCAL train + SBD train/val without the PASCAL val images, PASCAL's
  annotation where both have one (DEXTR's "augmented" set: 10582 images).
- DAVIS 2016 (``DAVIS/``): ``JPEGImages/480p/<sequence>/*.jpg``, ``Annotations/480p/<sequence>/*.png``
  and either the 2016 lists ``ImageSets/480p/{train,val}.txt`` (image/annotation path pairs) or the
  2017-layout lists ``ImageSets/2016/{train,val}.txt`` (sequence names). Every annotated frame is
  one image with one object (pixels > 0). Names: ``delse_davis2016_{train,val}``.
- Cityscapes with Polygon-RNN's split (the papers' Cityscapes-Stretching/-Hard protocols), read
  by Detectron2's own ``load_cityscapes_instances`` from ``cityscapes/{leftImg8bit,gtFine}``:
  ``delse_cityscapes_polyrnn_train`` (the 16 train cities other than weimar and zurich),
  ``delse_cityscapes_polyrnn_val`` (weimar, zurich), ``delse_cityscapes_polyrnn_test`` (the
  official val split, where the papers report), and for the interactive model (section 5.3)
  ``delse_cityscapes_polyrnn_train_{10,6}cities`` (the 16 cities split 10 / 6).

Shared data (``$LEVELSET_SHARED_DATA``, default ``<repo>/../shared/data``; see its README), for
DELSE only:

- COCO-MVal (``coco_mval/``: 800 objects, 10 per COCO class, on val2017 photos; split by image):
  ``delse_coco_mval_train`` (561 images, 610 objects) and ``delse_coco_mval_dev`` (161, 190), one
  category "object". Only the listed objects are annotated, so these are per-object (extreme point)
  data: never train or score a detector on them.
- The interactive fine-tuning split (section 5.3: DELSE* is trained on 10 of the 16 Cityscapes
  training cities and its interactive model fine-tuned on the other 6): ``<train>_base`` and
  ``<train>_interactive`` split a training set by image, 6/16 of the images held out for the
  fine-tuning, deterministically (:func:`interactive_split`), for ``delse_dsb2018_train`` (of
  ``dsb2018_train``) and ``delse_coco_mval_train``.

Masks are COCO RLE dicts (use them with ``INPUT.MASK_FORMAT: bitmask`` in Mask R-CNN configs;
DELSE's mapper reads any format). PASCAL's void pixels (the 5 px band around every object and
unlabelled regions) are kept per image as ``record["void_segmentation"]`` (RLE), which
:class:`delse.DELSEEvaluator` leaves out of the IoU, as DEXTR's evaluation does.
Category ids are 0-based contiguous: the 20 VOC classes in their usual order; DAVIS has one,
"object". A missing folder raises ``FileNotFoundError`` naming it; an annotation that cannot be read
raises an error naming the file.
"""
import logging
import os
import zlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .data import mask_box

logger = logging.getLogger(__name__)

__all__ = [
    "VOC_CLASSES",
    "CITYSCAPES_POLYRNN_CITIES",
    "load_voc_instances",
    "load_sbd_instances",
    "load_pascal_sbd_instances",
    "load_davis2016",
    "load_cityscapes_polyrnn",
    "register_delse_datasets",
    "interactive_split",
    "INTERACTIVE_FRACTION",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# Polygon-RNN (Castrejon et al., CVPR 2017), followed by Polygon-RNN++ and DELSE: the official val
# split is the test set, weimar and zurich the validation set, the other 16 training cities the
# training set. DELSE section 5.3 trains on 10 of the 16 and fine-tunes the interactive model on
# the other 6 without naming them: we take them in alphabetical order.
_TRAIN_CITIES = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
    "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm",
)
CITYSCAPES_POLYRNN_CITIES = {
    "train": _TRAIN_CITIES,
    "val": ("weimar", "zurich"),
    "train_10cities": _TRAIN_CITIES[:10],
    "train_6cities": _TRAIN_CITIES[10:],
}


def _rle(mask):
    """(H, W) bool -> COCO RLE dict with a str 'counts' (json-serialisable)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(mask):
    return [float(v) for v in mask_box(mask)]


def _require(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (see delse.datasets for the expected standard layout)")
    return path


def _read_ids(list_file):
    with open(_require(list_file)) as f:
        return [line.split()[0] for line in f if line.strip()]


def _instances_from_maps(instance_map, class_of, void, source):
    """Instance map (H, W) int + {instance value -> 1-based VOC class} -> annotation dicts."""
    anns = []
    for k in sorted(class_of):
        mask = instance_map == k
        if not mask.any():
            continue
        cls = int(class_of[k])
        if not 1 <= cls <= len(VOC_CLASSES):
            raise ValueError(f"{source}: instance {k} has class {cls}, outside 1..{len(VOC_CLASSES)}")
        anns.append({"bbox": _box(mask), "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls - 1,
                     "segmentation": _rle(mask), "iscrowd": 0})
    record_void = _rle(void) if void is not None and void.any() else None
    return anns, record_void


def _voc_record(root, image_id):
    obj_file = os.path.join(root, "SegmentationObject", image_id + ".png")
    cls_file = os.path.join(root, "SegmentationClass", image_id + ".png")
    try:
        obj = np.asarray(Image.open(_require(obj_file)))  # palette indices, not colours
        cls = np.asarray(Image.open(_require(cls_file)))
    except (OSError, ValueError) as e:
        raise type(e)(f"cannot read the annotation of {image_id}: {e}") from e
    if obj.ndim != 2 or obj.shape != cls.shape:
        raise ValueError(f"{obj_file}: expected a palette PNG of the same size as {cls_file}")
    class_of = {}
    for k in np.unique(obj):
        if k in (0, 255):
            continue
        labels = cls[(obj == k) & (cls != 0) & (cls != 255)]
        if labels.size == 0:
            logger.warning(f"{obj_file}: instance {k} has no class pixels in {cls_file}; skipped")
            continue
        class_of[int(k)] = int(np.bincount(labels).argmax())
    anns, void = _instances_from_maps(obj, class_of, obj == 255, obj_file)
    record = {"file_name": os.path.join(root, "JPEGImages", image_id + ".jpg"), "image_id": image_id,
              "height": obj.shape[0], "width": obj.shape[1], "annotations": anns}
    if void is not None:
        record["void_segmentation"] = void
    return record


def load_voc_instances(root, split):
    """PASCAL VOC 2012 instance masks of ``ImageSets/Segmentation/<split>.txt``.

    Args:
        root (str): the ``VOC2012`` folder.
        split (str): "train", "val" or "trainval".

    Returns:
        list[dict]: Detectron2 records with RLE masks and ``void_segmentation``.
    """
    ids = _read_ids(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"))
    return [_voc_record(root, i) for i in ids]


def _sbd_record(root, image_id):
    from scipy.io import loadmat

    mat_file = os.path.join(root, "inst", image_id + ".mat")
    try:
        gt = loadmat(_require(mat_file), squeeze_me=True, struct_as_record=False)["GTinst"]
        inst = np.asarray(gt.Segmentation)
        categories = np.atleast_1d(gt.Categories)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise type(e)(f"cannot read the SBD annotation {mat_file}: {e}") from e
    # Instance k (1-based value in the map) has class Categories[k - 1].
    class_of = {k + 1: int(c) for k, c in enumerate(categories)}
    anns, _ = _instances_from_maps(inst, class_of, None, mat_file)
    return {"file_name": os.path.join(root, "img", image_id + ".jpg"), "image_id": image_id,
            "height": inst.shape[0], "width": inst.shape[1], "annotations": anns}


def load_sbd_instances(root, split):
    """SBD instance masks of ``<split>.txt`` ("train" or "val"); ``root`` is SBD's ``dataset`` folder."""
    return [_sbd_record(root, i) for i in _read_ids(os.path.join(root, split + ".txt"))]


def load_pascal_sbd_instances(voc_root, sbd_root):
    """DEXTR's augmented training set: VOC 2012 train + SBD train/val minus VOC 2012 val.

    Images in both VOC train and SBD keep VOC's annotation (finer, with void); SBD images that
    are in VOC val are left out, so no evaluation image is trained on.
    """
    voc = load_voc_instances(voc_root, "train")
    exclude = {r["image_id"] for r in voc}
    exclude |= set(_read_ids(os.path.join(voc_root, "ImageSets", "Segmentation", "val.txt")))
    sbd_ids = []
    for split in ("train", "val"):
        sbd_ids += [i for i in _read_ids(os.path.join(sbd_root, split + ".txt")) if i not in exclude]
    sbd_ids = sorted(set(sbd_ids))
    logger.info(f"PASCAL+SBD: {len(voc)} VOC train images + {len(sbd_ids)} SBD images")
    return voc + [_sbd_record(sbd_root, i) for i in sbd_ids]


def _davis_frames(root, split):
    """[(image path, annotation path)] of a DAVIS 2016 split, from either list format."""
    old = os.path.join(root, "ImageSets", "480p", split + ".txt")
    if os.path.exists(old):  # DAVIS 2016: "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png"
        with open(old) as f:
            pairs = [line.split() for line in f if line.strip()]
        return [(os.path.join(root, a.lstrip("/")), os.path.join(root, b.lstrip("/"))) for a, b in pairs]
    sequences = _read_ids(os.path.join(root, "ImageSets", "2016", split + ".txt"))
    frames = []
    for seq in sequences:
        ann_dir = _require(os.path.join(root, "Annotations", "480p", seq))
        for name in sorted(os.listdir(ann_dir)):
            if name.endswith(".png"):
                stem = os.path.splitext(name)[0]
                frames.append((os.path.join(root, "JPEGImages", "480p", seq, stem + ".jpg"),
                               os.path.join(ann_dir, name)))
    return frames


def load_davis2016(root, split):
    """DAVIS 2016 frames of ``split`` ("train" or "val"), one object per frame (category 0).

    Frames whose annotation is empty (the object is out of view) are skipped and counted in the log.
    """
    records, empty = [], 0
    for image_file, ann_file in _davis_frames(root, split):
        try:
            mask = np.asarray(Image.open(_require(ann_file)).convert("L")) > 0
        except OSError as e:
            raise OSError(f"cannot read the DAVIS annotation {ann_file}: {e}") from e
        if not mask.any():
            empty += 1
            continue
        seq, frame = ann_file.split(os.sep)[-2:]
        records.append({
            "file_name": image_file, "image_id": f"{seq}/{os.path.splitext(frame)[0]}",
            "height": mask.shape[0], "width": mask.shape[1],
            "annotations": [{"bbox": _box(mask), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                             "segmentation": _rle(mask), "iscrowd": 0}],
        })
    logger.info(f"DAVIS 2016 {split}: {len(records)} frames ({empty} with an empty annotation skipped)")
    return records


def load_cityscapes_polyrnn(root, split):
    """Cityscapes fine instances with Polygon-RNN's split.

    Args:
        root (str): the folder holding ``leftImg8bit/`` and ``gtFine/`` (needs ``cityscapesscripts``).
        split (str): "train" (16 cities), "val" (weimar, zurich), "test" (the official val), or
            "train_10cities" / "train_6cities" (the interactive model's split, section 5.3).
    """
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    official = "val" if split == "test" else "train"
    image_dir = _require(os.path.join(root, "leftImg8bit", official))
    gt_dir = _require(os.path.join(root, "gtFine", official))
    records = load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)
    if split == "test":
        return records
    cities = CITYSCAPES_POLYRNN_CITIES[split]
    return [r for r in records if os.path.basename(os.path.dirname(r["file_name"])) in cities]


# Share of a training set's images held out for the interactive fine-tuning (the paper's 6 of 16 cities).
INTERACTIVE_FRACTION = 6 / 16


def interactive_split(records, part, fraction=INTERACTIVE_FRACTION):
    """Split image records for DELSE's interactive fine-tuning (section 5.3), by image.

    The images are ordered by the CRC-32 of their file name (independent of the records' order and
    of any random state) and the first ``round(fraction * n)`` form the "interactive" part, the
    others the "base" part, on which the model is pre-trained and jointly trained.

    Args:
        records: list of Detectron2 image records; part: "base" or "interactive".
    Returns:
        the records of that part, in their original order.
    """
    if part not in ("base", "interactive"):
        raise ValueError(f"part must be 'base' or 'interactive', got {part!r}")
    order = sorted(range(len(records)),
                   key=lambda i: (zlib.crc32(os.path.basename(records[i]["file_name"]).encode()), i))
    held = set(order[: int(round(fraction * len(records)))])
    return [r for i, r in enumerate(records) if (i in held) == (part == "interactive")]


def load_coco_mval(split, root=None):
    """COCO-MVal ``split`` ("train" or "dev") from ``<root>/coco_mval`` (default: the shared data
    folder of ``levelset_d2.datasets``): RLE masks, category 0 ("object"), ``mval_name`` kept."""
    from detectron2.data.datasets import load_coco_json
    from levelset_d2.datasets import shared_data_root

    folder = os.path.join(root or str(shared_data_root()), "coco_mval")
    # The dataset name makes load_coco_json map the json's category id 1 to the contiguous 0.
    return load_coco_json(_require(os.path.join(folder, f"{split}.json")), os.path.join(folder, "images"),
                          f"delse_coco_mval_{split}", extra_annotation_keys=["mval_name"])


def _root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


# name -> (loader of the datasets root, thing classes)
_DATASETS = {
    "delse_pascal_voc2012_train": (lambda r: load_voc_instances(os.path.join(r, "VOC2012"), "train"), VOC_CLASSES),
    "delse_pascal_voc2012_val": (lambda r: load_voc_instances(os.path.join(r, "VOC2012"), "val"), VOC_CLASSES),
    "delse_pascal_sbd_train": (
        lambda r: load_pascal_sbd_instances(os.path.join(r, "VOC2012"), os.path.join(r, "SBD")), VOC_CLASSES),
    "delse_davis2016_train": (lambda r: load_davis2016(os.path.join(r, "DAVIS"), "train"), ("object",)),
    "delse_davis2016_val": (lambda r: load_davis2016(os.path.join(r, "DAVIS"), "val"), ("object",)),
}
# Detectron2's builtin Cityscapes registration holds the 8 instance classes in its order.
CITYSCAPES_THING_CLASSES = MetadataCatalog.get("cityscapes_fine_instance_seg_train").thing_classes
for _split in ("train", "val", "test", "train_10cities", "train_6cities"):
    _DATASETS[f"delse_cityscapes_polyrnn_{_split}"] = (
        lambda r, s=_split: load_cityscapes_polyrnn(os.path.join(r, "cityscapes"), s), CITYSCAPES_THING_CLASSES)


# name -> (loader of the records, thing classes): the shared data and the interactive splits.
_SHARED = {
    "delse_coco_mval_train": (lambda: load_coco_mval("train"), ("object",)),
    "delse_coco_mval_dev": (lambda: load_coco_mval("dev"), ("object",)),
}
for _train, _source, _classes in [("delse_dsb2018_train", "dsb2018_train", ("nucleus",)),
                                   ("delse_coco_mval_train", "delse_coco_mval_train", ("object",))]:
    for _part in ("base", "interactive"):
        _SHARED[f"{_train}_{_part}"] = (
            lambda s=_source, p=_part: interactive_split(DatasetCatalog.get(s), p), _classes)


def register_delse_datasets(root=None):
    """Register every dataset above (idempotent); ``root`` defaults to ``$DETECTRON2_DATASETS``,
    read when a dataset is loaded, not at import."""
    for name, (load, classes) in _DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda load=load: load(root or _root()))
        meta = MetadataCatalog.get(name)
        meta.set(evaluator_type="delse", thing_classes=list(classes))
        if name.startswith("delse_davis"):
            meta.set(video_sequences=True)  # J/F per sequence, as the DAVIS toolkit (DELSEEvaluator)
    for name, (load, classes) in _SHARED.items():
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(evaluator_type="delse", thing_classes=list(classes))


register_delse_datasets()
