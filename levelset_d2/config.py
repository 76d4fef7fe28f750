"""One config for every installed project.

``get_cfg()`` is Detectron2's default config plus the keys of this layer (``DATALOADER.STRICT``,
``TEST.BOUNDARY_EVAL``) and of every installed project: each project declares its keys in an
``add_*_config(cfg)`` function and makes it known either by calling :func:`register_config` when it
is imported or through the ``levelset_d2.config`` entry-point group of its distribution
(``setup.py``), which lets ``get_cfg()`` find projects nobody imported yet. A config saved by
any run therefore merges back into ``get_cfg()`` (``DefaultPredictor``, ``--eval-only``).

A renamed key (:func:`register_renamed_key`) is still read under its old name from files, other
configs and override lists, with a warning naming the new one, so configs saved before the rename
keep working.
"""
import logging
from importlib import metadata
from typing import Callable, Dict, List

from detectron2.config import CfgNode as D2CfgNode

__all__ = ["get_cfg", "register_config", "register_renamed_key", "add_shared_config", "check_registered_names",
           "CfgNode"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "levelset_d2.config"
_CONFIG_FUNCTIONS: List[Callable[[D2CfgNode], D2CfgNode]] = []
# Full old key -> full new key.
RENAMED_KEYS: Dict[str, str] = {}


def register_renamed_key(old: str, new: str) -> None:
    """Read ``old`` (a full key, e.g. ``"MODEL.LEVELSET.NUM_STEPS"`` renamed
    ``"MODEL.LEVELSET.EVOLUTION_STEPS"``) as ``new``, with a warning."""
    RENAMED_KEYS[old] = new


def _warn_renamed(old: str, new: str, where: str) -> None:
    logger.warning(f"{where}: {old} is now {new}; read as {new} (rename it there)")


class CfgNode(D2CfgNode):
    """Detectron2's CfgNode that reads the old names of renamed keys (:func:`register_renamed_key`)."""

    def merge_from_other_cfg(self, cfg_other):
        for old, new in RENAMED_KEYS.items():
            *path, last = old.split(".")
            node = cfg_other
            for name in path:
                node = node.get(name) if isinstance(node, dict) else None
            if not isinstance(node, dict) or last not in node:
                continue
            value = node.pop(last)
            *new_path, new_last = new.split(".")
            target = cfg_other
            for name in new_path:
                target = target.setdefault(name, type(self)())
            if new_last in target:
                raise KeyError(f"the config sets both {old} and its new name {new}")
            target[new_last] = value
            _warn_renamed(old, new, "config")
        return super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list: list):
        cfg_list = list(cfg_list)
        for i in range(0, len(cfg_list), 2):
            if cfg_list[i] in RENAMED_KEYS:
                _warn_renamed(cfg_list[i], RENAMED_KEYS[cfg_list[i]], "override list")
                cfg_list[i] = RENAMED_KEYS[cfg_list[i]]
        return super().merge_from_list(cfg_list)


def register_config(add_config: Callable[[D2CfgNode], D2CfgNode]) -> Callable[[D2CfgNode], D2CfgNode]:
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


def add_shared_config(cfg: D2CfgNode) -> D2CfgNode:
    """Keys of this layer, read by both projects' loaders and evaluators."""
    # Raise on a bad sample (unreadable image, unusable annotation) instead of skipping it with a
    # warning (levelset_d2.robust_data).
    cfg.DATALOADER.STRICT = False
    # Add the boundary metrics (AF1, AF2, Boundary AP) beside COCO AP when evaluating detection models.
    cfg.TEST.BOUNDARY_EVAL = True
    # An exponential moving average of the weights, saved as OUTPUT_DIR/model_final_ema.pth at the end of
    # training (levelset_d2.ema). Off by default: Detectron2's recipes are tuned without it.
    cfg.SOLVER.EMA = D2CfgNode()
    cfg.SOLVER.EMA.ENABLED = False
    # Weight of the old average per iteration. 0.995: a half-life of 138 iterations, an averaging window of
    # ~200 (1 / (1 - decay)), about the 200-iteration scale on which the DELSE annotator's checkpoints
    # scatter by +-1.2 mIoU when fine-tuned on coco128-seg (BENCHMARKS.md section 6). Longer schedules
    # take a decay closer to 1 (window ~5-25 % of the schedule).
    cfg.SOLVER.EMA.DECAY = 0.995
    return cfg


def get_cfg() -> CfgNode:
    """Detectron2's default config with the keys of this layer and of every installed project."""
    from detectron2.config import get_cfg as get_detectron2_cfg

    _load_entry_points()
    cfg = add_shared_config(get_detectron2_cfg())
    for add_config in _CONFIG_FUNCTIONS:
        add_config(cfg)
    return CfgNode(cfg)  # every node of this class, which reads renamed keys


def check_registered_names(cfg: D2CfgNode) -> None:
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
