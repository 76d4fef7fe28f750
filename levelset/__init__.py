"""Shared level-set core of LevelSet R-CNN and DELSE: pure PyTorch, no Detectron2 import.

Tensors are batched over instances: level sets are ``(R, 1, H, W)``, feature maps ``(R, C, H, W)``.

Submodules imported on demand (they need pycocotools / OpenCV): ``levelset.metrics`` (boundary F,
AF1/AF2, Boundary IoU and Boundary AP, DAVIS J/F) and ``levelset.synthetic`` (the built-in dataset).
"""
from .evolution import chan_vese, chan_vese_energy, delse_evolve, sign_flips
from .functional import curvature, dirac, divergence, divergence_xy, gradient, gradient_norm, gradient_xy, heaviside, norm_xy
from .tsdf import direction_field, enforce_drag, mask_to_tsdf, signed_distance

__all__ = [
    "chan_vese",
    "chan_vese_energy",
    "curvature",
    "delse_evolve",
    "direction_field",
    "dirac",
    "divergence",
    "divergence_xy",
    "enforce_drag",
    "gradient",
    "gradient_norm",
    "gradient_xy",
    "heaviside",
    "mask_to_tsdf",
    "norm_xy",
    "signed_distance",
    "sign_flips",
]
