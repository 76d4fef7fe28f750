"""Pointwise and finite-difference operators on batched level-set functions.

Every function takes tensors shaped ``(R, 1, H, W)`` (R instances) unless stated otherwise and is
differentiable. Spatial derivatives are in grid units (one pixel = 1) with replicate padding, i.e.
a zero normal derivative at the image border.

Two difference schemes share one implementation:
- ``"sobel"``: the Sobel operator divided by 8, as LevelSet R-CNN computes gradient and divergence.
- ``"central"``: central differences ``(f[i+1] - f[i-1]) / 2``, as DELSE does.
"""
import math

import torch
import torch.nn.functional as F

# Added in quadrature to |grad phi| so that the unit normal stays finite where phi is flat.
GRAD_EPS = 1e-3

_KERNELS = {
    # d/dx (along W) and d/dy (along H); the kernels are correlated, as F.conv2d does.
    "sobel": (
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
        [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],
        1.0 / 8.0,
    ),
    "central": (
        [[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
        [[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        1.0 / 2.0,
    ),
}


def heaviside(z, eps):
    """Smooth Heaviside of LevelSet R-CNN eq. 4 / DELSE eq. 14: ``0.5 * (1 + 2/pi * atan(z / eps))``."""
    return 0.5 + torch.atan(z / eps) / math.pi


def dirac(z, eps):
    """Smooth Dirac delta, the derivative of :func:`heaviside`: ``eps / (pi * (eps^2 + z^2))``."""
    return eps / (math.pi * (eps * eps + z * z))


def _kernel(scheme, dtype, device):
    try:
        kx, ky, scale = _KERNELS[scheme]
    except KeyError:
        raise ValueError(f"unknown difference scheme {scheme!r}; expected one of {sorted(_KERNELS)}")
    k = torch.tensor([kx, ky], dtype=dtype, device=device) * scale
    return k  # (2, 3, 3)


def gradient(phi, scheme="sobel"):
    """Spatial gradient of ``phi`` (R, 1, H, W) -> ``(R, 2, H, W)`` holding (d/dx, d/dy)."""
    k = _kernel(scheme, phi.dtype, phi.device).unsqueeze(1)  # (2, 1, 3, 3)
    return F.conv2d(F.pad(phi, (1, 1, 1, 1), mode="replicate"), k)


def divergence(field, scheme="sobel"):
    """Divergence of a vector field ``(R, 2, H, W)`` given as (vx, vy) -> ``(R, 1, H, W)``."""
    k = _kernel(scheme, field.dtype, field.device).unsqueeze(0)  # (1, 2, 3, 3): sums d vx/dx + d vy/dy
    return F.conv2d(F.pad(field, (1, 1, 1, 1), mode="replicate"), k)


def gradient_norm(grad, grad_eps=GRAD_EPS):
    """``sqrt(|grad|^2 + grad_eps^2)`` of a gradient ``(R, 2, H, W)`` -> ``(R, 1, H, W)``; never zero."""
    return torch.sqrt((grad * grad).sum(dim=1, keepdim=True) + grad_eps * grad_eps)


def curvature(phi, scheme="sobel", grad_eps=GRAD_EPS):
    """Mean curvature ``div(grad phi / |grad phi|)`` of ``phi`` (R, 1, H, W) -> ``(R, 1, H, W)``.

    Safe where the gradient vanishes: there the unit normal tends to zero instead of dividing by zero.
    """
    g = gradient(phi, scheme)
    return divergence(g / gradient_norm(g, grad_eps), scheme)
