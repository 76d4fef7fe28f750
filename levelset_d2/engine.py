"""The training entry point shared by every project: a trainer with ``DefaultTrainer``'s interface,
built from Detectron2's public parts (see :class:`Trainer`), whose data loaders, evaluators and
test-time augmentation are looked up by ``MODEL.META_ARCHITECTURE``.

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
from fvcore.nn.precise_bn import get_bn_modules

import detectron2.utils.comm as comm
from detectron2.engine import (AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model,
                               default_setup, default_writers, hooks)
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format, verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeDetectionCheckpointer
from .config import check_registered_names, get_cfg
from .datasets import prepare_dataset
from .ema import EMAHook
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


# The key of the step trainer's state (optimiser, AMP scaler) in the trainer's checkpoint: DefaultTrainer's
# checkpoint layout, so checkpoints written by DefaultTrainer (and by this Trainer before it stopped
# deriving from it) resume here and the other way round.
STEP_TRAINER_STATE = "_trainer"


class AutocastForward(torch.nn.Module):
    """The training forward of ``module`` under ``torch.autocast(device_type, dtype)``; the backward and
    the optimiser step run outside it, as in Detectron2's ``AMPTrainer``.

    SOLVER.AMP.ENABLED on the CPU: ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler), while
    CPUs with bfloat16 dot products (AVX512-BF16, AMX) run a ResNet-50 training step about twice as
    fast under bfloat16 autocast (BENCHMARKS §10). bfloat16 has float32's exponent range, so no
    gradient scaler is needed; the weights, the optimiser and the level-set evolution (the core
    disables autocast) stay in float32.
    """

    def __init__(self, module: torch.nn.Module, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


class Trainer(TrainerBase):
    """The training loop of ``train_net.py``: Detectron2's ``TrainerBase`` composed from its public
    parts, with the registered loaders and evaluators, atomic checkpoints, the DDP wrapper's
    arguments of :func:`ddp_kwargs`, and resumes that continue the data stream and the random states.

    Not a ``DefaultTrainer`` subclass: ``DefaultTrainer.__init__`` wraps the model with
    ``create_ddp_model(model, broadcast_buffers=False)``, which passes ``device_ids=[local rank]``:
    DistributedDataParallel rejects that for a CPU model (``train_net.py --num-gpus N`` on CPU), and
    DELSE needs ``find_unused_parameters``. Detectron2's answer when DefaultTrainer's assumptions do
    not hold is a ``TrainerBase`` with its own ``run_step``; this one runs each iteration with a
    ``SimpleTrainer`` (with SOLVER.AMP.ENABLED: ``AMPTrainer`` on CUDA, a bfloat16-autocast forward on
    the CPU, :class:`AutocastForward`), takes the model, optimiser and
    scheduler from DefaultTrainer's public builders, and keeps DefaultTrainer's interface
    (``build_*``, ``test``, ``resume_or_load``, ``train``, ``model``, ``optimizer``, ``scheduler``,
    ``checkpointer``) and its checkpoint layout.

    Attributes: cfg, model, data_loader, optimizer, scheduler, checkpointer, start_iter, max_iter;
    ``step_trainer`` (the SimpleTrainer or AMPTrainer that runs one iteration), ``train_sampler``
    (the resumable sampler, or None), ``last_eval_results`` (of the last EvalHook run, or None).
    """

    def __init__(self, cfg):
        super().__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(model, **ddp_kwargs(cfg, model))
        if cfg.SOLVER.AMP.ENABLED and on_cpu:
            self.step_trainer = SimpleTrainer(AutocastForward(model), data_loader, optimizer)
        else:
            self.step_trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.last_eval_results = None
        # Besides the model and this trainer (iteration, hooks, optimiser): the training sampler (its
        # seed) and the random states. The checkpointer saves atomically and runs no code on load.
        self.train_sampler = data_loader.sampler if isinstance(data_loader, TrainLoader) else None
        resume_state = {"rng": RandomStates()}
        if self.train_sampler is not None:
            resume_state["train_sampler"] = self.train_sampler
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                      **resume_state)
        self.register_hooks(self.build_hooks())

    # The step trainer's model, loader and optimiser, as DefaultTrainer exposes them.
    @property
    def model(self):
        """The (DDP-wrapped) model, without the CPU autocast wrapper of the training forward."""
        model = self.step_trainer.model
        return model.module if isinstance(model, AutocastForward) else model

    @model.setter
    def model(self, value):
        if isinstance(self.step_trainer.model, AutocastForward):
            self.step_trainer.model.module = value
        else:
            self.step_trainer.model = value

    @property
    def data_loader(self):
        return self.step_trainer.data_loader

    @property
    def optimizer(self):
        return self.step_trainer.optimizer

    def run_step(self):
        self.step_trainer.iter = self.iter
        self.step_trainer.run_step()

    def state_dict(self):
        state = super().state_dict()
        state[STEP_TRAINER_STATE] = self.step_trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.step_trainer.load_state_dict(state_dict[STEP_TRAINER_STATE])

    def build_hooks(self):
        """Detectron2's default hooks: timing, LR scheduling, precise BN, the weights' moving average
        with SOLVER.EMA.ENABLED (:class:`~levelset_d2.ema.EMAHook`) and checkpoints (main process),
        evaluation every TEST.EVAL_PERIOD and at the end, metrics writers (main process)."""
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # PreciseBN's loader: less memory and start-up time
        precise_bn = cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model)
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                            cfg.TEST.PRECISE_BN.NUM_ITER) if precise_bn else None,
        ]
        if comm.is_main_process():
            if cfg.SOLVER.EMA.ENABLED:  # before the checkpointer: a checkpoint holds the average of its iteration
                ret.append(EMAHook(self.model, cfg.SOLVER.EMA.DECAY, self.checkpointer, cfg.OUTPUT_DIR))
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self.last_eval_results = self.test(self.cfg, self.model)
            return self.last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret

    def build_writers(self):
        """Detectron2's default metrics writers (console, metrics.json, TensorBoard)."""
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def train(self):
        """Train from ``start_iter`` to ``max_iter``; the last evaluation's results (checked against
        TEST.EXPECTED_RESULTS where given)."""
        super().train(self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert self.last_eval_results is not None, "No evaluation results obtained during training!"
            verify_results(self.cfg, self.last_eval_results)
        return self.last_eval_results

    def resume_or_load(self, resume=True):
        """Detectron2's resume: with ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, the model,
        optimiser, scheduler, AMP scaler and iteration of that checkpoint; else the weights of
        MODEL.WEIGHTS and iteration 0. After a resume:

        - the training sampler gets its saved seed back and skips the ``start_iter * IMS_PER_BATCH /
          world size`` indices the interrupted run consumed, so the resumed run sees the batches the
          uninterrupted one would have seen (exactly so without aspect-ratio grouping or when all
          images fall in one aspect-ratio group; else the samples waiting in a group are skipped);
        - one process: the Python, NumPy, torch and CUDA random states are those at the save, so
          augmentation, RoI sampling and any other random draw continue the same streams. With
          several processes each keeps its ``SEED + rank`` seeding (only rank 0's state is saved).
          DataLoader workers (DATALOADER.NUM_WORKERS > 0) restart their random streams.
        """
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
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
    def build_model(cls, cfg):
        return DefaultTrainer.build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return DefaultTrainer.build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return DefaultTrainer.build_lr_scheduler(cfg, optimizer)

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
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on each of DATASETS.TEST with this class's loader and evaluator (or
        ``evaluators``, one per test set); as ``DefaultTrainer.test``, the results by test set, or
        the one test set's results."""
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} test sets")
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            evaluator = evaluators[i] if evaluators is not None else cls.build_evaluator(cfg, name)
            results[name] = inference_on_dataset(model, cls.build_test_loader(cfg, name), evaluator)
            if comm.is_main_process():
                logging.getLogger("detectron2").info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        return next(iter(results.values())) if len(results) == 1 else results

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
