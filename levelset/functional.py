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
    return (eps / math.pi) / (eps * eps + z * z)


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown difference scheme {scheme!r}; expected one of {list(SCHEMES)}")


# Each scheme's difference stencil is ``_SCALE[scheme]`` times an integer one.
_SCALE = {"sobel": 0.125, "central": 0.5}


def _pad(u):
    return F.pad(u, (1, 1, 1, 1), mode="replicate")


def _dx_unscaled(p, scheme):
    """d/dx (along W) of (R, C, H, W) given replicate-padded to (R, C, H + 2, W + 2), divided by
    ``_SCALE[scheme]``. Sobel = [1, 2, 1]^T (x) [-1, 0, 1] / 8."""
    d = p[..., :, 2:] - p[..., :, :-2]  # (R, C, H + 2, W)
    if scheme == "central":
        return d[..., 1:-1, :]
    return torch.add(d[..., :-2, :] + d[..., 2:, :], d[..., 1:-1, :], alpha=2.0)


def _dy_unscaled(p, scheme):
    """d/dy (along H), as :func:`_dx_unscaled`."""
    d = p[..., 2:, :] - p[..., :-2, :]  # (R, C, H, W + 2)
    if scheme == "central":
        return d[..., :, 1:-1]
    return torch.add(d[..., :, :-2] + d[..., :, 2:], d[..., :, 1:-1], alpha=2.0)


def _d_dx(u, scheme):
    """d/dx (along W) of (R, C, H, W) with replicate padding."""
    return _SCALE[scheme] * _dx_unscaled(_pad(u), scheme)


def _d_dy(u, scheme):
    """d/dy (along H) of (R, C, H, W) with replicate padding."""
    return _SCALE[scheme] * _dy_unscaled(_pad(u), scheme)


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

    Equal to ``divergence_xy(g / norm_xy(g, grad_eps))`` of ``g = gradient_xy(phi)``, in fewer passes
    over the grid (it runs at every Chan-Vese step): the unit normal is unchanged when the gradient
    and ``grad_eps`` are both divided by the stencil's factor k, so k is applied once, at the end;
    phi is padded once for both derivatives.
    """
    _check_scheme(scheme)
    k = _SCALE[scheme]
    p = _pad(phi)
    gx, gy = _dx_unscaled(p, scheme), _dy_unscaled(p, scheme)  # gradient / k
    inv_norm = torch.rsqrt(torch.addcmul(gx * gx + (grad_eps / k) ** 2, gy, gy))
    return k * (_dx_unscaled(_pad(gx * inv_norm), scheme) + _dy_unscaled(_pad(gy * inv_norm), scheme))
