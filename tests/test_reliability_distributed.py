"""Issue 6, distributed (CPU, gloo): two processes train like one with the same total batch, and a
worker that dies stops the whole job with an error naming it instead of hanging. The fault is
injected by a driver script written into tmp_path; the product has no fault-injection code."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"

DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import detectron2.utils.comm as comm
    from detectron2.engine import default_argument_parser, hooks, launch
    from levelset_d2 import engine

    def main(args, kill_rank_at):
        cfg = engine.setup(args)
        trainer = engine.Trainer(cfg)
        trainer.resume_or_load(resume=False)
        if kill_rank_at is not None:
            rank, iteration = kill_rank_at
            def kill(t):
                if comm.get_rank() == rank and t.iter == iteration:
                    os._exit(3)  # a worker lost without a Python exception (OOM killer, segfault)
            trainer.register_hooks([hooks.CallbackHook(after_step=kill)])
        trainer.train()
        if comm.is_main_process():  # per-iteration losses, already averaged over the workers
            losses = {{k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items()
                      if k.startswith("loss") or k == "total_loss"}}
            with open(os.path.join(cfg.OUTPUT_DIR, "losses.json"), "w") as f:
                json.dump(losses, f)

    if __name__ == "__main__":
        kill = json.loads(os.environ.get("KILL_RANK_AT", "null"))
        args = default_argument_parser().parse_args()
        launch(main, args.num_gpus, dist_url="auto", args=(args, kill))
""")


def _start(tmp_path, out, num_gpus, *opts, kill_rank_at=None):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_RANK_AT=json.dumps(kill_rank_at))
    args = [sys.executable, str(driver), "--num-gpus", str(num_gpus), "--config-file", str(TINY),
            "SEED", "7", "DATASETS.TEST", "()", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01",
            # Every anchor and proposal enters the losses: no per-process random subsampling.
            "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
            "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0", "OUTPUT_DIR", str(out), *map(str, opts)]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_total_batch(tmp_path):
    procs = {n: _start(tmp_path, tmp_path / f"np{n}", n, "SOLVER.MAX_ITER", 3) for n in (1, 2)}
    losses = {}
    for n, proc in procs.items():
        output, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, output[-4000:]
        losses[n] = json.loads((tmp_path / f"np{n}" / "losses.json").read_text())
    assert set(losses[1]) == set(losses[2]) and "loss_tsdf_final" in losses[1]
    for name in losses[1]:
        one, two = losses[1][name], losses[2][name]
        assert len(one) == len(two) == 3, name
        # GN everywhere, no flips, every sample in the loss: only the per-image vs per-batch
        # averaging of the RoI losses and float summation order differ.
        # (measured: identical at iteration 0, within 0.15 % at iterations 1 and 2).
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0.01, atol=1e-3, msg=name)
    # The runs train (the loss changes) and stay in step after two updates.
    assert losses[1]["total_loss"][2] != losses[1]["total_loss"][0]


@pytest.mark.slow
def test_a_dead_worker_stops_the_job_with_an_error_naming_it(tmp_path):
    start = time.time()
    proc = _start(tmp_path, tmp_path / "out", 2, "SOLVER.MAX_ITER", 50, kill_rank_at=[1, 2])
    output, _ = proc.communicate(timeout=300)  # a hang fails here
    seconds = time.time() - start
    assert proc.returncode != 0, output[-3000:]
    assert "process 1 terminated with exit code 3" in output, output[-3000:]
    assert not (tmp_path / "out" / "model_final.pth").exists()
    # Promptly: the survivor trains no further than the step it waits in for the lost worker, and
    # the job ends within two minutes, not at the hang limit above.
    metrics = tmp_path / "out" / "metrics.json"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert all(r["iteration"] <= 3 for r in rows), rows
    assert seconds < 120, seconds
