"""SOLVER.AMP.ENABLED on the CPU (Detectron2's AMPTrainer is CUDA-only): the training forward runs under
bfloat16 autocast, the weights, the optimiser and the checkpoint stay float32.

Expected values come from the dtypes PyTorch reports, not from the code under test: every Conv2d of
the model outputs bfloat16 in an AMP step and float32 in a plain one; the checkpoint holds the keys of
a model built without AMP, in float32.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _configs import shared_cfg as _cfg

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"
DELSE_DEMO = REPO / "configs" / "DELSE" / "demo_delse_synthetic.yaml"
TRAIN_OPTS = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", [], "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3,
              "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100000, "SEED", 0,
              "DATALOADER.NUM_WORKERS", 0]




def _train_recording_conv_dtypes(cfg):
    from levelset_d2.engine import Trainer

    trainer = Trainer(cfg)
    dtypes = []
    for module in trainer.model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, dtypes


@pytest.mark.parametrize("config, opts", [
    (TINY, []),
    (DELSE_DEMO, ["MODEL.DELSE.PRETRAIN_ITERS", 1]),  # both phases: pre-training, then joint
], ids=["levelset_rcnn", "delse"])
def test_cpu_amp_runs_the_training_forward_in_bfloat16(tmp_path, config, opts):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from levelset_d2.engine import AutocastForward

    cfg = _cfg(config, *TRAIN_OPTS, "SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", str(tmp_path / "amp"), *opts)
    trainer, dtypes = _train_recording_conv_dtypes(cfg)
    assert isinstance(trainer.step_trainer, SimpleTrainer) and isinstance(trainer.step_trainer.model, AutocastForward)
    assert not isinstance(trainer.model, AutocastForward)  # hooks, evaluation and checkpoints see the model
    assert dtypes and set(dtypes) == {torch.bfloat16}
    losses = {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items() if k == "total_loss"}
    assert len(losses["total_loss"]) == 3 and np.isfinite(losses["total_loss"]).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())

    saved = torch.load(tmp_path / "amp" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    plain = build_model(cfg).state_dict()
    assert set(saved) == set(plain)
    assert all(v.dtype == plain[k].dtype for k, v in saved.items())
    DetectionCheckpointer(build_model(cfg)).load(str(tmp_path / "amp" / "model_final.pth"))

    # The control: the same run without AMP convolves in float32.
    cfg32 = _cfg(config, *TRAIN_OPTS, "OUTPUT_DIR", str(tmp_path / "fp32"), *opts)
    _, dtypes32 = _train_recording_conv_dtypes(cfg32)
    assert dtypes32 and set(dtypes32) == {torch.float32}
