"""The training entry point shared by every project: Detectron2's ``DefaultTrainer`` with data
loaders and evaluators looked up by ``MODEL.META_ARCHITECTURE``.

A project that trains a meta-architecture of its own (DELSE: one crop per instance, its own
metrics) registers its builders with :func:`register_meta_architecture` when it is imported. Any
other architecture (Mask R-CNN and LevelSet R-CNN are ``GeneralizedRCNN``) gets the detection path:
the robust loaders (bad samples skipped with a warning) and the COCO / LVIS / Cityscapes
evaluators with the boundary metrics.
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
from .robust_data import build_robust_test_loader, build_robust_train_loader

__all__ = ["Trainer", "register_meta_architecture", "ArchitectureHooks", "setup", "main"]


@dataclass(frozen=True)
class ArchitectureHooks:
    """Builders of one meta-architecture; ``None`` keeps the detection path's.

    build_train_loader(cfg); build_test_loader(cfg, dataset_name);
    build_evaluator(cfg, dataset_name, output_folder) -> DatasetEvaluator.
    """

    build_train_loader: Optional[Callable] = None
    build_test_loader: Optional[Callable] = None
    build_evaluator: Optional[Callable] = None


_ARCHITECTURES: Dict[str, ArchitectureHooks] = {}


def register_meta_architecture(name: str, **builders) -> None:
    """Use these builders (fields of :class:`ArchitectureHooks`) for ``MODEL.META_ARCHITECTURE == name``."""
    _ARCHITECTURES[name] = ArchitectureHooks(**builders)


def _hooks(cfg) -> ArchitectureHooks:
    return _ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE, ArchitectureHooks())


class Trainer(DefaultTrainer):
    """DefaultTrainer with the registered loaders and evaluators, atomic checkpoints, and CPU
    models wrapped in DDP without ``device_ids``."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except for the DDP wrapper: Detectron2 passes
        # device_ids=[local_rank], which DistributedDataParallel rejects for a CPU model.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        on_cpu = next(model.parameters()).device.type == "cpu"
        ddp_kwargs = {"device_ids": None} if on_cpu else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Atomic saves (a kill mid-save keeps the previous checkpoint) and no code execution on load.
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
