"""tools/train_annotator.py: trains DELSE on a user's COCO json (registered under its own name, not the
config's dataset) and prints the delse-serve line that serves the trained weights."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trains_on_a_users_json_and_prints_the_serve_line(tmp_path, coco_sample_dir):
    out = tmp_path / "annotator"
    cmd = [sys.executable, "tools/train_annotator.py", "--config-file", "configs/DELSE/tiny_delse_coco_sample.yaml",
           "--json", str(coco_sample_dir / "instances_val2017_subset.json"), "--image-root",
           str(coco_sample_dir / "images"), "--output-dir", str(out), "SOLVER.MAX_ITER", "3",
           "MODEL.DELSE.PRETRAIN_ITERS", "1", "DATALOADER.NUM_WORKERS", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = out / "model_final.pth"
    assert set(torch.load(weights, map_location="cpu", weights_only=True)["model"])  # a real checkpoint
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the run's config, as default_setup wrote it
    assert list(saved["DATASETS"]["TRAIN"]) == ["annotator_train"] and list(saved["DATASETS"]["TEST"]) == []
    line = [l for l in proc.stdout.splitlines() if l.strip().startswith("delse-serve")][-1]
    words = shlex.split(line)
    assert words[words.index("--weights") + 1] == str(weights)
    assert words[-2:] == ["MODEL.DELSE.DRAG_EDIT", "result"]


def test_json_without_image_root_is_refused():
    proc = subprocess.run([sys.executable, "tools/train_annotator.py", "--json", "x.json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--json and --image-root go together" in proc.stderr
