"""The unrolled, differentiable level-set evolution shared by LevelSet R-CNN and DELSE.

Both methods integrate ``phi_n = phi_{n-1} + dt_n * dphi/dt`` for a fixed number of explicit
steps (LevelSet R-CNN eq. 7, DELSE eq. 4); they differ only in the velocity ``dphi/dt``:

- :func:`chan_vese`: the region-based Chan-Vese flow on a deep feature map (LevelSet R-CNN
  eqs. 6-9), with closed-form region means ``c1, c2`` recomputed at every step.
- :func:`delse_evolve`: the edge-based DELSE flow (DELSE eq. 9): a learned motion field, a
  modulated curvature term and the distance-regularisation term of DRLSE.

Hyperparameters may be Python floats or per-instance tensors, so a network can predict them.
The evolution runs in float32 (float64 if given) with autocast disabled: the explicit scheme and
the region means are not safe in half precision, and the cost is small next to the heads.
"""
import math

import torch

from .functional import GRAD_EPS, curvature, dirac, divergence_xy, gradient_xy, heaviside, norm_xy

# Region areas below this (in pixels) are treated as this, so c1/c2 stay finite for an empty region.
_MIN_AREA = 1e-4


def _working_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_instance(value, R, ref, name):
    """float or (R,) tensor -> (R, 1, 1, 1) tensor."""
    if not torch.is_tensor(value):
        return torch.full((R, 1, 1, 1), float(value), dtype=ref.dtype, device=ref.device)
    value = value.to(dtype=ref.dtype, device=ref.device)
    if value.dim() == 0:
        return value.expand(R).reshape(R, 1, 1, 1)
    if value.shape != (R,):
        raise ValueError(f"{name} must be a float or a tensor of shape ({R},), got {tuple(value.shape)}")
    return value.reshape(R, 1, 1, 1)


def _per_step(value, R, steps, ref, name):
    """float, sequence of `steps` floats, (steps,) or (R, steps) tensor -> (R, steps) tensor."""
    if not torch.is_tensor(value):
        if isinstance(value, (list, tuple)):
            if len(value) != steps:
                raise ValueError(f"{name} has {len(value)} values for {steps} steps")
            value = torch.tensor([float(v) for v in value], dtype=ref.dtype, device=ref.device)
        else:
            return torch.full((R, steps), float(value), dtype=ref.dtype, device=ref.device)
    value = value.to(dtype=ref.dtype, device=ref.device)
    if value.dim() == 0:
        return value.expand(R, steps)
    if value.shape == (steps,):
        return value.expand(R, steps)
    if value.shape != (R, steps):
        raise ValueError(f"{name} must be a float, {steps} floats or shape ({R}, {steps}); got {tuple(value.shape)}")
    return value


def _check_phi(phi):
    if phi.dim() != 4 or phi.shape[1] != 1:
        raise ValueError(f"phi must have shape (R, 1, H, W), got {tuple(phi.shape)}")


def _unroll(phi, dt, steps, velocity, return_all, phi_bound=None):
    """Explicit Euler: ``phi_n = phi_{n-1} + dt[:, n-1] * velocity(phi_{n-1}, n-1)``, optionally
    clamped to ``[-phi_bound, phi_bound]``."""
    iterates = [phi]
    for n in range(steps):
        phi = torch.addcmul(phi, dt[:, n].view(-1, 1, 1, 1), velocity(phi, n))
        if phi_bound is not None:
            phi = phi.clamp(-phi_bound, phi_bound)
        iterates.append(phi)
    return iterates if return_all else phi


def _weighted_sums(f, w):
    """(R, C, P) features, (R, P) weights -> (R, C): ``sum_p f[:, :, p] w[:, p]``.

    Written as a (1, P) x (P, C) product per RoI, on a transposed view of ``f``: on the CPU that
    form runs 8-10x faster than ``einsum("rcp,rp->rc")`` (a (C, P) x (P, 1) product per RoI) at the
    mask head's sizes (timings: BENCHMARKS.md section 5).
    """
    return torch.bmm(w.unsqueeze(1), f.transpose(1, 2)).squeeze(1)


def _dots(f, v):
    """(R, C, P) features, (R, C) vectors -> (R, P): ``f[:, :, p] . v`` (``bmm``, as :func:`_weighted_sums`)."""
    return torch.bmm(v.unsqueeze(1), f).squeeze(1)


def _interpolation_matrix(n_out, n_in, dtype, device):
    """(n_out, n_in) matrix of 1-D linear upsampling, as F.interpolate(align_corners=False) does."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[None]
    return torch.nn.functional.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


class _DenseFeatures:
    """Features given on phi's grid: (R, C, H, W)."""

    def __init__(self, features):
        R, C, H, W = features.shape
        self.f = features.reshape(R, C, H * W)  # (R, C, P)
        self.sq_norm = (self.f * self.f).sum(dim=1)  # (R, P): |F|^2, once per RoI
        self.total = self.f.sum(dim=2)  # (R, C)

    def weighted_sum(self, w):
        """(R, P) weights -> (R, C): sum_p F_p w_p."""
        return _weighted_sums(self.f, w)

    def dot(self, v):
        """(R, C) vectors -> (R, P): F_p . v."""
        return _dots(self.f, v)


class _UpsampledFeatures:
    """Features f (R, C, h, w) on a coarser grid, standing for F = bilinear_upsample(f) on phi's (H, W) grid.

    F is never materialised: with U = Uy (x) Ux the separable upsampling, F . v = U (f . v) and
    sum_p F_p w_p = sum_q f_q (U^T w)_q, so the C-channel work happens on the coarse grid. |F|^2 is
    exact too: every row of Uy and Ux has its non-zeros on two adjacent columns, so
    ``|F(y, x)|^2 = sum uy_i uy_k ux_j ux_l <f_ij, f_kl>`` needs only the dot products of each
    coarse pixel with itself and with its right, lower and two diagonal neighbours (five (R, h, w)
    maps, the only C-channel work), spread to the fine grid by products of the weights.
    """

    def __init__(self, features, H, W):
        R, C, h, w = features.shape
        self.uy = _interpolation_matrix(H, h, features.dtype, features.device)  # (H, h)
        self.ux = _interpolation_matrix(W, w, features.dtype, features.device)  # (W, w)
        self.f = features.reshape(R, C, h * w)
        self.shape = (R, h, w, H, W)
        f = features
        # <f_ij, f_kl> for (k, l) = (i, j), (i, j+1), (i+1, j), and both diagonals of each 2x2 block.
        d_self = (f * f).sum(1)  # (R, h, w)
        d_right = (f[..., :-1] * f[..., 1:]).sum(1)  # (R, h, w-1)
        d_down = (f[:, :, :-1] * f[:, :, 1:]).sum(1)  # (R, h-1, w)
        d_diag = (f[:, :, :-1, :-1] * f[:, :, 1:, 1:] + f[:, :, :-1, 1:] * f[:, :, 1:, :-1]).sum(1)  # (R, h-1, w-1)
        # Weights: squares, and twice the products of the two adjacent non-zeros (pairs count both
        # ways; a diagonal pair's 2 is in by alone, as d_diag already sums both diagonals).
        sy, by = self.uy * self.uy, 2 * self.uy[:, :-1] * self.uy[:, 1:]  # (H, h), (H, h-1)
        sx, bx = self.ux * self.ux, 2 * self.ux[:, :-1] * self.ux[:, 1:]  # (W, w), (W, w-1)
        rows_same = torch.einsum("rij,xj->rix", d_self, sx) + torch.einsum("rij,xj->rix", d_right, bx)  # (R, h, W)
        rows_next = torch.einsum("rij,xj->rix", d_down, sx) + torch.einsum("rij,xj->rix", d_diag, bx / 2)  # (R, h-1, W)
        sq = torch.einsum("yi,rix->ryx", sy, rows_same) + torch.einsum("yi,rix->ryx", by, rows_next)
        self.sq_norm = sq.reshape(R, H * W)
        self.total = self.weighted_sum(torch.ones(R, H * W, dtype=features.dtype, device=features.device))

    def weighted_sum(self, w):
        R, h, w_, H, W = self.shape
        wl = self.uy.T @ w.view(R, H, W) @ self.ux  # U^T w on the coarse grid, (R, h, w)
        return _weighted_sums(self.f, wl.reshape(R, h * w_))

    def dot(self, v):
        R, h, w_, H, W = self.shape
        low = _dots(self.f, v).view(R, h, w_)
        return (self.uy @ low @ self.ux.T).reshape(R, H * W)


class _StackedFeatures:
    """Several feature maps, each on phi's grid or coarser, read as their channel concatenation.

    The data term is a sum over channels, so each part keeps its own fast path: a coarse
    embedding stays on its coarse grid while, e.g., a 3-channel image crop is read at full resolution.
    """

    def __init__(self, parts):
        self.parts = parts
        self.channels = [p.f.shape[1] for p in parts]
        self.sq_norm = sum(p.sq_norm for p in parts)  # (R, P)
        self.total = torch.cat([p.total for p in parts], dim=1)  # (R, sum C)

    def weighted_sum(self, w):
        return torch.cat([p.weighted_sum(w) for p in self.parts], dim=1)

    def dot(self, v):
        return sum(p.dot(u) for p, u in zip(self.parts, v.split(self.channels, dim=1)))


def _as_list(features):
    return list(features) if isinstance(features, (list, tuple)) else [features]


def _features(features, phi, dtype):
    """Wrap (R, C, h, w) features, or a list of them, for the evolution on phi's (R, 1, H, W) grid."""
    parts = _as_list(features)
    if not parts:
        raise ValueError("features: give a (R, C, h, w) tensor or a non-empty list of them")
    if len(parts) > 1:
        return _StackedFeatures([_features(f, phi, dtype) for f in parts])
    features = parts[0].to(dtype)
    R, _, H, W = phi.shape
    if features.dim() != 4 or features.shape[0] != R:
        raise ValueError(f"features must be (R, C, h, w) with R = {R}, got {tuple(features.shape)}")
    h, w = features.shape[2:]
    if (h, w) == (H, W):
        return _DenseFeatures(features)
    if h > H or w > W:
        raise ValueError(f"features {tuple(features.shape)} are finer than phi {tuple(phi.shape)}; "
                         "give them on phi's grid or a coarser one")
    return _UpsampledFeatures(features, H, W)


def _region_means(feats, h):
    """Closed-form c1, c2 of LevelSet R-CNN eq. 9.

    Args:
        feats: a feature wrapper; h: (R, P) soft Heaviside of phi.
    Returns:
        c1, c2: (R, C) mean feature inside / outside.
    """
    area_in = h.sum(dim=1, keepdim=True)
    area_out = h.shape[1] - area_in
    f_in = feats.weighted_sum(h)
    c1 = f_in / area_in.clamp_min(_MIN_AREA)
    c2 = (feats.total - f_in) / area_out.clamp_min(_MIN_AREA)
    return c1, c2


def chan_vese(phi, features, *, lambda1, lambda2, mu, eps, dt, steps, return_all=False,
              grad_eps=GRAD_EPS, phi_bound=None):
    """Unrolled Chan-Vese evolution on a feature map (LevelSet R-CNN eqs. 6-9).

    Alternates the closed-form region means (eq. 9) with explicit steps (eqs. 7-8)::

        dphi/dt = dirac_eps(phi) * (mu * div(grad phi / |grad phi|)
                                    - lambda1 * |F - c1|^2 + lambda2 * |F - c2|^2)

    Gradients and divergence use the Sobel operator. The data term is expanded as
    ``|F - c|^2 = |F|^2 - 2 F.c + |c|^2``: |F|^2 is computed once, and a step reads the feature map
    twice (for ``c1, c2`` and for ``F.(lambda1 c1 - lambda2 c2)``) instead of materialising ``F - c``.

    ``features`` may be given on a coarser grid than ``phi``: it then stands for its bilinear
    upsampling to phi's grid (``F.interpolate(..., mode="bilinear", align_corners=False)``) and the
    evolution is exactly the one on the upsampled map, computed without materialising it.

    Args:
        phi: (R, 1, H, W) initial level set phi_0, positive inside.
        features: (R, C, H, W) feature map F (the image intensities in classic Chan-Vese), or
            (R, C, h, w) with h <= H, w <= W as described above, or a list of such maps (each on
            its own grid), which stands for their concatenation along C.
        lambda1, lambda2, mu: float or (R,) tensor.
        eps, dt: float, a sequence of `steps` floats, (steps,) or (R, steps) tensor.
        steps: number of unrolled steps N.
        return_all: return ``[phi_0, ..., phi_N]`` instead of phi_N.
        grad_eps: added in quadrature to |grad phi| in the curvature, in phi's units per pixel.
            The default (1e-3) is classic Chan-Vese's regularisation. For a learned phi_0 give a
            fraction of the TSDF's slope (e.g. 0.1 for a TSDF in pixels): on its flat, truncated
            plateaus the curvature's derivative grows like 1 / grad_eps.
        phi_bound: clamp phi to ``[-phi_bound, phi_bound]`` after every step (a TSDF's truncation),
            as in :func:`delse_evolve`.
    Returns:
        (R, 1, H, W) phi_N in the working dtype (float32, or float64 for float64 inputs).
    """
    _check_phi(phi)
    dtype = _working_dtype(phi, *_as_list(features))
    with torch.autocast(device_type=phi.device.type, enabled=False):
        phi = phi.to(dtype)
        R, _, H, W = phi.shape
        feats = _features(features, phi, dtype)
        l1 = _per_instance(lambda1, R, phi, "lambda1").view(R, 1)
        l2 = _per_instance(lambda2, R, phi, "lambda2").view(R, 1)
        mu_ = _per_instance(mu, R, phi, "mu")
        eps_ = _per_step(eps, R, steps, phi, "eps")
        dt_ = _per_step(dt, R, steps, phi, "dt")

        def velocity(p, n):
            e = eps_[:, n].view(R, 1, 1, 1)
            c1, c2 = _region_means(feats, heaviside(p, e).view(R, H * W))
            # -l1 |F - c1|^2 + l2 |F - c2|^2, expanded: (l2 - l1) |F|^2 + F.v + const.
            v = 2.0 * (l1 * c1 - l2 * c2)  # (R, C)
            const = l2 * (c2 * c2).sum(1, keepdim=True) - l1 * (c1 * c1).sum(1, keepdim=True)  # (R, 1)
            data = torch.addcmul(feats.dot(v) + const, l2 - l1, feats.sq_norm)  # (R, P)
            return dirac(p, e) * torch.addcmul(data.view(R, 1, H, W), mu_, curvature(p, "sobel", grad_eps))

        return _unroll(phi, dt_, steps, velocity, return_all, phi_bound)


def chan_vese_energy(phi, features, *, lambda1, lambda2, mu, eps):
    """Discrete Chan-Vese energy (LevelSet R-CNN eq. 6) of ``phi`` with its optimal c1, c2.

    ``E = sum_x lambda1 |F - c1|^2 H(phi) + lambda2 |F - c2|^2 (1 - H(phi)) + mu dirac(phi) |grad phi|``
    with Sobel gradients, integrals as sums over the grid.

    Args:
        phi: (R, 1, H, W); features: (R, C, H, W), coarser, or a list, as in :func:`chan_vese`;
        lambda1, lambda2, mu, eps: float or (R,) tensor.
    Returns:
        (R,) energy per instance.
    """
    _check_phi(phi)
    dtype = _working_dtype(phi, *_as_list(features))
    with torch.autocast(device_type=phi.device.type, enabled=False):
        phi = phi.to(dtype)
        R, _, H, W = phi.shape
        feats = _features(features, phi, dtype)
        e = _per_instance(eps, R, phi, "eps")
        h = heaviside(phi, e).view(R, H * W)
        c1, c2 = _region_means(feats, h)
        # |F - c|^2 = |F|^2 - 2 F.c + |c|^2
        d1 = feats.sq_norm - 2 * feats.dot(c1) + (c1 * c1).sum(1, keepdim=True)
        d2 = feats.sq_norm - 2 * feats.dot(c2) + (c2 * c2).sum(1, keepdim=True)
        l1 = _per_instance(lambda1, R, phi, "lambda1").view(R, 1)
        l2 = _per_instance(lambda2, R, phi, "lambda2").view(R, 1)
        region = (l1 * d1 * h + l2 * d2 * (1 - h)).sum(1)
        length = (dirac(phi, e) * norm_xy(*gradient_xy(phi, "sobel"), 0.0)).flatten(1).sum(1)
        return region + _per_instance(mu, R, phi, "mu").view(R) * length


def _double_well_ratio(s):
    """``p'(s) / s`` for the double-well potential p of DELSE eq. 8 (DRLSE, Li et al. 2010).

    p(s) = (1 - cos(2 pi s)) / (2 pi)^2 for s <= 1, (s - 1)^2 / 2 for s >= 1, so
    p'(s) / s = sin(2 pi s) / (2 pi s) for s <= 1 and 1 - 1/s for s >= 1. Bounded (-> 1 at s = 0).
    """
    small = torch.sin(2 * math.pi * s) / (2 * math.pi * s)  # s >= GRAD_EPS > 0 where it is used
    large = 1.0 - 1.0 / s.clamp_min(1.0)
    return torch.where(s <= 1.0, small, large)


def delse_evolve(phi, motion, modulation, *, curvature_weight, dist_reg_weight, eps=None, dt, steps,
                 return_all=False, phi_bound=None):
    """Unrolled DELSE level-set evolution (DELSE eq. 9) with central differences::

        dphi/dt = -<V, grad phi>                                          (motion, eq. 6)
                  + lambda * m * |grad phi| * div(grad phi / |grad phi|)  (modulated curvature, eq. 7)
                  + mu * div(p'(|grad phi|) / |grad phi| * grad phi)      (distance regularisation, eq. 8)

    Args:
        phi: (R, 1, H, W) initial level set, positive inside, in pixels (a TSDF keeps |grad phi| ~ 1).
        motion: (R, 2, H, W) motion field V as (vx, vy), in pixels per unit time.
        modulation: (R, 1, H, W) curvature modulation m, in [0, 1].
        curvature_weight: lambda, float or (R,) tensor (paper: 1).
        dist_reg_weight: mu, float or (R,) tensor (paper: 0.04).
        eps: None for eq. 9 as written; otherwise the motion and curvature terms are localised to
            the zero level set by ``dirac_eps(phi)``, as in DRLSE's edge-based model. float,
            `steps` floats or (R, steps).
        dt: time step, float, `steps` floats or (R, steps).
        steps: number of unrolled steps T (paper: 5).
        return_all: return ``[phi_0, ..., phi_T]`` instead of phi_T.
        phi_bound: clamp phi to ``[-phi_bound, phi_bound]`` after every step, e.g. the TSDF's
            truncation D. Values beyond it carry no information, and the clamp keeps an explicit
            step that violates the CFL condition (large ``curvature_weight * dt``) from blowing up.
    Returns:
        (R, 1, H, W) phi_T.
    """
    _check_phi(phi)
    R = phi.shape[0]
    if motion.shape != (R, 2) + tuple(phi.shape[2:]):
        raise ValueError(f"motion must be (R, 2, H, W) matching phi {tuple(phi.shape)}, got {tuple(motion.shape)}")
    if modulation.shape != phi.shape:
        raise ValueError(f"modulation must have phi's shape {tuple(phi.shape)}, got {tuple(modulation.shape)}")
    dtype = _working_dtype(phi, motion, modulation)
    with torch.autocast(device_type=phi.device.type, enabled=False):
        phi = phi.to(dtype)
        motion = motion.to(dtype)
        m = modulation.to(dtype)
        lam = _per_instance(curvature_weight, R, phi, "curvature_weight")
        mu = _per_instance(dist_reg_weight, R, phi, "dist_reg_weight")
        dt_ = _per_step(dt, R, steps, phi, "dt")
        eps_ = None if eps is None else _per_step(eps, R, steps, phi, "eps")

        vx, vy = motion[:, 0:1], motion[:, 1:2]

        def velocity(p, n):
            gx, gy = gradient_xy(p, "central")
            norm = norm_xy(gx, gy, GRAD_EPS)  # (R, 1, H, W), never zero
            advection = -(vx * gx + vy * gy)
            curv = lam * m * norm * divergence_xy(gx / norm, gy / norm, "central")
            ratio = _double_well_ratio(norm)
            dist_reg = mu * divergence_xy(ratio * gx, ratio * gy, "central")
            if eps_ is None:
                return advection + curv + dist_reg
            return dirac(p, eps_[:, n].view(R, 1, 1, 1)) * (advection + curv) + dist_reg

        return _unroll(phi, dt_, steps, velocity, return_all, phi_bound)


def sign_flips(phi_initial, phi_final, *, band, pixels_per_unit=1.0):
    """How much of each instance's grid an evolution moves across the zero level.

    Args:
        phi_initial, phi_final: (R, ...) level sets on the same grid, positive inside.
        band: half-width in pixels of the boundary band around ``phi_initial``'s zero level.
        pixels_per_unit: pixels per unit of phi (a TSDF in [-1, 1] truncated at D pixels: D).
    Returns:
        (flipped, flipped_band), each (R,): the share of the grid whose sign differs between the two,
        and that share within the band ``|phi_initial| * pixels_per_unit <= band`` (0 for an empty band).
    """
    flips = ((phi_initial > 0) != (phi_final > 0)).flatten(1)
    near = (phi_initial.abs() * pixels_per_unit <= band).flatten(1)
    flipped = flips.float().mean(1)
    flipped_band = (flips & near).sum(1).float() / near.sum(1).clamp_min(1)
    return flipped, flipped_band
