"""DELSE trains in several processes (train_net.py --num-gpus 2 on CPU: gloo, DDP without
device_ids) across its pre-training -> joint switch. Pre-training leaves the motion-editing block
out of the loss; without unused-parameter detection DDP stops at the second iteration."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from levelset_d2.datasets import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_delse_trains_in_two_processes_across_the_phase_switch(tmp_path):
    prepare_dataset("synthetic_shapes_train")  # before the two processes read it
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
         "--config-file", str(REPO / "configs" / "DELSE" / "demo_delse_synthetic.yaml"),
         "MODEL.DEVICE", "cpu", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4",
         "SOLVER.WARMUP_ITERS", "0", "MODEL.DELSE.PRETRAIN_ITERS", "2", "MODEL.DELSE.NUM_CORRECTIONS", "1",
         "DATALOADER.NUM_WORKERS", "0", "SEED", "0", "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (tmp_path / "model_final.pth").exists()
