"""The training entry point shared by every project: Detectron2's ``DefaultTrainer`` with data
loaders and evaluators looked up by ``MODEL.META_ARCHITECTURE``.

A project that trains a meta-architecture of its own (DELSE: one crop per instance, its own
metrics) registers its builders with :func:`register_meta_architecture` when it is imported. Any
other architecture (Mask R-CNN and LevelSet R-CNN are ``GeneralizedRCNN``) gets the detection path:
the robust loaders (bad samples skipped with a warning) and the COCO / LVIS / Cityscapes
evaluators with the boundary metrics.

``--resume`` continues an interrupted run as if it had not stopped (see :meth:`Trainer.resume_or_load`):
besides Detectron2's model, optimiser, scheduler and iteration, the checkpoint holds the random
states and the training sampler's seed, and the resumed loader skips the samples already consumed.
"""
import itertools
import logging
import os
import random
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

import detectron2.utils.comm as comm
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup, hooks
from detectron2.data.common import ToIterableDataset
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeDetectionCheckpointer
from .config import check_registered_names, get_cfg
from .datasets import prepare_dataset
from .evaluation import build_detection_evaluator
from .robust_data import build_robust_test_loader, build_robust_train_loader

__all__ = ["Trainer", "register_meta_architecture", "ArchitectureHooks", "ddp_kwargs", "setup", "main"]


@dataclass(frozen=True)
class ArchitectureHooks:
    """Builders of one meta-architecture; ``None`` keeps the detection path's.

    build_train_loader(cfg); build_test_loader(cfg, dataset_name);
    build_evaluator(cfg, dataset_name, output_folder) -> DatasetEvaluator.
    find_unused_parameters: for DDP, when some iterations leave trainable parameters out of the loss.
    """

    build_train_loader: Optional[Callable] = None
    build_test_loader: Optional[Callable] = None
    build_evaluator: Optional[Callable] = None
    find_unused_parameters: bool = False


_ARCHITECTURES: Dict[str, ArchitectureHooks] = {}


def register_meta_architecture(name: str, **builders) -> None:
    """Use these builders and options (fields of :class:`ArchitectureHooks`) for
    ``MODEL.META_ARCHITECTURE == name``."""
    _ARCHITECTURES[name] = ArchitectureHooks(**builders)


def _hooks(cfg) -> ArchitectureHooks:
    return _ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE, ArchitectureHooks())


# ------------------------------------------------------------------------------- resume
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


class SkipSampler(Sampler):
    """The index stream of ``sampler`` without its first ``skip`` indices: a resumed run goes on
    where the interrupted one stopped, instead of restarting Detectron2's infinite stream."""

    def __init__(self, sampler, skip: int):
        self.sampler = sampler
        self.skip = int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _loader_parts(loader):
    """The ``ToIterableDataset`` (which holds the sampler) and the torch ``DataLoader`` inside a
    Detectron2 train loader (DataLoader, AspectRatioGroupedDataset or MapDataset around them); None
    for parts not found (a custom loader)."""
    holder = torch_loader = None
    obj = loader
    for _ in range(8):
        if isinstance(obj, DataLoader) and torch_loader is None:
            torch_loader = obj
        if isinstance(obj, ToIterableDataset):
            holder = obj
            break
        obj = obj.__dict__.get("dataset", obj.__dict__.get("_dataset")) if hasattr(obj, "__dict__") else None
        if obj is None:
            break
    return holder, torch_loader


def ddp_kwargs(cfg, model) -> dict:
    """Arguments of the DistributedDataParallel wrapper of ``model`` in a multi-process run: its
    process's GPU on CUDA, none on CPU (DDP rejects device_ids for a CPU model), and unused-parameter
    detection where the architecture asks for it."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return {"device_ids": None if on_cpu else [comm.get_local_rank()], "broadcast_buffers": False,
            "find_unused_parameters": _hooks(cfg).find_unused_parameters}


class Trainer(DefaultTrainer):
    """DefaultTrainer with the registered loaders and evaluators, atomic checkpoints, CPU models
    wrapped in DDP without ``device_ids``, and resumes that continue the data stream and the
    random states."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except for the DDP wrapper (ddp_kwargs) and the checkpointer.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, **ddp_kwargs(cfg, model))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Atomic saves (a kill mid-save keeps the previous checkpoint) and no code execution on load.
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._sampler_holder, self._torch_loader = _loader_parts(data_loader)
        self._seed_loader_generator(0)
        self._resume_state = None
        self.register_hooks(self.build_hooks())

    # The checkpoint's "trainer" entry: Detectron2's (iteration, optimiser, scheduler, AMP scaler)
    # plus what a resume needs to see the same data and random draws.
    def state_dict(self):
        ret = super().state_dict()
        sampler = self._sampler()
        if sampler is not None and hasattr(sampler, "_seed"):
            ret["sampler_seed"] = int(sampler._seed)
        ret["rng"] = rng_state()  # rank 0's; see resume_or_load
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._resume_state = {k: state_dict[k] for k in ("sampler_seed", "rng") if k in state_dict}

    def _sampler(self):
        if self._sampler_holder is None:
            return None
        sampler = self._sampler_holder.sampler
        return sampler.sampler if isinstance(sampler, SkipSampler) else sampler

    def _seed_loader_generator(self, start_iter):
        # The DataLoader draws its workers' base seed when its iterator starts, from the global torch
        # RNG unless it has a generator: that draw would shift a resumed run's torch random stream.
        # Seeded from the sampler's seed (and, after a resume, the iteration: new worker streams).
        if self._torch_loader is None or (start_iter == 0 and self._torch_loader.generator is not None):
            return
        seed = int(getattr(self._sampler(), "_seed", 0)) + start_iter
        self._torch_loader.generator = torch.Generator().manual_seed(seed)

    def resume_or_load(self, resume=True):
        """Detectron2's resume (model, optimiser, scheduler, AMP scaler, iteration), and then:

        - the training sampler gets its saved seed back and skips the ``start_iter * IMS_PER_BATCH /
          world size`` indices the interrupted run consumed, so the resumed run sees the batches the
          uninterrupted one would have seen (exactly so without aspect-ratio grouping or when all
          images fall in one aspect-ratio group; else the samples waiting in a group are skipped);
        - one process: the Python, NumPy, torch and CUDA random states are those at the save, so
          augmentation, RoI sampling and any other random draw continue the same streams. With
          several processes each keeps its ``SEED + rank`` seeding (only rank 0's state is saved).
          DataLoader workers (DATALOADER.NUM_WORKERS > 0) start new random streams.
        """
        self._resume_state = None
        super().resume_or_load(resume=resume)
        state, self._resume_state = self._resume_state, None
        if state is None:  # a fresh run (or no checkpoint to resume from)
            return
        logger = logging.getLogger("detectron2")
        if self._sampler_holder is None:
            logger.warning("Resume: no Detectron2 sampler found in the train loader; its data stream restarts")
        else:
            sampler = self._sampler()
            if "sampler_seed" in state and hasattr(sampler, "_seed"):
                sampler._seed = state["sampler_seed"]
            consumed = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
            self._sampler_holder.sampler = SkipSampler(sampler, consumed)
            self._seed_loader_generator(self.start_iter)
            logger.info(f"Resume: the train loader skips the {consumed} samples consumed before iteration "
                        f"{self.start_iter}")
        if "rng" in state and comm.get_world_size() == 1:
            set_rng_state(state["rng"])

    @classmethod
    def build_train_loader(cls, cfg):
        build = _hooks(cfg).build_train_loader
        if build is not None:
            return build(cfg)
        for name in cfg.DATASETS.TRAIN:
            prepare_dataset(name)
        return build_robust_train_loader(cfg)  # bad samples: skipped with a warning, or DATALOADER.STRICT

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        build = _hooks(cfg).build_test_loader
        if build is not None:
            return build(cfg, dataset_name)
        prepare_dataset(dataset_name)
        return build_robust_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        build = _hooks(cfg).build_evaluator or build_detection_evaluator
        return build(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Multi-scale + flip inference (cfg.TEST.AUG; LevelSet R-CNN Table 1 "MS+F"). Detectron2's
        TTA averages the RoI masks, i.e. H_eps(phi_N), over the augmentations before pasting."""
        logging.getLogger("detectron2").info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def setup(args):
    """The config of ``train_net.py``'s arguments: every installed project's keys, the file, the overrides."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # the configs default to CUDA; run where we are
    cfg.freeze()
    check_registered_names(cfg)  # a typo in a head's name fails here, naming the key
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="levelset_d2")
    return cfg


def main(args):
    """Train (``--resume`` continues from the last checkpoint) or, with ``--eval-only``, evaluate."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()
