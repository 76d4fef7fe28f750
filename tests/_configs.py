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


def shared_cfg(config, *opts):
    """Any config file with both projects' keys (``levelset_d2.config.get_cfg``), then overrides: for the
    tests of the shared layer on both projects' models."""
    import delse  # noqa: F401  (registration)
    from levelset_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(opts))
    return cfg
