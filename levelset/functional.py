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

SCHEMES = ("sobel", "central")


def heaviside(z, eps):
    """Smooth Heaviside of LevelSet R-CNN eq. 4 / DELSE eq. 14: ``0.5 * (1 + 2/pi * atan(z / eps))``."""
    return 0.5 + torch.atan(z / eps) / math.pi


def dirac(z, eps):
    """Smooth Dirac delta, the derivative of :func:`heaviside`: ``eps / (pi * (eps^2 + z^2))``."""
    return eps / (math.pi * (eps * eps + z * z))


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown difference scheme {scheme!r}; expected one of {list(SCHEMES)}")


def _d_dx(u, scheme):
    """d/dx (along W) of (R, C, H, W) with replicate padding. Sobel = [1, 2, 1]^T (x) [-1, 0, 1] / 8."""
    p = F.pad(u, (1, 1, 1, 1), mode="replicate")
    d = p[..., :, 2:] - p[..., :, :-2]  # (R, C, H + 2, W)
    if scheme == "central":
        return 0.5 * d[..., 1:-1, :]
    return 0.125 * (d[..., :-2, :] + 2.0 * d[..., 1:-1, :] + d[..., 2:, :])


def _d_dy(u, scheme):
    """d/dy (along H) of (R, C, H, W) with replicate padding."""
    p = F.pad(u, (1, 1, 1, 1), mode="replicate")
    d = p[..., 2:, :] - p[..., :-2, :]  # (R, C, H, W + 2)
    if scheme == "central":
        return 0.5 * d[..., :, 1:-1]
    return 0.125 * (d[..., :, :-2] + 2.0 * d[..., :, 1:-1] + d[..., :, 2:])


def gradient_xy(phi, scheme="sobel"):
    """Spatial gradient of ``phi`` (R, 1, H, W) as a pair ``(d/dx, d/dy)``, each (R, 1, H, W)."""
    _check_scheme(scheme)
    return _d_dx(phi, scheme), _d_dy(phi, scheme)


def divergence_xy(vx, vy, scheme="sobel"):
    """Divergence ``d vx/dx + d vy/dy`` of a vector field given as two (R, 1, H, W) tensors."""
    _check_scheme(scheme)
    return _d_dx(vx, scheme) + _d_dy(vy, scheme)


def gradient(phi, scheme="sobel"):
    """Spatial gradient of ``phi`` (R, 1, H, W) -> ``(R, 2, H, W)`` holding (d/dx, d/dy)."""
    return torch.cat(gradient_xy(phi, scheme), dim=1)


def divergence(field, scheme="sobel"):
    """Divergence of a vector field ``(R, 2, H, W)`` given as (vx, vy) -> ``(R, 1, H, W)``."""
    return divergence_xy(field[:, 0:1], field[:, 1:2], scheme)


def norm_xy(gx, gy, grad_eps=GRAD_EPS):
    """``sqrt(gx^2 + gy^2 + grad_eps^2)`` -> same shape as gx; never zero for grad_eps > 0."""
    return torch.sqrt(gx * gx + gy * gy + grad_eps * grad_eps)


def gradient_norm(grad, grad_eps=GRAD_EPS):
    """``sqrt(|grad|^2 + grad_eps^2)`` of a gradient ``(R, 2, H, W)`` -> ``(R, 1, H, W)``; never zero."""
    return norm_xy(grad[:, 0:1], grad[:, 1:2], grad_eps)


def curvature(phi, scheme="sobel", grad_eps=GRAD_EPS):
    """Mean curvature ``div(grad phi / |grad phi|)`` of ``phi`` (R, 1, H, W) -> ``(R, 1, H, W)``.

    Safe where the gradient vanishes: there the unit normal tends to zero instead of dividing by zero.
    """
    gx, gy = gradient_xy(phi, scheme)
    n = norm_xy(gx, gy, grad_eps)
    return divergence_xy(gx / n, gy / n, scheme)
