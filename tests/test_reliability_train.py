"""Issue 6, long runs: config errors fail at build time naming the key, a non-finite loss stops the
run naming the term and the iteration, and a run killed after a checkpoint resumes from it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import levelset_rcnn
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from levelset_d2.config import check_registered_names


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"


def _cfg(*opts):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([str(o) if isinstance(o, Path) else o for o in opts])
    return cfg


# ------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("key, value, message", [
    ("EVOLUTION_STEPS", 0, "MODEL.LEVELSET.EVOLUTION_STEPS must be >= 1"),
    ("EVOLUTION_RESOLUTION", 60, r"MODEL.LEVELSET.EVOLUTION_RESOLUTION \(60\) must be a multiple"),
    ("EVOLUTION_RESOLUTION", 14, r"MODEL.LEVELSET.EVOLUTION_RESOLUTION \(14\) must be a multiple of, and at least"),
    ("TRUNCATION", 0.0, "MODEL.LEVELSET.TRUNCATION must be > 0"),
    ("TRUNCATION", -2.0, "MODEL.LEVELSET.TRUNCATION must be > 0"),
    ("HYPERPARAM_MODE", "adaptiv", "MODEL.LEVELSET.HYPERPARAM_MODE must be one of"),
    ("INFERENCE_TSDF", "phi0", "MODEL.LEVELSET.INFERENCE_TSDF must be one of"),
])
def test_bad_levelset_values_fail_when_the_head_is_built(key, value, message):
    cfg = _cfg(f"MODEL.LEVELSET.{key}", value)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_tsdf_head_checks_its_keys_too():
    cfg = _cfg("MODEL.ROI_MASK_HEAD.NAME", "TSDFMaskRCNNHead", "MODEL.LEVELSET.TRUNCATION", 0.0)
    with pytest.raises(ValueError, match="MODEL.LEVELSET.TRUNCATION"):
        build_model(cfg)


@pytest.mark.parametrize("key, value", [
    ("MODEL.ROI_MASK_HEAD.NAME", "LevelsetMaskHead"),
    ("MODEL.META_ARCHITECTURE", "DELS"),
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn"),
    ("MODEL.ROI_HEADS.NAME", "StandardROIHead"),
])
def test_unknown_component_names_say_which_key_to_change(key, value):
    cfg = _cfg(key, value)
    with pytest.raises(ValueError, match=rf"{key} = '{value}' is not registered; change {key} to one of: .*"):
        check_registered_names(cfg)
    check_registered_names(_cfg())  # the shipped config passes


@pytest.mark.slow
def test_train_net_reports_an_unknown_head_before_building(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY),
         "MODEL.ROI_MASK_HEAD.NAME", "LevelSetMaskHeadX", "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "MODEL.ROI_MASK_HEAD.NAME = 'LevelSetMaskHeadX' is not registered" in proc.stderr
    assert "LevelSetMaskHead" in proc.stderr.split("one of:")[-1]


# ------------------------------------------------------------------------------- NaN loss
def _register_tiny_dataset(tmp_path, n=4):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        img = np.full((128, 128, 3), 30, np.uint8)
        x0, y0 = (int(v) for v in rng.integers(10, 60, 2))
        cv2.rectangle(img, (x0, y0), (x0 + 40, y0 + 30), (200, 150, 100), -1)
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), img)
        poly = [[x0, y0, x0 + 41, y0, x0 + 41, y0 + 31, x0, y0 + 31]]
        records.append(dict(file_name=str(path), height=128, width=128, image_id=i, annotations=[
            dict(id=i, bbox=[x0, y0, 41, 31], bbox_mode=BoxMode.XYWH_ABS, segmentation=poly,
                 category_id=i % 4, iscrowd=0)]))
    name = f"reliability_tiny_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c", "d"])
    return name


def test_nan_loss_stops_the_run_naming_the_term_and_iteration(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    try:
        from levelset_d2 import engine
    finally:
        sys.path.remove(str(REPO))
    from detectron2.utils.events import get_event_storage
    from levelset_rcnn.mask_head import LevelSetMaskHead

    losses = LevelSetMaskHead.losses

    def nan_at_iteration_2(self, *args):
        out = losses(self, *args)
        if get_event_storage().iter == 2:
            out["loss_tsdf_final"] = out["loss_tsdf_final"] * float("nan")
        return out

    monkeypatch.setattr(LevelSetMaskHead, "losses", nan_at_iteration_2)
    name = _register_tiny_dataset(tmp_path)
    cfg = _cfg("DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
               "SOLVER.MAX_ITER", 6, "OUTPUT_DIR", tmp_path / "out", "INPUT.MASK_FORMAT", "polygon")
    trainer = engine.Trainer(cfg)
    with pytest.raises(FloatingPointError, match=r"(?s)iteration=2!.*'loss_tsdf_final': (np\.float64\()?nan"):
        trainer.train()
    assert trainer.iter == 2
    assert not (tmp_path / "out" / "model_final.pth").exists()


# ------------------------------------------------------------------------------- kill + resume
def _train_net(tmp_path, *opts, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY)]
    args += ["--resume"] if resume else []
    args += ["DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
             "OUTPUT_DIR", str(tmp_path), *map(str, opts)]
    log = open(tmp_path / ("resume.log" if resume else "first.log"), "w")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_completes(tmp_path):
    opts = ("SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 3)
    proc = _train_net(tmp_path, *opts)
    deadline = time.time() + 50
    while not (tmp_path / "last_checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert alive, (tmp_path / "first.log").read_text()[-3000:]
    assert (tmp_path / "last_checkpoint").read_text().strip() in ("model_0000002.pth", "model_0000005.pth")
    assert not (tmp_path / "model_final.pth").exists()
    saved = int((tmp_path / "last_checkpoint").read_text().strip()[6:13])

    proc = _train_net(tmp_path, *opts, resume=True)
    assert proc.wait(60) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    log = (tmp_path / "resume.log").read_text()
    assert f"Starting training from iteration {saved + 1}" in log, log[-3000:]
    assert (tmp_path / "model_final.pth").exists()
    iters = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert iters[-1] == 7  # MAX_ITER 8: iterations 0..7, the last one run after the resume
