"""Shared level-set core of LevelSet R-CNN and DELSE: pure PyTorch, no Detectron2 import.

Tensors are batched over instances: level sets are ``(R, 1, H, W)``, feature maps ``(R, C, H, W)``.

Submodules imported on demand (they need pycocotools / OpenCV): ``levelset.metrics`` (boundary F,
AF1/AF2, Boundary IoU and Boundary AP, DAVIS J/F) and ``levelset.synthetic`` (the built-in dataset).
"""
from .evolution import chan_vese, chan_vese_energy, delse_evolve
from .functional import curvature, dirac, divergence, gradient, gradient_norm, heaviside
from .tsdf import direction_field, mask_to_tsdf, signed_distance

__all__ = [
    "chan_vese",
    "chan_vese_energy",
    "curvature",
    "delse_evolve",
    "direction_field",
    "dirac",
    "divergence",
    "gradient",
    "gradient_norm",
    "heaviside",
    "mask_to_tsdf",
    "signed_distance",
]
