"""What ``--resume`` needs beyond Detectron2's model, optimiser, scheduler and iteration, kept in
objects this layer owns (no Detectron2 private state is read):

- :class:`ResumableTrainingSampler`: Detectron2's ``TrainingSampler`` stream from a seed it keeps,
  started after the indices a previous run consumed; a checkpointable (``state_dict`` holds the seed).
- :class:`TrainLoader`: a train loader built by :func:`build_resumable_train_loader` together with
  that sampler, so the trainer can register and move it.
- :class:`RandomStates`: a checkpointable of the Python, NumPy, torch (and CUDA) random states.
"""
import itertools
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Sampler

import detectron2.utils.comm as comm
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler", "TrainLoader", "build_resumable_train_loader", "RandomStates",
           "rng_state", "set_rng_state"]


class ResumableTrainingSampler(Sampler):
    """The index stream of ``TrainingSampler(size, shuffle, seed)`` (infinite, reshuffled each epoch,
    sharded over the processes) without its first ``start`` indices.

    ``seed`` defaults to a seed shared by all processes, drawn as Detectron2's sampler draws it.
    A resume loads the saved seed (``load_state_dict``) and sets ``start`` to the number of indices
    this process consumed, so the resumed run reads the batches the uninterrupted one would have.
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: Optional[int] = None):
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.start = 0

    def __iter__(self):
        stream = TrainingSampler(self.size, shuffle=self.shuffle, seed=self.seed)
        return itertools.islice(iter(stream), self.start, None)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


class TrainLoader:
    """An infinite Detectron2 train loader and the :class:`ResumableTrainingSampler` feeding it."""

    def __init__(self, loader, sampler: ResumableTrainingSampler):
        self.loader = loader
        self.sampler = sampler

    def __iter__(self):
        return iter(self.loader)


def build_resumable_train_loader(dataset, *, mapper, total_batch_size: int, aspect_ratio_grouping: bool,
                                 num_workers: int) -> TrainLoader:
    """``build_detection_train_loader`` over the list ``dataset`` with a :class:`ResumableTrainingSampler`.

    The torch DataLoader gets a generator seeded from the sampler's seed: without one it would draw
    its workers' base seed from the global torch RNG when its iterator starts, which would shift a
    resumed run's random stream. DataLoader workers (``num_workers > 0``) restart their random
    streams from that seed after a resume.
    """
    sampler = ResumableTrainingSampler(len(dataset))
    loader = build_detection_train_loader(
        dataset, mapper=mapper, sampler=sampler, total_batch_size=total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers, seed=sampler.seed,
    )
    return TrainLoader(loader, sampler)


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) random states, as types ``torch.load(weights_only=True)`` reads."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`. CUDA states are set only where there are as many devices."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


class RandomStates:
    """Checkpointable random states. Restored in a one-process run only: with several processes each
    keeps its ``SEED + rank`` seeding (the checkpoint holds rank 0's states)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        if comm.get_world_size() == 1:
            set_rng_state(state)
