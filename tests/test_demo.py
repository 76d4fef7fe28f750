"""`make demo` end to end at a few iterations: both parts run, print their numbers and write readable
pictures (the real demo only trains longer)."""
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_evaluates_and_draws_both_models(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    cmd = [sys.executable, "demo.py", "--iters", "2", "--num-overlays", "2", "--output", str(out),
           "--delse-opts", "SOLVER.MAX_ITER", "3", "MODEL.DELSE.PRETRAIN_ITERS", "1", "SOLVER.STEPS", "(2,)"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== LevelSet R-CNN demo ===" in proc.stdout and "COCO segm AP" in proc.stdout
    assert "=== DELSE demo ===" in proc.stdout and "mIoU after 1 / 2 simulated drags" in proc.stdout
    overlays = sorted(out.glob("overlay_*.png"))
    pictures = sorted((out / "delse").glob("delse_*.png"))
    assert len(overlays) == 2 and len(pictures) == 2
    for path in overlays + pictures:
        image = cv2.imread(str(path))
        assert image is not None and image.ndim == 3 and min(image.shape[:2]) > 32, path
    # The DELSE pictures show the GT contour and the red clicks (whatever the 3-iteration model does).
    import numpy as np

    monkeypatch.syspath_prepend(str(REPO))  # undone after the test
    from demo import CLICK_BGR, GT_BGR

    image = cv2.imread(str(pictures[0]))
    for color in (GT_BGR, CLICK_BGR):
        assert (np.abs(image.astype(int) - color).sum(-1) < 30).sum() > 10, color
    # The saved configs load back (what a user passes to --config-file).
    assert (out / "config.yaml").exists() and (out / "delse" / "config.yaml").exists()
