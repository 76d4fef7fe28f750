"""One config for every installed project.

``get_cfg()`` is Detectron2's default config plus the keys of this layer (``DATALOADER.STRICT``,
``TEST.BOUNDARY_EVAL``) and of every installed project: each project declares its keys in an
``add_*_config(cfg)`` function and makes it known either by calling :func:`register_config` when it
is imported or through the ``levelset_d2.config`` entry-point group of its distribution
(``setup.py``), which lets ``get_cfg()`` find projects nobody imported yet. A config saved by
any run therefore merges back into ``get_cfg()`` (``DefaultPredictor``, ``--eval-only``).
"""
import logging
from importlib import metadata
from typing import Callable, List

from detectron2.config import CfgNode

__all__ = ["get_cfg", "register_config", "add_shared_config", "check_registered_names"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "levelset_d2.config"
_CONFIG_FUNCTIONS: List[Callable[[CfgNode], CfgNode]] = []


def register_config(add_config: Callable[[CfgNode], CfgNode]) -> Callable[[CfgNode], CfgNode]:
    """Make ``get_cfg()`` call ``add_config(cfg)`` (idempotent, declares keys only). Returns it."""
    if add_config not in _CONFIG_FUNCTIONS:
        _CONFIG_FUNCTIONS.append(add_config)
    return add_config


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_config(ep.load())
        except ImportError as e:  # an installed project whose dependencies are missing
            logger.warning(f"config of project {ep.name!r} ({ep.value}) not loaded: {e}")


def add_shared_config(cfg: CfgNode) -> CfgNode:
    """Keys of this layer, read by both projects' loaders and evaluators."""
    # Raise on a bad sample (unreadable image, unusable annotation) instead of skipping it with a
    # warning (levelset_d2.robust_data).
    cfg.DATALOADER.STRICT = False
    # Add the boundary metrics (AF1, AF2, Boundary AP) beside COCO AP when evaluating detection models.
    cfg.TEST.BOUNDARY_EVAL = True
    return cfg


def get_cfg() -> CfgNode:
    """Detectron2's default config with the keys of this layer and of every installed project."""
    from detectron2.config import get_cfg as get_detectron2_cfg

    _load_entry_points()
    cfg = add_shared_config(get_detectron2_cfg())
    for add_config in _CONFIG_FUNCTIONS:
        add_config(cfg)
    return cfg


def check_registered_names(cfg: CfgNode) -> None:
    """Raise a ValueError naming the config key when a component name is not registered.

    Detectron2's registries fail with a bare ``KeyError`` deep in ``build_model``; this says which
    key to change and lists the names that would work (import the project that registers the
    component first).
    """
    from detectron2.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        ROI_HEADS_REGISTRY,
        ROI_MASK_HEAD_REGISTRY,
    )

    checks = [("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, META_ARCH_REGISTRY),
              ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY)]
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        checks.append(("MODEL.ROI_HEADS.NAME", cfg.MODEL.ROI_HEADS.NAME, ROI_HEADS_REGISTRY))
        if cfg.MODEL.MASK_ON:
            checks.append(("MODEL.ROI_MASK_HEAD.NAME", cfg.MODEL.ROI_MASK_HEAD.NAME, ROI_MASK_HEAD_REGISTRY))
    for key, name, registry in checks:
        registered = sorted(n for n, _ in registry)
        if name not in registered:
            raise ValueError(f"{key} = {name!r} is not registered; change {key} to one of: {', '.join(registered)}")
