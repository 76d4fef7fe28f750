import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from levelset.metrics import (
    af_scores,
    boundary_ap,
    boundary_f_curve,
    boundary_f_measure,
    boundary_iou,
    davis_measures,
    jaccard,
    mask_to_boundary,
    match_detections,
    paired_difference,
)


def _square(shape=(5, 6), y=1, x=1, size=3):
    m = np.zeros(shape, bool)
    m[y:y + size, x:x + size] = True
    return m


def _shift(mask, dy, dx):
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _brute_boundary(mask):
    """Mask pixels with a background 8-neighbour inside the image (the edge is no boundary)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and not mask[yy, xx]:
                    out[y, x] = True
    return out


def _brute_f(pred, gt, tol):
    """Precision, recall, F by matching every boundary pixel against every other one."""
    pb, gb = np.argwhere(_brute_boundary(pred)), np.argwhere(_brute_boundary(gt))
    dist = np.sqrt(((pb[:, None, :] - gb[None, :, :]) ** 2).sum(-1))  # (|B_p|, |B_g|)
    precision = (dist.min(axis=1) <= tol).mean()
    recall = (dist.min(axis=0) <= tol).mean()
    return precision, recall, 2 * precision * recall / (precision + recall)


@pytest.fixture(scope="module")
def coco_sample(coco_sample_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_sample_dir / "instances_val2017_subset.json"))


@pytest.fixture(scope="module")
def dsb_mask(dsb2018_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(dsb2018_dir / "dev.json"))
    anns = sorted(coco.dataset["annotations"], key=lambda a: -a["area"])
    return coco.annToMask(anns[len(anns) // 4]).astype(bool)  # large, not the largest, nucleus


# -------------------------------------------------------------------------------- boundaries
def test_boundary_of_square_and_hole():
    b = mask_to_boundary(_square())
    assert b.sum() == 8 and not b[2, 2]  # 3x3 square: the 8 outer pixels, not the centre
    ring = _square((9, 9), 1, 1, 7)
    ring[4, 4] = False
    b = mask_to_boundary(ring)
    assert b.sum() == 24 + 8  # 7x7 outline plus the 8 pixels around the hole
    band = mask_to_boundary(_square((9, 9), 1, 1, 7), 2)
    assert band.sum() == 49 - 9  # width 2: all but the inner 3x3


def test_image_border_convention():
    full = np.ones((4, 5), bool)
    assert mask_to_boundary(full).sum() == 4 * 5 - 2 * 3  # Boundary IoU: the border is a boundary
    assert not mask_to_boundary(full, border_is_boundary=False).any()  # DAVIS: it is not


def test_band_matches_chessboard_distance(dsb_mask):
    for width in (1, 3):
        padded = np.pad(dsb_mask, 1)
        dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
        expected = dsb_mask & (dist <= width)
        assert np.array_equal(mask_to_boundary(dsb_mask, width), expected)


# ------------------------------------------------------------------------------- F-measure
def test_f_hand_computed_shift():
    gt, pred = _square(), _shift(_square(), 0, 1)
    # 8 boundary pixels each; 4 coincide (top and bottom rows of columns 2-3)
    assert boundary_f_measure(pred, gt, 0) == (0.5, 0.5, 0.5)
    assert boundary_f_measure(pred, gt, 1) == (1.0, 1.0, 1.0)


def test_f_diagonal_needs_sqrt2():
    gt, pred = _square((7, 7), 1, 1, 4), _square((7, 7), 2, 2, 4)
    p, r, f = boundary_f_measure(pred, gt, 1)
    assert f < 1
    assert boundary_f_measure(pred, gt, 1.5)[2] == 1.0
    assert np.allclose((p, r, f), _brute_f(pred, gt, 1))


def test_f_empty_masks():
    empty, m = np.zeros((6, 6), bool), _square((6, 6))
    assert boundary_f_measure(empty, empty, 1) == (1.0, 1.0, 1.0)
    assert boundary_f_measure(empty, m, 1) == (1.0, 0.0, 0.0)
    assert boundary_f_measure(m, empty, 1) == (0.0, 1.0, 0.0)


def test_f_fraction_of_diagonal():
    gt = _square((100, 100), 20, 20, 40)
    pred = _shift(gt, 2, 0)  # ceil(0.008 * 141.4) = 2 px: a 2-px shift is within tolerance
    assert boundary_f_measure(pred, gt)[2] == 1.0
    assert boundary_f_measure(pred, gt, 1)[2] < 1.0


def test_f_real_mask(dsb_mask):
    gt = dsb_mask
    assert boundary_f_measure(gt, gt, 1) == (1.0, 1.0, 1.0)
    assert boundary_f_measure(_shift(gt, 0, 1), gt, 1)[2] == 1.0
    for (dy, dx), tol in [((0, 1), 0), ((1, 1), 1), ((2, 1), 2), ((3, -2), 2)]:
        pred = _shift(gt, dy, dx)
        assert np.allclose(boundary_f_measure(pred, gt, tol), _brute_f(pred, gt, tol))


def test_f_real_coco_polygon(coco_sample):
    anns = [a for a in coco_sample.dataset["annotations"] if not a["iscrowd"]]
    ann = max(anns, key=lambda a: a["area"])
    gt = coco_sample.annToMask(ann).astype(bool)
    rows, cols = np.nonzero(gt.any(1))[0], np.nonzero(gt.any(0))[0]
    gt = gt[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # touches the crop border: DAVIS convention
    gt = gt[::4, ::4]  # keep the brute force small
    pred = _shift(gt, 1, -1)
    assert np.allclose(boundary_f_measure(pred, gt, 1), _brute_f(pred, gt, 1))


def test_f_curve_monotone_and_consistent(dsb_mask):
    pred = _shift(dsb_mask, 3, 2)
    curve = boundary_f_curve(pred, dsb_mask)
    assert curve.shape == (10,) and np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
    assert np.allclose(curve, [boundary_f_measure(pred, dsb_mask, t)[2] for t in range(1, 11)])


# ------------------------------------------------------------------------------------ DAVIS
def test_jaccard_and_davis_measures():
    gt = _square()
    assert jaccard(gt, gt) == 1.0 and jaccard(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert jaccard(_shift(gt, 0, 1), gt) == pytest.approx(6 / 12)
    m = davis_measures([0.9, 0.4, 0.6, 0.2], [1.0, 0.5, 0.8, 0.1])
    assert m == pytest.approx({"J_mean": 0.525, "J_recall": 0.5, "F_mean": 0.6, "F_recall": 0.5})


# ------------------------------------------------------------------------------ Boundary IoU
def test_boundary_iou():
    gt = _square((60, 60), 10, 10, 30)  # d = round(0.02 * 84.9) = 2
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(gt, _square((60, 60), 45, 45, 10)) == 0.0
    bigger = _square((60, 60), 8, 8, 34)  # bands of 2 px: no overlap although mask IoU is 0.78
    assert boundary_iou(gt, bigger) == 0.0
    inner = _square((60, 60), 11, 11, 28)
    expected = (mask_to_boundary(gt, 2) & mask_to_boundary(inner, 2)).sum() / \
        (mask_to_boundary(gt, 2) | mask_to_boundary(inner, 2)).sum()
    assert boundary_iou(gt, inner) == pytest.approx(expected) and 0 < expected < 1


# --------------------------------------------------------------------- COCO-style: AF, Boundary AP
def _results(coco, transform=lambda m, i: m, score=lambda i: 0.9):
    out = []
    for i, ann in enumerate(a for a in coco.dataset["annotations"] if not a["iscrowd"]):
        mask = transform(coco.annToMask(ann), i)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "score": score(i), "segmentation": rle})
    return out


def _perturbed(coco):
    rng = np.random.default_rng(0)
    shifts = rng.integers(-6, 7, size=(200, 2))
    results = _results(coco, lambda m, i: _shift(m.astype(bool), *shifts[i]),
                       score=lambda i: float(rng.uniform()))
    return results + results[::3]  # duplicates: false positives at every threshold


def test_match_detections_equals_cocoeval(coco_sample):
    results = _perturbed(coco_sample)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_sample.loadRes(results)
        ev = COCOeval(coco_sample, coco_dt, iouType="segm")
        ev.evaluate()
    num_tp = 0
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        gts = [coco_sample.anns[g] for g in e["gtIds"]]
        gts = [g for g in gts if not g["iscrowd"]]
        dts = [coco_dt.anns[d] for d in e["dtIds"]]  # already sorted by score
        if not gts or not dts:
            continue
        ious = mask_utils.iou([coco_dt.annToRLE(d) for d in dts],
                              [coco_sample.annToRLE(g) for g in gts], [0] * len(gts))
        for ti, t in enumerate(ev.params.iouThrs):
            ours = match_detections(ious, t)
            expected = [g if not ig else 0 for g, ig in zip(e["dtMatches"][ti], e["dtIgnore"][ti])]
            assert [gts[g]["id"] if g >= 0 else 0 for g in ours] == [int(x) for x in expected]
            num_tp += int((ours >= 0).sum())
    assert num_tp > 50


def test_af_perfect_and_eroded(coco_sample):
    perfect = _results(coco_sample)
    assert af_scores(coco_sample, perfect) == {"AF1": 1.0, "AF2": 1.0}
    kernel = np.ones((3, 3), bool)
    eroded = _results(coco_sample, lambda m, i: ndimage.binary_erosion(m, kernel))
    af = af_scores(coco_sample, eroded)
    assert af["AF1"] < af["AF2"] < 1.0
    assert af_scores(coco_sample, []) == {"AF1": 0.0, "AF2": 0.0}


def test_af_uses_only_true_positives(coco_sample):
    def in_corner(m, i):
        out = np.zeros_like(m)
        out[:5, :5] = 1
        return out

    results = _results(coco_sample)
    junk = dict(_results(coco_sample, in_corner)[0], score=1.0)  # a top-scoring false positive
    assert af_scores(coco_sample, results + [junk]) == {"AF1": 1.0, "AF2": 1.0}


def test_boundary_ap(coco_sample):
    assert boundary_ap(coco_sample, _results(coco_sample))["AP"] == pytest.approx(1.0)
    results = _perturbed(coco_sample)
    ap = boundary_ap(coco_sample, results)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_sample, coco_sample.loadRes(results), iouType="segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0 < ap["AP"] < ev.stats[0]  # min(mask IoU, boundary IoU) <= mask IoU
    assert ap["AP50"] >= ap["AP75"]


def test_boundary_ap_with_more_than_100_detections_per_image():
    """COCOeval.summarize() hard-codes maxDets=100 for AP; nuclei images need more (regression).
    One image with 150 GT squares, each predicted exactly: with max_dets=400 AP is 1; with 100 only
    the 100 best-scored count, recall stops at 2/3 and the 101-point AP is 67/101 (by hand)."""
    h, w, side = 130, 190, 8
    masks = [_square((h, w), 4 + 12 * r, 4 + 12 * c, side) for r in range(10) for c in range(15)]
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": 1, "name": "nucleus"}],
          "annotations": []}
    results = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        ys, xs = np.nonzero(m)
        gt["annotations"].append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle,
                                  "area": int(m.sum()), "bbox": [int(xs.min()), int(ys.min()), side, side]})
        results.append({"image_id": 1, "category_id": 1, "score": 1.0 - i / 1000, "segmentation": rle})
    assert len(results) == 150
    ap = boundary_ap(gt, results, max_dets=400)
    assert ap["AP"] == pytest.approx(1.0) and ap["AP50"] == pytest.approx(1.0), ap
    ap = boundary_ap(gt, results, max_dets=100)
    assert ap["AP"] == pytest.approx(67 / 101) and ap["AP75"] == pytest.approx(67 / 101), ap


def test_paired_difference_by_hand():
    """A constant shift has a degenerate interval at the shift; opposite changes cancel in the mean
    and count once each as helped and hurt."""
    rng = np.random.default_rng(0)
    a = np.array([0.2, 0.5, 0.9, 0.4])
    d = paired_difference(a, a + 0.1, rng)
    assert d["mean"] == pytest.approx(0.1) and d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
    assert d["helped"] == 1.0 and d["hurt"] == 0.0
    d = paired_difference(a, a + np.array([0.3, -0.3, 0.0, 0.0]), rng)
    assert d["mean"] == pytest.approx(0.0) and d["helped"] == 0.25 and d["hurt"] == 0.25
    assert -0.3 <= d["low"] < 0.0 < d["high"] <= 0.3
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(a, a[:3], rng)
