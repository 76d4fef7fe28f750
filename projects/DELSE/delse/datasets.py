"""The paper's datasets that Detectron2 has no builtin for, registered (lazily) on import as
COCO-format instance datasets under ``$DETECTRON2_DATASETS`` (default ``./datasets``):

- ``delse_pascal_voc2012_train`` / ``delse_pascal_sbd_train`` / ``delse_pascal_voc2012_val``:
  ``pascal_delse/instances_{voc2012_train,sbd_train,voc2012_val}.json`` + ``pascal_delse/JPEGImages``
  (PASCAL VOC 2012 instance masks; SBD's augmented set as in DEXTR, 10582 images).
- ``delse_davis2016_train`` / ``delse_davis2016_val``: ``davis2016/instances_{train,val}.json`` +
  ``davis2016/JPEGImages`` (one instance per frame, the official split).

Cityscapes uses Detectron2's builtin ``cityscapes_fine_instance_seg_{train,val}``; the shared
data (COCO sample, DSB2018) is registered by ``levelset_rcnn``.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["DELSE_DATASETS"]

# name -> (json relative to the datasets root, image folder relative to it)
DELSE_DATASETS = {
    "delse_pascal_voc2012_train": ("pascal_delse/instances_voc2012_train.json", "pascal_delse/JPEGImages"),
    "delse_pascal_sbd_train": ("pascal_delse/instances_sbd_train.json", "pascal_delse/JPEGImages"),
    "delse_pascal_voc2012_val": ("pascal_delse/instances_voc2012_val.json", "pascal_delse/JPEGImages"),
    "delse_davis2016_train": ("davis2016/instances_train.json", "davis2016/JPEGImages"),
    "delse_davis2016_val": ("davis2016/instances_val.json", "davis2016/JPEGImages"),
}


def _root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _register(name, json_rel, image_rel):
    DatasetCatalog.register(
        name, lambda: load_coco_json(os.path.join(_root(), json_rel), os.path.join(_root(), image_rel), name)
    )
    MetadataCatalog.get(name).set(evaluator_type="delse")


for _name, (_json, _images) in DELSE_DATASETS.items():
    if _name not in DatasetCatalog.list():
        _register(_name, _json, _images)
