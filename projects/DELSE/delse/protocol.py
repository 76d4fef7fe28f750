"""The standard interactive-segmentation protocol, for DELSE and the pixel-wise baseline (issue #22).

How interactive segmentation is scored in the literature (DEXTR, DELSE: mIoU from the 4 extreme
points; RITM and its successors: NoC@85 / NoC@90, the number of interactions needed to reach an IoU,
at most 20): the object starts from its 4 extreme points (4 interactions), then a simulated annotator
corrects the worst error, one interaction at a time, until the IoU reaches ``stop_iou`` (0.90, as
RITM's evaluation stops at its highest threshold; later IoUs are carried forward) or 20 interactions
are spent.

The annotator (:func:`next_correction`) looks at the *largest error region*, not only at the worst
predicted boundary point: the largest 8-connected component of the pixels where the mask and the
ground truth disagree, so a missed part (an arm, a leg) is corrected once it is the biggest error.
Each correction is a drag, ``(from, to)`` in image pixels:

- a missed part (ground truth, not predicted): ``to`` is the region's most interior pixel (maximum
  of its distance transform, RITM's click position) and ``from`` the predicted boundary pixel
  nearest to it: the contour is pulled out into the part. An empty prediction has no boundary:
  ``from`` is then the ground-truth boundary pixel nearest to ``to``.
- a false part (predicted, not ground truth): ``from`` is the predicted boundary pixel of the region
  farthest from the ground truth, ``to`` the ground-truth boundary pixel nearest to it (the drag the
  paper's simulated annotator makes, :func:`delse.interactive.simulate_correction`, restricted to
  the region).

Models that edit the motion field use the whole drag; models trained with clicks (DELSE
``CORRECTION_MODE "clicks"``, the pixel-wise baseline) see ``to`` as a click
(:meth:`delse.DELSEPredictor.correct`). All coordinates are (x, y) pixel centres of the image.
"""
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from levelset.metrics import boundary_f_measure, mask_to_boundary

__all__ = ["Correction", "ProtocolResult", "next_correction", "number_of_interactions", "run_protocol",
           "summarize"]

EXTREME_POINTS = 4  # interactions the extreme points count for


@dataclass
class Correction:
    """One simulated drag in image pixels; ``missed``: the region was a missed part."""
    from_xy: Tuple[float, float]
    to_xy: Tuple[float, float]
    missed: bool
    region_area: int


@dataclass
class ProtocolResult:
    """One object's run. ``ious[k]``: IoU after ``EXTREME_POINTS + k`` interactions, for every count up
    to ``max_interactions`` (values after the annotator stopped are carried forward)."""
    ious: List[float]
    f1px: float  # boundary F at 1 px after the extreme points
    f2px: float
    predict_seconds: float  # the extreme-point pass
    correct_seconds: List[float] = field(default_factory=list)  # each correction's pass


def _boundary(mask: np.ndarray) -> np.ndarray:
    """1-pixel inner boundary, pixels beyond the image counting as outside."""
    return mask_to_boundary(mask, 1, border_is_boundary=True)


def _nearest(points_yx: np.ndarray, target_yx: np.ndarray) -> np.ndarray:
    return points_yx[int(((points_yx - target_yx) ** 2).sum(1).argmin())]


def next_correction(pred: np.ndarray, gt: np.ndarray, min_area: int = 1) -> Optional[Correction]:
    """The simulated annotator's next drag (module docstring), or None when no error region has
    ``min_area`` pixels.

    Args:
        pred, gt: (H, W) bool masks in image pixels; ``gt`` not empty.
    """
    pred, gt = pred.astype(bool), gt.astype(bool)
    best = None
    for missed, err in ((True, gt & ~pred), (False, pred & ~gt)):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(err.astype(np.uint8), connectivity=8)
        if n > 1:
            k = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
            area = int(stats[k, cv2.CC_STAT_AREA])
            if best is None or area > best[2]:
                best = (missed, labels == k, area)
    if best is None or best[2] < min_area:
        return None
    missed, region, area = best
    gt_boundary = np.argwhere(_boundary(gt)).astype(np.float64)
    if missed:
        inside = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        to_yx = np.array(np.unravel_index(int(inside.argmax()), inside.shape), dtype=np.float64)
        pred_boundary = np.argwhere(_boundary(pred)).astype(np.float64)
        from_yx = _nearest(pred_boundary if len(pred_boundary) else gt_boundary, to_yx)
    else:
        # Predicted boundary pixels of the false region: its pixels next to the outside of the mask.
        outer = np.argwhere(_boundary(pred) & region).astype(np.float64)
        if len(outer) == 0:  # a filled hole of the GT: the region lies inside pred, off its boundary
            outer = np.argwhere(region).astype(np.float64)
        dist_to_gt = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        from_yx = outer[int(dist_to_gt[outer[:, 0].astype(int), outer[:, 1].astype(int)].argmax())]
        to_yx = _nearest(gt_boundary, from_yx)
    return Correction((float(from_yx[1]), float(from_yx[0])), (float(to_yx[1]), float(to_yx[0])), missed, area)


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def run_protocol(predictor, image_bgr: np.ndarray, gt: np.ndarray, extreme_points: np.ndarray, *,
                 max_interactions: int = 20, stop_iou: float = 0.90, preview: bool = False) -> ProtocolResult:
    """One object through the protocol with a :class:`delse.DELSEPredictor` (or anything with its
    ``predict(image, points)`` / ``correct(from, to, preview=...)`` returning an object with a
    ``.mask``).

    Args:
        gt: (H, W) bool; extreme_points: (4, 2) (x, y), left, right, top, bottom.
        max_interactions: the extreme points included (20: the literature's cap).
        stop_iou: the annotator stops once the IoU reaches it.
        preview: corrections through ``correct(preview=True)``.
    """
    if max_interactions < EXTREME_POINTS:
        raise ValueError(f"max_interactions must be at least {EXTREME_POINTS} (the extreme points), got {max_interactions}")
    gt = gt.astype(bool)
    t0 = time.perf_counter()
    result = predictor.predict(image_bgr, extreme_points)
    predict_seconds = time.perf_counter() - t0
    mask = np.asarray(result.mask, dtype=bool)
    ious = [_iou(mask, gt)]
    _, _, f1 = boundary_f_measure(mask, gt, 1)
    _, _, f2 = boundary_f_measure(mask, gt, 2)
    out = ProtocolResult(ious, f1, f2, predict_seconds)
    while len(ious) < max_interactions - EXTREME_POINTS + 1 and ious[-1] < stop_iou:
        corr = next_correction(mask, gt)
        if corr is None:
            break
        t0 = time.perf_counter()
        result = predictor.correct(corr.from_xy, corr.to_xy, preview=preview)
        out.correct_seconds.append(time.perf_counter() - t0)
        mask = np.asarray(result.mask, dtype=bool)
        ious.append(_iou(mask, gt))
    ious += [ious[-1]] * (max_interactions - EXTREME_POINTS + 1 - len(ious))
    return out


def number_of_interactions(ious: Sequence[float], threshold: float, max_interactions: int = 20) -> Tuple[int, bool]:
    """NoC: the first interaction count (the 4 extreme points included) whose IoU reaches
    ``threshold``; ``(max_interactions, False)`` when none does.

    Args:
        ious: IoU after 4, 5, ... interactions.
    """
    for k, iou in enumerate(ious[: max_interactions - EXTREME_POINTS + 1]):
        if iou >= threshold:
            return EXTREME_POINTS + k, True
    return max_interactions, False


def summarize(results: Sequence[ProtocolResult], thresholds=(0.85, 0.90), max_interactions: int = 20,
              at=(4, 5, 6, 8, 10, 20)) -> dict:
    """Means over objects: mIoU after ``at`` interactions, NoC and the share of objects that never
    reach each threshold, boundary F at 1 / 2 px after the extreme points (all in percent except NoC),
    the largest drop of the mIoU from one interaction to the next (``worst_step``, percent points,
    0 when it never drops), and the median latency of the extreme-point pass and of a correction (ms)."""
    ious = np.array([r.ious for r in results])
    out = {f"mIoU@{k}": 100 * float(ious[:, k - EXTREME_POINTS].mean()) for k in at if k <= max_interactions}
    steps = np.diff(ious[:, : max_interactions - EXTREME_POINTS + 1].mean(0))
    out["worst_step"] = 100 * float(min(0.0, steps.min())) if len(steps) else 0.0
    for t in thresholds:
        nocs = [number_of_interactions(r.ious, t, max_interactions) for r in results]
        name = f"{round(100 * t)}"
        out[f"NoC@{name}"] = float(np.mean([n for n, _ in nocs]))
        out[f"failed@{name}"] = 100 * float(np.mean([not ok for _, ok in nocs]))
    out["F@1px"] = 100 * float(np.mean([r.f1px for r in results]))
    out["F@2px"] = 100 * float(np.mean([r.f2px for r in results]))
    out["predict_ms"] = 1000 * float(np.median([r.predict_seconds for r in results]))
    corrections = [s for r in results for s in r.correct_seconds]
    out["correct_ms"] = 1000 * float(np.median(corrections)) if corrections else float("nan")
    out["objects"] = len(results)
    return out
