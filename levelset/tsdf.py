"""Truncated signed distance functions and ground-truth direction fields from binary masks.

The distance transform is the exact separable Euclidean algorithm (a 1-D pass along rows, then a
min-plus pass along columns), restricted to a window of ``truncation`` pixels: distances beyond the
truncation are clamped anyway, and any pixel within it has its nearest feature inside the window.
So the result equals SciPy's ``distance_transform_edt`` wherever it is not clamped, while the cost
is ``O(R * H * W * truncation)`` in a handful of batched tensor ops, on CPU or CUDA.
"""
import math

import torch

from .functional import gradient


def _squared_distance_to(features, max_dist):
    """Squared Euclidean distance from every pixel to the nearest True pixel of ``features``.

    Args:
        features: (R, H, W) bool.
        max_dist: distances up to this value are exact; larger ones come out > max_dist**2.
    Returns:
        (R, H, W) float32.
    """
    R, H, W = features.shape
    device = features.device
    big = float(H + W + 2)
    cap = min(float(max_dist) + 1.0, big)
    # Pass 1: 1-D distance along each row to the nearest feature on the left or on the right.
    cols = torch.arange(W, device=device, dtype=torch.float32).expand(R, H, W)
    left = torch.where(features, cols, torch.full_like(cols, -big)).cummax(dim=2).values
    right = torch.where(features, cols, torch.full_like(cols, 2 * big))
    right = right.flip(2).cummin(dim=2).values.flip(2)
    row_dist = torch.minimum(cols - left, right - cols).clamp_max(cap)
    window = min(int(math.ceil(max_dist)), H - 1)
    # Pass 2 only adds and compares integers up to cap^2 + window^2: use the narrowest exact
    # integer type, since the pass is bound by memory traffic (uint8 for a truncation of 10 px).
    largest = math.ceil(cap) ** 2 + window ** 2
    small = torch.uint8 if largest <= 255 else torch.int16 if largest <= 32767 else torch.int32
    g2 = (row_dist * row_dist).to(small)
    # Pass 2: d2(i, j) = min_s g2(i + s, j) + s^2 over the window |s| <= max_dist.
    d2 = g2.clone()
    for s in range(1, window + 1):
        d2[:, s:] = torch.minimum(d2[:, s:], g2[:, :-s] + s * s)
        d2[:, :-s] = torch.minimum(d2[:, :-s], g2[:, s:] + s * s)
    return d2.float()


def signed_distance(masks, truncation=None, *, half_pixel=False):
    """Signed Euclidean distance ``edt(mask) - edt(~mask)`` in pixels, positive inside.

    Each pixel's value is the distance from its centre to the nearest pixel centre of the other
    label, so the zero level set lies halfway between an inside and an outside pixel.

    Args:
        masks: (R, H, W) bool (or 0/1) tensor.
        truncation: clamp to ``[-truncation, truncation]``; None computes the full transform.
        half_pixel: distance to the boundary *between* the two pixels instead, i.e. 0.5 px less on
            each side (``edt(mask) - 0.5`` inside, ``-(edt(~mask) - 0.5)`` outside): a pixel next
            to the boundary gets +-0.5, so the function has slope 1 across the zero level set as
            well as away from it (exact for straight boundaries along the grid).
    Returns:
        (R, H, W) float32 tensor on the masks' device.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (R, H, W), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    R, H, W = masks.shape
    limit = float(H + W) if truncation is None else float(truncation)
    if limit <= 0:
        raise ValueError(f"truncation must be positive, got {truncation}")
    if R == 0 or H == 0 or W == 0:
        return torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
    reach = limit + 0.5 if half_pixel else limit  # exact up to the distance that maps to the clamp
    inside = _squared_distance_to(~masks, reach).sqrt()  # edt(mask): distance to background
    outside = _squared_distance_to(masks, reach).sqrt()  # edt(~mask): distance to foreground
    if half_pixel:
        inside, outside = inside - 0.5, outside - 0.5
    sdf = torch.where(masks, inside, -outside)
    return sdf.clamp(-limit, limit)


def mask_to_tsdf(masks, truncation):
    """Truncated signed distance function of binary masks, normalised to ``[-1, 1]``.

    ``clamp(sd(mask), -truncation, truncation) / truncation`` with ``sd`` the signed distance to the
    boundary between inside and outside pixels (:func:`signed_distance` with ``half_pixel=True``:
    +-0.5 px on the pixels next to the boundary, so the L1 and the BCE targets agree there)
    (LevelSet R-CNN sec. 4.1:
    "we threshold the values to a fixed symmetric range and normalize to [-1, 1]"; DELSE sec. 4.1
    uses the same TSDF in pixels, i.e. this times ``truncation``). An empty mask gives -1
    everywhere, a full mask +1.

    Args:
        masks: (R, H, W) bool tensor.
        truncation: positive float, in pixels.
    Returns:
        (R, H, W) float32 tensor.
    """
    return signed_distance(masks, truncation, half_pixel=True) / float(truncation)


def direction_field(masks, truncation=None):
    """Ground-truth motion direction of DELSE eq. 5: ``-grad DT / |grad DT|``.

    ``DT`` is the distance to the mask boundary (the unsigned distance transform ``|sdf|``), so the
    unit vectors point towards the boundary from both sides. Where ``DT`` is flat (beyond the
    truncation, or a pixel equidistant from opposite sides) the field is zero.

    Args:
        masks: (R, H, W) bool tensor.
        truncation: optional window in pixels (the field is zero where ``DT`` exceeds it).
    Returns:
        (R, 2, H, W) float32 tensor holding (vx, vy).
    """
    dt = signed_distance(masks, truncation).abs().unsqueeze(1)
    g = gradient(dt, "central")
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-6, -g / norm.clamp_min(1e-6), torch.zeros_like(g))


def enforce_drag(phi, src, dst, radius, grow=None):
    """
    One drag-and-drop correction enforced on a level set: its zero level is moved through ``dst``.

    The annotator drags the wrong boundary point ``src`` to ``dst``, where the boundary belongs. When
    ``dst`` is outside (``phi(dst) <= 0``, or ``grow``), the object grows by a capsule of ``radius`` around the
    segment from ``src`` towards ``dst`` whose far end touches ``dst`` (union: ``max(phi, radius - d)``);
    when it is inside, the capsule is cut away (difference: ``min(phi, d - radius)``), ``d`` being each
    pixel's distance to the segment (the union and difference of signed distances). Pixels farther than
    ``radius`` from the segment stay on their side of the zero level, and the result is again a
    distance-like function (in pixels) near the edit.

    Args:
        phi: (..., H, W) level set, positive inside, in pixels (pixel (i, j) at x = j, y = i).
        src, dst: (2,) (x, y) in the same pixels.
        radius: capsule radius, pixels (> 0).
        grow: True to grow, False to cut; None decides from ``phi`` at ``dst``. Pass the decision
            taken on the level set the annotator saw when re-applying a drag to a later one.
    Returns:
        the edited level set, phi's shape and dtype.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    H, W = phi.shape[-2:]
    src = torch.as_tensor(src, dtype=torch.float32, device=phi.device)
    dst = torch.as_tensor(dst, dtype=torch.float32, device=phi.device)
    delta = dst - src
    length = float(delta.norm())
    if length == 0:
        return phi
    u = delta / length
    a, b = src, src + u * max(length - radius, 0.0)  # the capsule ends `radius` short of dst: its rim passes dst
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=phi.device),
                            torch.arange(W, dtype=torch.float32, device=phi.device), indexing="ij")
    p = torch.stack([xs, ys], dim=-1)
    ab = b - a
    t = ((p - a) @ ab / ab.dot(ab)).clamp(0, 1) if float(ab.dot(ab)) > 0 else torch.zeros_like(xs)
    d = (p - (a + t[..., None] * ab)).norm(dim=-1).to(phi.dtype)
    jx, iy = int(round(min(max(float(dst[0]), 0), W - 1))), int(round(min(max(float(dst[1]), 0), H - 1)))
    if grow is None:
        grow = bool(phi[..., iy, jx].flatten()[0] <= 0)
    return torch.maximum(phi, radius - d) if grow else torch.minimum(phi, d - radius)
