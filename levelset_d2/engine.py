"""The training entry point shared by every project: Detectron2's ``DefaultTrainer`` with data
loaders, evaluators and test-time augmentation looked up by ``MODEL.META_ARCHITECTURE``.

A project that trains a meta-architecture of its own (DELSE: one crop per instance, its own
metrics) registers its builders with :func:`register_meta_architecture` when it is imported. Any
other architecture (Mask R-CNN and LevelSet R-CNN are ``GeneralizedRCNN``) gets the detection path:
the robust loaders (bad samples skipped with a warning) and the COCO / LVIS / Cityscapes
evaluators with the boundary metrics.

``--resume`` continues an interrupted run as if it had not stopped (see :meth:`Trainer.resume_or_load`):
besides Detectron2's model, optimiser, scheduler and iteration, the checkpoint holds the random
states and the training sampler's seed (:mod:`levelset_d2.resume`), and the resumed loader skips
the samples already consumed.
"""
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import detectron2.utils.comm as comm
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeDetectionCheckpointer
from .config import check_registered_names, get_cfg
from .datasets import prepare_dataset
from .evaluation import build_detection_evaluator
from .resume import RandomStates, TrainLoader
from .robust_data import build_robust_test_loader, build_robust_train_loader

__all__ = ["Trainer", "register_meta_architecture", "ArchitectureHooks", "ddp_kwargs", "setup", "main"]


@dataclass(frozen=True)
class ArchitectureHooks:
    """Builders of one meta-architecture; ``None`` keeps the detection path's.

    build_train_loader(cfg); build_test_loader(cfg, dataset_name);
    build_evaluator(cfg, dataset_name, output_folder) -> DatasetEvaluator;
    build_tta_model(cfg, model) -> the model with test-time augmentation (default Detectron2's
    GeneralizedRCNNWithTTA).
    find_unused_parameters: for DDP, when some iterations leave trainable parameters out of the loss.
    """

    build_train_loader: Optional[Callable] = None
    build_test_loader: Optional[Callable] = None
    build_evaluator: Optional[Callable] = None
    build_tta_model: Optional[Callable] = None
    find_unused_parameters: bool = False


_ARCHITECTURES: Dict[str, ArchitectureHooks] = {}


def register_meta_architecture(name: str, **builders) -> None:
    """Use these builders and options (fields of :class:`ArchitectureHooks`) for
    ``MODEL.META_ARCHITECTURE == name``."""
    _ARCHITECTURES[name] = ArchitectureHooks(**builders)


def _hooks(cfg) -> ArchitectureHooks:
    return _ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE, ArchitectureHooks())


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
        # DefaultTrainer.__init__ wraps the model with create_ddp_model(model, broadcast_buffers=False),
        # which passes device_ids=[local rank]: DistributedDataParallel rejects that for a CPU model
        # (train_net.py --num-gpus N on CPU), and DELSE needs find_unused_parameters. Detectron2 has no
        # hook for the wrapper's arguments, so this builds the same parts with ddp_kwargs.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, **ddp_kwargs(cfg, model))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        # Besides Detectron2's checkpointables: the training sampler (its seed) and the random states.
        # The checkpointer saves atomically and runs no code on load.
        self.train_sampler = data_loader.sampler if isinstance(data_loader, TrainLoader) else None
        resume_state = {"rng": RandomStates()}
        if self.train_sampler is not None:
            resume_state["train_sampler"] = self.train_sampler
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                      **resume_state)
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """Detectron2's resume (model, optimiser, scheduler, AMP scaler, iteration), and then:

        - the training sampler gets its saved seed back and skips the ``start_iter * IMS_PER_BATCH /
          world size`` indices the interrupted run consumed, so the resumed run sees the batches the
          uninterrupted one would have seen (exactly so without aspect-ratio grouping or when all
          images fall in one aspect-ratio group; else the samples waiting in a group are skipped);
        - one process: the Python, NumPy, torch and CUDA random states are those at the save, so
          augmentation, RoI sampling and any other random draw continue the same streams. With
          several processes each keeps its ``SEED + rank`` seeding (only rank 0's state is saved).
          DataLoader workers (DATALOADER.NUM_WORKERS > 0) restart their random streams.
        """
        super().resume_or_load(resume=resume)
        if self.start_iter == 0:  # a fresh run (or no checkpoint to resume from)
            return
        logger = logging.getLogger("detectron2")
        if self.train_sampler is None:
            logger.warning("Resume: the train loader has no resumable sampler; its data stream restarts")
            return
        self.train_sampler.start = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
        logger.info(f"Resume: the train loader skips the {self.train_sampler.start} samples consumed before "
                    f"iteration {self.start_iter}")

    @classmethod
    def build_train_loader(cls, cfg):
        """The architecture's loader (a :class:`~levelset_d2.resume.TrainLoader`, so resumes continue
        its stream), by default the robust detection loader (bad samples skipped with a warning, or
        raised with DATALOADER.STRICT)."""
        build = _hooks(cfg).build_train_loader
        if build is not None:
            return build(cfg)
        for name in cfg.DATASETS.TRAIN:
            prepare_dataset(name)
        return build_robust_train_loader(cfg)

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
        """Multi-scale + flip inference (cfg.TEST.AUG; LevelSet R-CNN Table 1 "MS+F") with the
        architecture's TTA model (default Detectron2's, which averages the RoI masks, i.e.
        H_eps(phi_N), over the augmentations before pasting)."""
        logging.getLogger("detectron2").info("Running inference with test-time augmentation ...")
        model = (_hooks(cfg).build_tta_model or GeneralizedRCNNWithTTA)(cfg, model)
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
