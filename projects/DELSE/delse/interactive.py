"""Interactive annotation by motion-field editing (DELSE section 4.4): the simulated annotator and
the encoding of a drag-and-drop correction. All coordinates are (x, y) crop pixels."""
import torch
import torch.nn.functional as F

import levelset

from .data import points_heatmap

__all__ = ["simulate_correction", "drag_channels", "boundary_pixels", "sample_num_corrections", "CORRECTION_MODES",
           "DRAG_EDITS"]

# MODEL.DELSE.CORRECTION_MODE: Table 8's two rows.
CORRECTION_MODES = ("motion_editing", "clicks")
# MODEL.DELSE.DRAG_EDIT: where a drag is also enforced geometrically (levelset.enforce_drag).
DRAG_EDITS = ("none", "phi0", "result", "both")


def sample_num_corrections(num_samples, max_corrections, sampling="uniform", generator=None):
    """Simulated corrections of each training sample (MODEL.DELSE.CORRECTION_SAMPLING).

    "uniform": an integer from U{0..max_corrections} per sample; "fixed": max_corrections each.
    Returns:
        list of ``num_samples`` ints.
    """
    if sampling == "fixed":
        return [int(max_corrections)] * num_samples
    if sampling != "uniform":
        raise ValueError(f"unknown correction sampling {sampling!r}; expected 'uniform' or 'fixed'")
    return torch.randint(0, int(max_corrections) + 1, (num_samples,), generator=generator).tolist()


def boundary_pixels(mask):
    """(H, W) bool -> (H, W) bool: pixels of the mask with one of their 8 neighbours outside it (a
    3x3 erosion, the boundary of the metrics: ``levelset.metrics.mask_to_boundary`` with width 1).
    Pixels beyond the crop's edge count as inside: the crop edge is not an object boundary."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=1.0), 3, stride=1)
    return mask & ~(eroded[0, 0] > 0.5)


def simulate_correction(phi, gt_mask, min_error=1.0):
    """The simulated annotator's drag: the most erroneous predicted boundary point onto the GT.

    ``(x, y)*_pred = argmax over the predicted zero level set of DT`` (DT: distance to the GT
    boundary, the line between GT and non-GT pixels, so a boundary pixel that is also a GT boundary
    pixel is 0.5 px from it), dragged to its nearest GT contour point. With an empty prediction the
    drag starts at the maximum of ``phi`` (the place closest to turning foreground).

    Args:
        phi: (H, W) predicted level set, positive inside.
        gt_mask: (H, W) bool, not empty.
        min_error: no drag when the worst predicted boundary point is within this many pixels of
            the GT boundary: a perfect mask (all at 0.5 px) and one off by a pixel get none.
    Returns:
        (from_xy, to_xy): two (2,) float tensors, or None.
    """
    pred = phi > 0
    gt_boundary = boundary_pixels(gt_mask)
    gt_yx = gt_boundary.nonzero().float()
    if len(gt_yx) == 0:
        return None
    pred_boundary = boundary_pixels(pred)
    if pred_boundary.any():
        dist_to_gt = levelset.signed_distance(gt_mask[None], half_pixel=True)[0].abs()
        err = torch.where(pred_boundary, dist_to_gt, torch.full_like(dist_to_gt, -1.0))
        if err.max() < min_error:
            return None
        idx = int(err.flatten().argmax())
    else:
        idx = int(phi.flatten().argmax())
    W = phi.shape[1]
    src = torch.tensor([idx % W, idx // W], dtype=torch.float32, device=phi.device)
    nearest = ((gt_yx.flip(1) - src) ** 2).sum(1).argmin()
    return src, gt_yx[nearest].flip(0)


def drag_channels(drags, size, device=None, signed=False):
    """The two motion-editing channels of all drags so far (section 4.4), summed over drags.

    Per drag a Gaussian at the erroneous point with sigma = the drag length, times
    ``|dx| / |d|`` in the first channel and ``|dy| / |d|`` in the second, as the paper encodes it;
    with ``signed``, ``dx / |d|`` and ``dy / |d|`` (the drag's direction, not only its axis).

    Args:
        drags: list of (from_xy, to_xy) pairs of (2,) tensors/sequences.
        size: (H, W).
        signed: keep the sign of the drag's components.
    Returns:
        (2, H, W) float32 tensor.
    """
    out = torch.zeros((2,) + tuple(size), device=device)
    for src, dst in drags:
        src = torch.as_tensor(src, dtype=torch.float32, device=device)
        delta = torch.as_tensor(dst, dtype=torch.float32, device=device) - src
        length = delta.norm().clamp_min(1.0)
        g = points_heatmap(src[None], size, length)
        out += g[None] * ((delta if signed else delta.abs()) / length).view(2, 1, 1)
    return out
