"""Configs the tests build models from (imported by the test modules, as _label_studio is)."""
from pathlib import Path

import levelset_rcnn

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "LevelSetRCNN"


def tiny_cfg(*opts, config="tiny_levelset_rcnn_coco_sample.yaml"):
    """The tiny LevelSet R-CNN config of the real-photo tests on the CPU, with overrides (KEY, VALUE, ...)."""
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg
