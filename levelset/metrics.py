"""Boundary-quality metrics for instance masks (NumPy / SciPy / OpenCV / pycocotools).

* Boundary F-measure (Perazzi et al., "A Benchmark Dataset and Evaluation Methodology for Video
  Object Segmentation", CVPR 2016 — DAVIS's F) and the DAVIS summary statistics that DELSE reports
  (J mean / recall, F mean / recall, and F over tolerances 1..10 px, DELSE Fig. 5).
* AF1 / AF2 of LevelSet R-CNN (Homayounfar et al., ECCV 2020, Sec. 5 "Boundary Metric"): the
  boundary F1 of true-positive detections at 1 and 2 px, averaged over IoU thresholds 0.50:0.95
  and classes.
* Boundary IoU and Boundary AP (Cheng et al., "Boundary IoU: Improving Object-Centric Image
  Segmentation Evaluation", CVPR 2021).
* A paired comparison of two models scored on the same objects (mean difference with a bootstrap
  interval over objects), as the benchmarks report it.

All masks are binary arrays of shape (H, W) (bool or {0, 1}); rows are y, columns x.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DAVIS_TOLERANCE",
    "mask_to_boundary",
    "boundary_f_measure",
    "boundary_f_curve",
    "jaccard",
    "davis_measures",
    "davis_sequence_statistics",
    "davis_sequence_measures",
    "match_detections",
    "af_scores",
    "boundary_iou",
    "boundary_ap",
    "to_rle",
    "paired_difference",
]

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50:0.05:0.95, as COCOeval
DAVIS_TOLERANCE = 0.008  # DAVIS's official F tolerance: 0.8 % of the image diagonal

CocoResults = List[Dict]  # COCO result dicts: image_id, category_id, score, segmentation (RLE)


def to_rle(segmentation, height: int, width: int) -> Dict:
    """COCO polygon list / RLE dict (compressed or not) -> one compressed RLE (pycocotools' input)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


# ---------------------------------------------------------------------------------------------
# Boundaries
# ---------------------------------------------------------------------------------------------
def mask_to_boundary(mask: np.ndarray, width: int = 1, *, border_is_boundary: bool = True
                     ) -> np.ndarray:
    """The inner boundary band of a mask: mask pixels within chessboard distance ``width`` of the
    background (Cheng et al. 2021, Sec. 3, and their ``mask_to_boundary``: ``mask - erode(mask)``
    with a 3x3 square structuring element applied ``width`` times).

    ``width = 1`` gives the 1-pixel boundary: the mask pixels with at least one of their 8
    neighbours outside the mask (a one-pixel-thick closed contour; holes have their own).

    Args:
        mask: (H, W) binary mask.
        width: band width d in pixels (>= 1).
        border_is_boundary: whether pixels outside the image count as background, so that a mask
            touching the image border has a boundary there. Boundary IoU says yes (its reference
            code pads with zeros); DAVIS's F says no (the image edge is not an object contour).

    Returns:
        (H, W) bool array.
    """
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    width = int(width)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT,
                                value=0 if border_is_boundary else 1)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=width,
                       borderType=cv2.BORDER_REPLICATE)[1:-1, 1:-1]
    return (mask == 1) & (eroded == 0)


def _tolerance_px(tolerance: float, shape: Tuple[int, int]) -> float:
    """DAVIS convention: a tolerance >= 1 is in pixels; below 1 it is a fraction of the diagonal."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if tolerance >= 1 or tolerance == 0:
        return float(tolerance)
    return float(np.ceil(tolerance * np.hypot(*shape)))


def _boundary_distances(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each predicted boundary pixel to the nearest GT boundary pixel, and
    from each GT boundary pixel to the nearest predicted one (1-D arrays; inf if the other is
    empty).

    Works on the crop around both masks (1 px margin), which is exact: the boundary does not
    depend on pixels more than 1 px away and the distances only on boundary pixels.
    """
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"expected two (H, W) masks of one shape, got {pred.shape} and {gt.shape}")
    rows = np.flatnonzero((pred | gt).any(axis=1))
    cols = np.flatnonzero((pred | gt).any(axis=0))
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, pred.shape[0])
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, pred.shape[1])
    # A crop edge inside the image has only background next to it, so border_is_boundary=False
    # (DAVIS) gives the same boundary on the crop as on the full image.
    pb = mask_to_boundary(pred[y0:y1, x0:x1], border_is_boundary=False)
    gb = mask_to_boundary(gt[y0:y1, x0:x1], border_is_boundary=False)

    def dist_to(b):
        if not b.any():
            return np.full(b.shape, np.inf)
        return ndimage.distance_transform_edt(~b)

    return dist_to(gb)[pb], dist_to(pb)[gb]


def _f_from_distances(d_pred: np.ndarray, d_gt: np.ndarray, tol: float
                      ) -> Tuple[float, float, float]:
    n_pred, n_gt = len(d_pred), len(d_gt)
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    # DAVIS's convention for one empty boundary: its own measure is vacuously 1, F is 0.
    precision = float(np.mean(d_pred <= tol)) if n_pred else 1.0
    recall = float(np.mean(d_gt <= tol)) if n_gt else 1.0
    if n_pred == 0 or n_gt == 0 or precision + recall == 0:
        return precision, recall, 0.0
    return precision, recall, 2 * precision * recall / (precision + recall)


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, tolerance: float = DAVIS_TOLERANCE
                       ) -> Tuple[float, float, float]:
    """Boundary precision, recall and F-measure of DAVIS (Perazzi et al. 2016, Sec. 3.1).

    With B_p, B_g the 1-pixel boundaries (:func:`mask_to_boundary`, image border not a boundary),
    a boundary pixel is matched if a pixel of the other boundary lies within Euclidean distance
    ``tolerance`` — DAVIS's dilation of the other boundary by a disk of that radius::

        P = |{p in B_p : d(p, B_g) <= tol}| / |B_p|,   R = |{g in B_g : d(g, B_p) <= tol}| / |B_g|,
        F = 2 P R / (P + R).

    The matching and tolerance are the DAVIS toolkit's (``f_measure``: ``binary_dilation`` by
    ``disk(tol)``); its ``seg2bmap`` boundary marks one pixel of each fg/bg pixel pair, ours the
    inner (foreground) pixel, so values can differ slightly from the toolkit's on the same masks.

    Both boundaries empty: P = R = F = 1. One empty: F = 0 (P = 1, R = 0 for an empty prediction;
    P = 0, R = 1 for an empty ground truth).

    Args:
        pred, gt: (H, W) binary masks.
        tolerance: in pixels if >= 1 (or 0: exact match); if in (0, 1), a fraction of the image
            diagonal rounded up to whole pixels (DAVIS; its official value is 0.008).

    Returns:
        (precision, recall, f) as floats in [0, 1].
    """
    tol = _tolerance_px(tolerance, np.shape(gt))
    return _f_from_distances(*_boundary_distances(pred, gt), tol)


def boundary_f_curve(pred: np.ndarray, gt: np.ndarray,
                     thresholds: Iterable[float] = range(1, 11)) -> np.ndarray:
    """Boundary F at several tolerances (DELSE Fig. 5: "ranging the threshold from 1 to 10 pixels").

    Args:
        pred, gt: (H, W) binary masks.
        thresholds: tolerances, with :func:`boundary_f_measure`'s convention.

    Returns:
        (len(thresholds),) float array of F.
    """
    d_pred, d_gt = _boundary_distances(pred, gt)
    shape = np.shape(gt)
    return np.array([_f_from_distances(d_pred, d_gt, _tolerance_px(t, shape))[2]
                     for t in thresholds])


# ---------------------------------------------------------------------------------------------
# DAVIS region measure and summary statistics
# ---------------------------------------------------------------------------------------------
def jaccard(pred: np.ndarray, gt: np.ndarray, void: Optional[np.ndarray] = None) -> float:
    """Region similarity J = |pred ∩ gt| / |pred ∪ gt| of (H, W) masks; 1 if both are empty.

    ``void``: optional (H, W) mask of pixels left out of both counts (PASCAL's void band, as in
    DEXTR's evaluation).
    """
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    keep = True if void is None else ~(np.asarray(void) > 0)
    union = (np.logical_or(pred, gt) & keep).sum()
    if union == 0:
        return 1.0
    return float((np.logical_and(pred, gt) & keep).sum() / union)


def davis_measures(ious: Sequence[float], fs: Sequence[float]) -> Dict[str, float]:
    """DAVIS summary statistics (Perazzi et al. 2016, Sec. 3.2) as reported in DELSE Table 6.

    Mean is the average over objects; recall is the fraction of objects scoring above 0.5.

    Args:
        ious: (N,) per-object J.
        fs: (N,) per-object boundary F.

    Returns:
        {"J_mean", "J_recall", "F_mean", "F_recall"} as fractions in [0, 1].
    """
    ious, fs = np.asarray(ious, dtype=float), np.asarray(fs, dtype=float)
    return {"J_mean": float(np.mean(ious)), "J_recall": float(np.mean(ious > 0.5)),
            "F_mean": float(np.mean(fs)), "F_recall": float(np.mean(fs > 0.5))}


def davis_sequence_statistics(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean, recall and decay of one sequence's per-frame J or F, as the DAVIS toolkit computes
    them (``db_statistics``): the caller passes the frames it evaluates (the toolkit drops the
    first and the last). Decay: mean of the first quarter of the frames minus that of the last,
    quarters bounded at ``round(linspace(1, n, 5)) - 1`` as the toolkit does.

    Returns:
        (mean, recall = fraction > 0.5, decay); nan for no frames.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    ids = (np.round(np.linspace(1, len(x), 5) + 1e-10) - 1).astype(int)
    bins = [x[ids[i]: ids[i + 1] + 1] for i in range(4)]
    return float(x.mean()), float(np.mean(x > 0.5)), float(bins[0].mean() - bins[3].mean())


def davis_sequence_measures(ious: Dict[str, Sequence[float]], fs: Dict[str, Sequence[float]]) -> Dict[str, float]:
    """DAVIS 2016 J/F as the official toolkit reports them: per sequence over its frames [1:-1]
    (the first frame is the given one in semi-supervised VOS, the last is dropped as well), then
    the mean over sequences of each statistic. Sequences of fewer than 3 frames have no frame
    left and are not counted.

    Args:
        ious, fs: sequence name -> per-frame J / F, in frame order, every frame of the sequence.
    Returns:
        {"J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"}, fractions.
    """
    out = {}
    for name, per_seq in (("J", ious), ("F", fs)):
        stats = np.array([davis_sequence_statistics(list(v)[1:-1]) for v in per_seq.values() if len(v) > 2])
        stats = stats.reshape(-1, 3)
        for k, key in enumerate(("mean", "recall", "decay")):
            out[f"{name}_{key}"] = float(stats[:, k].mean()) if len(stats) else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# COCO-style detection evaluation: AF (LevelSet R-CNN), Boundary IoU / Boundary AP (Cheng et al.)
# ---------------------------------------------------------------------------------------------
def match_detections(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """COCO's greedy matching of detections to ground truth (COCOeval.evaluateImg, crowd-free).

    Detections, in decreasing score, each take the still-unmatched GT of highest IoU, if that IoU
    is >= the threshold. Crowd GT never yields a true positive in COCOeval (a detection matched to
    crowd is ignored), so it is left out of ``ious`` by the caller.

    Args:
        ious: (D, G) IoUs, detections sorted by decreasing score.
        iou_threshold: t.

    Returns:
        (D,) int array: index of the matched GT, or -1 for a false positive.
    """
    ious = np.asarray(ious, dtype=float).reshape(len(ious), -1)
    matches = np.full(ious.shape[0], -1, dtype=np.int64)
    taken = np.zeros(ious.shape[1], dtype=bool)
    threshold = min(iou_threshold, 1 - 1e-10)
    for d in range(ious.shape[0]):
        candidates = np.where(taken, -1.0, ious[d])
        if candidates.size == 0:
            continue
        # the last of equal maxima, as COCOeval's scan keeps it
        g = len(candidates) - 1 - int(np.argmax(candidates[::-1]))
        if candidates[g] >= threshold:
            matches[d] = g
            taken[g] = True
    return matches


def _as_coco(gt: Union[COCO, Dict, str]) -> COCO:
    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, dict):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            return coco
        return COCO(str(gt))


def _load_results(coco_gt: COCO, results: CocoResults) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes([dict(r) for r in results])


def af_scores(coco_gt: Union[COCO, Dict, str], results: CocoResults, *,
              tolerances: Sequence[float] = (1, 2),
              iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
              max_dets: int = 100) -> Dict[str, float]:
    """Average boundary F of true positives: AF1 and AF2 of LevelSet R-CNN (ECCV 2020, Sec. 5).

    "For a True Positive detection, we compute F1 between the prediction and ground truth boundary
    pixels at thresholds of 1 and 2 pixels. Similar to AP, we obtain the True Positives at IoUs in
    range [0.5, 0.95] at 0.05 increments. The F1s are averaged over all the classes and thresholds."

    Per image and category, the top ``max_dets`` detections by score are matched to non-crowd GT by
    mask IoU (:func:`match_detections`, as COCOeval). For each IoU threshold t and class c, F is
    averaged over the TPs; then over the classes that have a TP at t; then over the thresholds that
    have any TP. (A class without TPs has no boundary to score; its misses are what AP measures.)
    F is :func:`boundary_f_measure` with the tolerance in pixels. If no detection is a TP at any
    threshold, AF is 0.

    Args:
        coco_gt: ground truth as a pycocotools COCO, a COCO dict, or a json path.
        results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``segmentation`` RLE).
        tolerances: boundary tolerances in pixels; the keys are ``f"AF{tol:g}"``.
        iou_thresholds: (T,) IoU thresholds.
        max_dets: detections kept per image and category.

    Returns:
        {"AF1": ..., "AF2": ...}: fractions in [0, 1].
    """
    coco_gt = _as_coco(coco_gt)
    keys = [f"AF{t:g}" for t in tolerances]
    if len(results) == 0:
        return {k: 0.0 for k in keys}
    coco_dt = _load_results(coco_gt, results)
    gts, dts = defaultdict(list), defaultdict(list)
    for ann in coco_gt.dataset["annotations"]:
        if not (ann.get("iscrowd", 0) or ann.get("ignore", 0)):
            gts[ann["image_id"], ann["category_id"]].append(ann)
    for ann in coco_dt.dataset["annotations"]:
        dts[ann["image_id"], ann["category_id"]].append(ann)

    # per_class[t][c][k]: F at tolerance k of every TP of class c at threshold t
    per_class = [defaultdict(list) for _ in iou_thresholds]
    for (image_id, category_id), dt in dts.items():
        gt = gts.get((image_id, category_id), [])
        if not gt:
            continue
        dt = sorted(dt, key=lambda d: -d["score"])[:max_dets]  # stable, as COCOeval's mergesort
        dt_rles = [coco_dt.annToRLE(d) for d in dt]
        gt_rles = [coco_gt.annToRLE(g) for g in gt]
        ious = mask_utils.iou(dt_rles, gt_rles, [0] * len(gt_rles))
        f_cache = {}
        for ti, t in enumerate(iou_thresholds):
            for d, g in enumerate(match_detections(ious, t)):
                if g < 0:
                    continue
                if (d, g) not in f_cache:
                    d_pred, d_gt = _boundary_distances(mask_utils.decode(dt_rles[d]),
                                                       mask_utils.decode(gt_rles[g]))
                    f_cache[d, g] = [_f_from_distances(d_pred, d_gt, float(k))[2]
                                     for k in tolerances]
                per_class[ti][category_id].append(f_cache[d, g])

    per_threshold = [np.mean([np.mean(fs, axis=0) for fs in classes.values()], axis=0)
                     for classes in per_class if classes]
    if not per_threshold:
        return {k: 0.0 for k in keys}
    return dict(zip(keys, (float(v) for v in np.mean(per_threshold, axis=0))))


def _band_width(shape: Tuple[int, int], dilation_ratio: float) -> int:
    """Cheng et al.: d = dilation_ratio x image diagonal, rounded, at least 1 px."""
    return max(1, int(round(dilation_ratio * np.hypot(*shape))))


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al., CVPR 2021, Eq. 2)::

        |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|

    where X_d ∩ X is the inner band of X of width d = ``dilation_ratio`` × image diagonal
    (:func:`mask_to_boundary`; image border counts as background, as in their code). 1 if both
    bands are empty.

    Args:
        gt, pred: (H, W) binary masks.
        dilation_ratio: band width as a fraction of the image diagonal (0.02 in the paper).

    Returns:
        float in [0, 1].
    """
    gt, pred = np.asarray(gt) > 0, np.asarray(pred) > 0
    d = _band_width(gt.shape, dilation_ratio)
    gb, pb = mask_to_boundary(gt, d), mask_to_boundary(pred, d)
    union = np.logical_or(gb, pb).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(gb, pb).sum() / union)


class _BoundaryCOCOeval(COCOeval):
    """COCOeval whose IoU is min(mask IoU, boundary IoU), as Cheng et al.'s Boundary AP.

    Boundary IoU is computed as mask IoU of the inner boundary bands (RLE), so crowd GT keeps
    COCO's semantics (intersection over the detection's band).
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, dilation_ratio: float):
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self._dilation_ratio = dilation_ratio
        self._bands: Dict[Tuple[str, int], Dict] = {}

    def _band(self, kind: str, ann: Dict) -> Dict:
        key = (kind, ann["id"])
        if key not in self._bands:
            mask = mask_utils.decode(ann["segmentation"])  # _prepare has made it an RLE
            band = mask_to_boundary(mask, _band_width(mask.shape, self._dilation_ratio))
            self._bands[key] = mask_utils.encode(np.asfortranarray(band.astype(np.uint8)))
        return self._bands[key]

    def computeIoU(self, imgId, catId):  # noqa: N802 (COCOeval's name)
        mask_ious = super().computeIoU(imgId, catId)
        if len(mask_ious) == 0:
            return mask_ious
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [a for c in p.catIds for a in self._gts[imgId, c]]
            dt = [a for c in p.catIds for a in self._dts[imgId, c]]
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")  # COCOeval's order
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        band_ious = mask_utils.iou([self._band("dt", d) for d in dt],
                                   [self._band("gt", g) for g in gt],
                                   [int(g["iscrowd"]) for g in gt])
        return np.minimum(mask_ious, band_ious)


def boundary_ap(coco_gt: Union[COCO, Dict, str], results: CocoResults, *,
                dilation_ratio: float = 0.02, max_dets: int = 100) -> Dict[str, float]:
    """Boundary AP (Cheng et al., CVPR 2021, Sec. 5): COCO mask AP with IoU replaced by
    min(mask IoU, Boundary IoU) — the min keeps a mask that is right near its boundary but wrong
    far from it from scoring well. Matching, crowd handling and averaging are COCOeval's.

    Args:
        coco_gt: ground truth as a pycocotools COCO, a COCO dict, or a json path.
        results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``segmentation`` RLE).
        dilation_ratio: band width as a fraction of each image's diagonal.
        max_dets: detections per image for AP (COCOeval's last maxDets).

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"}: fractions in [0, 1] (nan where COCOeval has no
        GT in an area range); all 0 if there are no results.
    """
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if len(results) == 0:
        return {k: 0.0 for k in keys}
    coco_gt = _as_coco(coco_gt)
    coco_dt = _load_results(coco_gt, results)
    evaluator = _BoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio)
    evaluator.params.maxDets = [1, 10, max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    # Not COCOeval.summarize(): it hard-codes maxDets=100 for the headline AP, which is then -1
    # whenever max_dets != 100. precision is (iouThrs, recThrs, classes, areaRngs, maxDets).
    precision = evaluator.eval["precision"][..., -1]
    iou_thrs = list(np.round(evaluator.params.iouThrs, 2))

    def mean_valid(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    return {
        "AP": mean_valid(precision[..., 0]),
        "AP50": mean_valid(precision[iou_thrs.index(0.5), ..., 0]),
        "AP75": mean_valid(precision[iou_thrs.index(0.75), ..., 0]),
        "APs": mean_valid(precision[..., 1]),
        "APm": mean_valid(precision[..., 2]),
        "APl": mean_valid(precision[..., 3]),
    }


def paired_difference(a: Sequence[float], b: Sequence[float], rng: np.random.Generator, n_boot: int = 2000,
                      tolerance: float = 1e-3) -> Dict[str, float]:
    """
    B - A over objects scored by both: the mean difference, its 95 % percentile-bootstrap interval
    (objects resampled with replacement ``n_boot`` times) and the shares of objects that B helps /
    hurts by more than ``tolerance``.

    Args:
        a, b: (N,) one value per object, in the same object order (e.g. IoU in [0, 1]).
    Returns:
        ``mean``, ``low``, ``high`` in the values' units; ``helped``, ``hurt`` in [0, 1].
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_difference needs two equal-length, non-empty 1-d sequences, got {a.shape} and {b.shape}")
    d = b - a
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    return {"mean": float(d.mean()), "low": float(np.percentile(boot, 2.5)), "high": float(np.percentile(boot, 97.5)),
            "helped": float((d > tolerance).mean()), "hurt": float((d < -tolerance).mean())}
