"""The standard interactive protocol (issue #22 item 2): the simulated annotator corrects the largest
error region (a missed part too, not only the worst predicted boundary point), NoC counts the 4
extreme points and caps at 20, and the protocol's IoU curve is the masks' IoUs. Expected values are
worked out by hand from the geometry of the masks."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from delse.protocol import ProtocolResult, next_correction, number_of_interactions, run_protocol, summarize


def _square(shape=(50, 60), top=10, left=10, side=20):
    m = np.zeros(shape, bool)
    m[top: top + side, left: left + side] = True
    return m


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_a_missed_part_is_corrected_from_the_nearest_predicted_boundary_to_its_centre():
    """GT: a square (rows/cols 10-29) and a disk of radius 6 at (row 20, col 40) the model missed;
    the prediction also has a 3 x 3 false blob. The disk (113 px) is the largest error: the drag goes
    from the predicted boundary pixel nearest its centre (the square's right edge, x 29, y 20) to the
    centre (x 40, y 20), the disk's most interior pixel."""
    square = _square()
    gt = square | _disk(square.shape, 20, 40, 6)
    pred = square.copy()
    pred[40:43, 2:5] = True
    c = next_correction(pred, gt)
    assert c.missed and c.region_area == int(_disk(square.shape, 20, 40, 6).sum())
    assert c.to_xy == (40.0, 20.0)
    assert c.from_xy == (29.0, 20.0)


def test_a_false_part_is_dragged_from_its_farthest_boundary_pixel_onto_the_nearest_gt_boundary():
    """GT: the square; the prediction adds a spur (rows 18-21, cols 30-38, and its tip at row 19,
    col 39). The tip is the false region's pixel farthest from the GT (10 px): dragged onto the GT
    boundary pixel nearest to it, (x 29, y 19)."""
    gt = _square()
    pred = gt.copy()
    pred[18:22, 30:39] = True
    pred[19, 39] = True
    c = next_correction(pred, gt)
    assert not c.missed and c.region_area == 4 * 9 + 1
    assert c.from_xy == (39.0, 19.0)
    assert c.to_xy == (29.0, 19.0)


def test_an_empty_prediction_drags_from_the_gt_boundary_into_the_object():
    gt = _disk((40, 40), 20, 20, 8)
    c = next_correction(np.zeros_like(gt), gt)
    assert c.missed and c.to_xy == (20.0, 20.0)
    # from: the GT boundary pixel (a disk pixel with an 8-neighbour outside) nearest the centre.
    from scipy.ndimage import binary_erosion

    boundary = gt & ~binary_erosion(gt, np.ones((3, 3)), border_value=0)
    ys, xs = np.nonzero(boundary)
    assert boundary[int(c.from_xy[1]), int(c.from_xy[0])]
    assert np.hypot(c.from_xy[0] - 20, c.from_xy[1] - 20) == pytest.approx(np.hypot(xs - 20, ys - 20).min())


def test_no_correction_for_a_perfect_mask_or_errors_below_min_area():
    gt = _square()
    assert next_correction(gt, gt) is None
    pred = gt.copy()
    pred[5, 5] = True
    assert next_correction(pred, gt, min_area=2) is None
    assert next_correction(pred, gt).from_xy == (5.0, 5.0)


def test_noc_counts_the_extreme_points_and_caps_at_the_maximum():
    ious = [0.5, 0.8, 0.86, 0.91] + [0.91] * 13  # after 4, 5, 6, 7 ... 20 interactions
    assert number_of_interactions(ious, 0.85) == (6, True)
    assert number_of_interactions(ious, 0.90) == (7, True)
    assert number_of_interactions(ious, 0.95) == (20, False)
    assert number_of_interactions([0.9] + [0.9] * 16, 0.85) == (4, True)
    # The cap cuts the curve: with at most 6 interactions, 0.91 (the 7th) is never reached.
    assert number_of_interactions(ious, 0.90, max_interactions=6) == (6, False)


class ScriptedPredictor:
    """Returns the given masks in turn: the first for predict(), the next ones for each correct();
    records the calls."""

    def __init__(self, masks):
        self.masks, self.calls = list(masks), []

    def predict(self, image, points):
        self.calls.append(("predict", np.asarray(points).tolist()))
        return type("R", (), {"mask": self.masks.pop(0)})

    def correct(self, from_xy, to_xy, preview=False):
        self.calls.append(("correct", from_xy, to_xy, preview))
        return type("R", (), {"mask": self.masks.pop(0)})


def test_the_protocol_scores_each_interaction_stops_at_the_stop_iou_and_carries_forward():
    """GT: a 10 x 10 square; the model's masks cover 5, then 8, then all 10 of its columns: IoU 0.5,
    0.8, 1.0 after 4, 5, 6 interactions; the annotator stops at 1.0 >= 0.9, the curve is carried to 20."""
    gt = np.zeros((30, 30), bool)
    gt[10:20, 10:20] = True
    masks = []
    for cols in (5, 8, 10):
        m = np.zeros_like(gt)
        m[10:20, 10:10 + cols] = True
        masks.append(m)
    predictor = ScriptedPredictor(masks)
    points = np.array([[10, 15], [19, 15], [15, 10], [15, 19]], np.float32)
    res = run_protocol(predictor, np.zeros((30, 30, 3), np.uint8), gt, points, preview=True)
    assert res.ious == pytest.approx([0.5, 0.8] + [1.0] * 15)
    assert len(res.correct_seconds) == 2
    # Each correction is the annotator's drag on the mask it saw: the missed columns 15-19, then 18-19.
    assert predictor.calls[1] == ("correct", *_drag(masks[0], gt), True)
    assert predictor.calls[2] == ("correct", *_drag(masks[1], gt), True)
    assert res.f1px < 1.0 and res.f2px < 1.0  # after the extreme points the right half is missing
    # With the cap at 5 interactions the annotator stops after one correction.
    short = run_protocol(ScriptedPredictor(masks), np.zeros((30, 30, 3), np.uint8), gt, points, max_interactions=5)
    assert short.ious == pytest.approx([0.5, 0.8])
    with pytest.raises(ValueError, match="at least 4"):
        run_protocol(ScriptedPredictor(masks), np.zeros((30, 30, 3), np.uint8), gt, points, max_interactions=3)


def _drag(pred, gt):
    c = next_correction(pred, gt)
    return c.from_xy, c.to_xy


def test_summary_means_noc_and_failures_over_objects():
    a = ProtocolResult([0.5, 0.86, 0.95] + [0.95] * 14, 0.4, 0.6, 0.010, [0.002, 0.004])
    b = ProtocolResult([0.7] * 17, 0.2, 0.4, 0.030, [])
    s = summarize([a, b])
    assert s["mIoU@4"] == pytest.approx(60.0) and s["mIoU@5"] == pytest.approx(78.0)
    assert s["mIoU@20"] == pytest.approx(82.5)
    assert s["NoC@85"] == pytest.approx((5 + 20) / 2) and s["failed@85"] == pytest.approx(50.0)
    assert s["NoC@90"] == pytest.approx((6 + 20) / 2) and s["failed@90"] == pytest.approx(50.0)
    assert s["F@1px"] == pytest.approx(30.0) and s["F@2px"] == pytest.approx(50.0)
    assert s["predict_ms"] == pytest.approx(20.0) and s["correct_ms"] == pytest.approx(3.0)
    assert s["worst_step"] == 0.0  # mean IoU 60, 78, 82.5, 82.5, ...: never drops
    c = ProtocolResult([0.7, 0.5, 0.6] + [0.6] * 14, 0.2, 0.4, 0.030, [])
    assert summarize([a, c])["worst_step"] == 0.0  # a mean: 60 -> 68 -> 77.5, c's drop averaged out
    assert summarize([b, c])["worst_step"] == pytest.approx(-10.0)  # 70 -> 60


@pytest.fixture
def noc_tool(import_tool):
    return import_tool("benchmarks", "bench_delse_noc")


def test_the_tool_scores_real_objects_from_their_extreme_points_like_the_predictor(noc_tool, coco_sample_dir, tmp_path):
    """tools/benchmarks/bench_delse_noc.py on 3 objects of the COCO sample with a (seeded, untrained)
    tiny DELSE: each object's IoU after the 4 extreme points equals DELSEPredictor.predict's mask IoU
    on that object's exact extreme points, computed here directly; NoC lies in [4, 20]."""
    import torch
    from pycocotools.coco import COCO

    import delse  # noqa: F401
    from delse.data import extreme_points
    from delse.predictor import DELSEPredictor
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from levelset_d2.config import get_cfg

    config = str(Path(__file__).resolve().parents[1] / "configs/DELSE/tiny_delse_coco_sample.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("tiny")
    ann_json = str(coco_sample_dir / "instances_val2017_subset.json")
    out = tmp_path / "noc"
    noc_tool.main(["--json", ann_json, "--image-root", str(coco_sample_dir / "images"), "--max-objects", "3",
                   "--max-interactions", "6", "--model", "tiny", config, str(tmp_path / "tiny.pth"), "--output", str(out)])
    res = json.loads(Path(str(out) + ".json").read_text())
    curves = res["ious"]["tiny"]
    assert len(curves) == 3 and all(len(c) == 3 for c in curves)  # after 4, 5, 6 interactions

    cfg.MODEL.WEIGHTS = str(tmp_path / "tiny.pth")
    predictor = DELSEPredictor(cfg)
    for (path, coco, ann), curve in zip(noc_tool.load_objects([ann_json], coco_sample_dir / "images", 3), curves):
        gt = coco.annToMask(ann) > 0
        mask = predictor.predict(cv2.imread(str(path)), extreme_points(gt, 0, np.random.default_rng(ann["id"]))).mask
        assert curve[0] == pytest.approx((mask & gt).sum() / (mask | gt).sum())
    assert 4 <= res["summary"]["tiny"]["NoC@85"] <= 6
    assert res["summary"]["tiny"]["objects"] == 3
    assert (Path(str(out) + ".md").read_text().count("| tiny |")) == 1


def test_the_tool_merges_runs_and_pairs_them_object_by_object(noc_tool, coco_sample_dir, tmp_path):
    """--merge: two earlier runs on the same 3 objects (curves written by hand) are tabulated and
    paired: B is A + 10 IoU points after the first correction on every object, so the @5 cell is
    +10.00 [+10.00, +10.00] and every object is helped (B was measured with --preview: the
    preview-vs-full gap is such a pair); a run with other settings is refused, naming the setting."""
    ann_json = str(coco_sample_dir / "instances_val2017_subset.json")
    ids = [ann["id"] for _, _, ann in noc_tool.load_objects([ann_json], coco_sample_dir / "images", 3)]
    settings = {"json": [ann_json], "objects": ids, "max_interactions": 6, "stop_iou": 0.9, "preview": False}
    row = {"mIoU@4": 50.0, "mIoU@5": 50.0, "mIoU@6": 50.0, "NoC@85": 6.0, "NoC@90": 6.0, "failed@85": 100.0,
           "failed@90": 100.0, "F@1px": 10.0, "F@2px": 20.0, "predict_ms": 1.0, "correct_ms": 1.0, "objects": 3}
    for name, second in (("A", 0.5), ("B", 0.6)):
        (tmp_path / f"{name}.json").write_text(json.dumps({**settings, "preview": name == "B", "summary": {name: row},
                                                           "ious": {name: [[0.5, second, second]] * 3},
                                                           "object_ids": {name: ids}}))
    out = tmp_path / "merged"
    noc_tool.main(["--json", ann_json, "--image-root", str(coco_sample_dir / "images"), "--max-objects", "3",
                   "--max-interactions", "6", "--merge", str(tmp_path / "A.json"), str(tmp_path / "B.json"),
                   "--output", str(out)])
    pair = [line for line in Path(str(out) + ".md").read_text().splitlines() if line.startswith("| A | B | +")]
    assert len(pair) == 1
    cells = [c.strip() for c in pair[0].split("|")[3:-1]]
    assert cells == ["+0.00 [+0.00, +0.00]", "+10.00 [+10.00, +10.00]", "+10.00 [+10.00, +10.00]", "100 % / 0 %"]
    with pytest.raises(SystemExit, match="max_interactions"):
        noc_tool.main(["--json", ann_json, "--image-root", str(coco_sample_dir / "images"), "--max-objects", "3",
                       "--merge", str(tmp_path / "A.json")])
