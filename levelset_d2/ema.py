"""An exponential moving average (EMA) of the weights during training (``SOLVER.EMA``).

Fine-tuning on a small set leaves a noisy final checkpoint: on the DELSE R-50 annotator, checkpoints 200
iterations apart differ by up to 1.2 mIoU (BENCHMARKS.md section 6). The EMA of the weights,

    W_ema(0) = W(start),    W_ema(t) = decay * W_ema(t - 1) + (1 - decay) * W(t),

averages that noise away at no cost to training (one in-place lerp per iteration). The average is
PyTorch's ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` over the parameters and the
buffers (batch-norm statistics averaged alike). It is saved in every checkpoint (``--resume`` continues it),
and at the end of training as ``model_final_ema.pth`` in OUTPUT_DIR, a weights file for ``MODEL.WEIGHTS``.
Evaluation during training (TEST.EVAL_PERIOD) reads the trained weights, not the average.
"""
import logging
import os

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase

from .checkpoint import save_weights

__all__ = ["EMAHook", "EMA_WEIGHTS_FILE"]

EMA_WEIGHTS_FILE = "model_final_ema.pth"
CHECKPOINT_KEY = "ema"  # the average's entry in each training checkpoint


class EMAHook(HookBase):
    """Keep an EMA of ``model``'s weights, updated after every iteration, saved with ``checkpointer``.

    Args:
        model: the trained model (DistributedDataParallel-wrapped or not); the average copies its module.
        decay: weight of the old average per iteration, in [0, 1); the average's half-life is
            ``log(0.5) / log(decay)`` iterations.
        checkpointer: the trainer's checkpointer; the average becomes one of its checkpointables, so each
            checkpoint carries it and a resume restores it. Register the hook (and so create it) before
            the trainer's ``resume_or_load``.
        output_dir: where ``model_final_ema.pth`` is written after the last iteration.

    The first update copies the model as it is then (the loaded MODEL.WEIGHTS after one step), so the
    copy made at construction (random weights before loading) never enters the average.
    """

    def __init__(self, model: torch.nn.Module, decay: float, checkpointer, output_dir: str):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in [0, 1), got {decay}")
        self._model = model.module if isinstance(model, DistributedDataParallel) else model
        self.decay = decay
        self.ema = AveragedModel(self._model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.ema.requires_grad_(False)
        checkpointer.checkpointables[CHECKPOINT_KEY] = self.ema
        self.output_dir = output_dir

    def before_train(self):
        left = self.decay ** max(0, self.trainer.max_iter - self.trainer.start_iter - 1)
        if left > 0.1:
            logging.getLogger(__name__).warning(
                f"SOLVER.EMA: after {self.trainer.max_iter - self.trainer.start_iter} iterations at decay {self.decay} "
                f"the average still weighs the first iteration's weights {left:.0%}: it is mostly the starting model "
                "(lower SOLVER.EMA.DECAY, train longer, or serve model_final.pth)")

    def after_step(self):
        self.ema.update_parameters(self._model)

    def after_train(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:  # stopped by an exception: no final weights
            return
        path = os.path.join(self.output_dir, EMA_WEIGHTS_FILE)
        save_weights(self.ema.module.state_dict(), path, iteration=self.trainer.iter,
                     ema_decay=self.decay, ema_updates=int(self.ema.n_averaged))
        logging.getLogger(__name__).info(f"Saved the EMA of the weights (decay {self.decay}) to {path}")
