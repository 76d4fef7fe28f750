"""DELSE's evaluation protocol where it matters for comparisons with the paper: DAVIS J/F per
sequence as the DAVIS toolkit computes them, the threshold search for DELSE and the baselines
alike, and DEXTR's initialisation of the 4-channel stem from a 3-channel checkpoint."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from levelset import metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"

# Two sequences, per-frame J in frame order. The toolkit drops the first and last frame:
# A keeps [0.2, 0.6, 0.8], B keeps [0.4, 0.7].
SEQ_J = {"A": [0.9, 0.2, 0.6, 0.8, 0.1], "B": [1.0, 0.4, 0.7, 0.0]}
SEQ_F = {"A": [0.0, 0.5, 0.9, 0.7, 1.0], "B": [0.3, 0.2, 0.6, 0.9]}


def test_davis_measures_per_sequence_over_frames_1_to_minus_1():
    res = metrics.davis_sequence_measures(SEQ_J, SEQ_F)
    # By hand: J mean A = 1.6 / 3, B = 1.1 / 2; the mean over the two sequences.
    assert res["J_mean"] == pytest.approx((1.6 / 3 + 0.55) / 2)
    # Recall: A 2 of 3 frames above 0.5, B 1 of 2.
    assert res["J_recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Decay, the toolkit's quarters of n frames at round(linspace(1, n, 5)) - 1: n = 3 gives
    # [0, 1, 1, 2, 2], first quarter frames 0..1, last frame 2: (0.2+0.6)/2 - 0.8 = -0.4;
    # n = 2 gives [0, 0, 1, 1, 1]: 0.4 - 0.7 = -0.3.
    assert res["J_decay"] == pytest.approx((-0.4 - 0.3) / 2)
    # F: A keeps [0.5, 0.9, 0.7] (mean 0.7, recall 2/3), B keeps [0.2, 0.6] (0.4, 1/2).
    assert res["F_mean"] == pytest.approx((0.7 + 0.4) / 2)
    assert res["F_recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Not the pooled mean over all frames (what the instance-level summary gives).
    pooled = metrics.davis_measures(sum(SEQ_J.values(), []), sum(SEQ_F.values(), []))
    assert abs(pooled["J_mean"] - res["J_mean"]) > 0.01


def test_a_sequence_too_short_to_keep_a_frame_is_not_counted():
    res = metrics.davis_sequence_measures({"A": [0.9, 0.2, 0.6, 0.8, 0.1], "C": [0.3, 0.3]},
                                          {"A": [0.5] * 5, "C": [0.5, 0.5]})
    assert res["J_mean"] == pytest.approx(1.6 / 3)


def test_evaluator_summary_of_a_video_dataset_is_per_sequence():
    from delse import DELSEEvaluator

    records = []
    for seq in SEQ_J:
        for k, (j, f) in enumerate(zip(SEQ_J[seq], SEQ_F[seq])):
            records.append({"image_id": f"{seq}/{k:05d}", "iou": j, "f_davis": f, "f_curve": [f, f],
                            "corrections": []})
    records = records[::-1]  # any order: frames are ordered by their ids
    res = DELSEEvaluator.summarize(records, [1.0, 2.0], by_sequence=True)
    assert res["J_mean"] == pytest.approx(100 * (1.6 / 3 + 0.55) / 2)
    assert res["F_mean"] == pytest.approx(100 * (0.7 + 0.4) / 2)
    assert res["mIoU"] == pytest.approx(100 * np.mean(sum(SEQ_J.values(), [])))  # mIoU stays per instance


def test_davis_datasets_are_marked_as_video():
    from detectron2.data import MetadataCatalog

    import delse  # noqa: F401

    assert MetadataCatalog.get("delse_davis2016_val").video_sequences
    assert not MetadataCatalog.get("delse_pascal_voc2012_val").get("video_sequences", False)


# ------------------------------------------------------------------------------- threshold search
def _square(size, y0, y1, x0, x1):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("pixel_wise", [False, True])
def test_threshold_search_is_on_for_delse_and_the_baseline_alike(pixel_wise):
    """A prediction whose scores are right at another threshold than the default: the search
    finds it (IoU 100) beside the default threshold's lower mIoU, for either kind of model."""
    import delse
    from delse import DELSEEvaluator
    from delse.data import to_rle  # noqa: F401

    cfg = delse.get_cfg()
    assert cfg.TEST.DELSE.THRESHOLD_SEARCH  # the default, for every model
    from pycocotools import mask as mask_util

    gt = _square(20, 5, 15, 5, 15)
    rle = mask_util.encode(np.asfortranarray(gt.astype(np.uint8)))
    yy, xx = np.mgrid[:20, :20]
    cheb = np.maximum(np.abs(yy - 9.5), np.abs(xx - 9.5))  # 4.5 on the GT's outer ring
    if pixel_wise:  # p > 0.7 is the GT, p > 0.5 one pixel wider
        scores = np.clip(1.0 - cheb / 15.0, 0, 1)
        key, default = "prob", scores > 0.5
    else:  # phi > 2 is the GT (phi is 6.5 - cheb), phi > 0 two pixels wider
        scores = 6.5 - cheb
        key, default = "phi", scores > 0
    scores = torch.tensor(scores, dtype=torch.float32)
    out = {key: scores[None], "mask": torch.from_numpy(default)}
    if pixel_wise:
        out["phi"] = scores[None]
    x = {"annotation": {"segmentation": rle}, "height": 20, "width": 20, "crop_box": np.array([0, 0, 20, 20.0]),
         "instance_id": "a", "image_id": "a"}
    ev = DELSEEvaluator("delse_test_threshold_search", cfg, distributed=False)
    ev.process([x], [out])
    res = ev.evaluate()["delse"]
    assert res["mIoU"] < 90
    assert res["mIoU@best_threshold"] == pytest.approx(100.0)
    lo, hi = (0.5, 0.75) if pixel_wise else (1.0, 2.5)
    assert lo <= res["best_threshold"] <= hi


# ------------------------------------------------------------------------------- stem copy
def _tiny_cfg(weights):
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)])
    return cfg


@pytest.mark.parametrize("layout", ["detectron2", "caffe2"])
def test_a_3_channel_checkpoint_initialises_the_rgb_filters_and_a_zero_heatmap_plane(tmp_path, layout):
    from detectron2.modeling import build_model

    from levelset_d2.checkpoint import SafeDetectionCheckpointer

    rng = np.random.default_rng(0)
    stem = rng.standard_normal((32, 3, 7, 7)).astype(np.float32)  # the tiny stem: 32 filters, 7 x 7
    other = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    if layout == "detectron2":  # Detectron2 model-zoo .pkl (e.g. ImageNetPretrained/torchvision/R-50.pkl)
        data = {"model": {"stem.conv1.weight": stem, "res2.0.conv1.weight": other},
                "__author__": "test", "matching_heuristics": True}
    else:  # Caffe2 / Detectron1 (ImageNetPretrained/MSRA/R-101.pkl): Caffe2 names under "blobs"
        data = {"blobs": {"conv1_w": stem, "res2_0_branch2a_w": other}}
    path = tmp_path / "imagenet.pkl"
    path.write_bytes(pickle.dumps(data))

    torch.manual_seed(0)
    model = build_model(_tiny_cfg(path))
    SafeDetectionCheckpointer(model).load(str(path))  # what the trainer does next
    w = model.encoder.stem.conv1.weight.detach()
    assert w.shape == (32, 4, 7, 7)
    np.testing.assert_array_equal(w[:, :3].numpy(), stem)
    assert torch.count_nonzero(w[:, 3]) == 0


def test_a_delse_checkpoint_keeps_its_4_channel_stem(tmp_path):
    from detectron2.modeling import build_model

    from levelset_d2.checkpoint import SafeDetectionCheckpointer

    torch.manual_seed(1)
    trained = build_model(_tiny_cfg(""))
    path = tmp_path / "model_final.pth"
    torch.save({"model": trained.state_dict()}, path)
    torch.manual_seed(2)
    model = build_model(_tiny_cfg(path))
    SafeDetectionCheckpointer(model).load(str(path))
    assert torch.equal(model.encoder.stem.conv1.weight, trained.encoder.stem.conv1.weight)
    assert torch.count_nonzero(model.encoder.stem.conv1.weight[:, 3]) > 0
