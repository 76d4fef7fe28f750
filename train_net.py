#!/usr/bin/env python
"""
Train and evaluate LevelSet R-CNN (and Mask R-CNN baselines, and DELSE) with Detectron2.

    python train_net.py --config-file configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>

``--num-gpus N`` on a machine without GPUs runs N CPU processes (gloo).
"""
import logging
import os
import weakref
from collections import OrderedDict

import torch

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    verify_results,
)
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils.logger import setup_logger

import levelset_rcnn
from levelset_rcnn.checkpoint import SafeDetectionCheckpointer
from levelset_rcnn.data import prepare_dataset
from levelset_rcnn.robust_data import build_robust_test_loader, build_robust_train_loader
from levelset_rcnn.evaluation import LevelSetCOCOEvaluator, patch_lvis_numpy


def _is_delse(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "DELSE"


class Trainer(DefaultTrainer):
    """DefaultTrainer that picks evaluators from the dataset's metadata, dispatches DELSE's data
    loaders, and wraps CPU models in DDP without ``device_ids``."""

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
        if _is_delse(cfg):
            from delse import build_delse_train_loader

            return build_delse_train_loader(cfg)
        for name in cfg.DATASETS.TRAIN:
            prepare_dataset(name)
        return build_robust_train_loader(cfg)  # bad samples: skipped with a warning, or DATALOADER.STRICT

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if _is_delse(cfg):
            from delse import build_delse_test_loader

            return build_delse_test_loader(cfg, dataset_name)
        prepare_dataset(dataset_name)
        return build_robust_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if _is_delse(cfg):
            from delse import DELSEEvaluator

            return DELSEEvaluator(dataset_name, cfg, output_folder)
        prepare_dataset(dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        evaluators = []
        if evaluator_type == "coco":
            evaluators.append(
                LevelSetCOCOEvaluator(
                    dataset_name,
                    output_dir=output_folder,
                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                )
            )
        elif evaluator_type == "lvis":
            # "AP*" of the paper: a COCO model on lvis_v0.5_val_cocofied (see the lvis_eval configs).
            patch_lvis_numpy()
            evaluators.append(
                LVISEvaluator(
                    dataset_name,
                    output_dir=output_folder,
                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                )
            )
        elif evaluator_type == "cityscapes_instance":
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
        else:
            raise NotImplementedError(
                f"No evaluator for dataset {dataset_name} of type {evaluator_type!r}"
            )
        # Boundary metrics (AF1, AF2, Boundary AP) on exhaustively annotated sets; not on LVIS,
        # whose federated annotation COCO-style matching would misread.
        if cfg.TEST.BOUNDARY_EVAL and cfg.MODEL.MASK_ON and evaluator_type != "lvis":
            try:
                from levelset_rcnn.boundary_evaluation import BoundaryEvaluator
            except ImportError as e:
                logging.getLogger(__name__).warning(f"Boundary metrics unavailable: {e}")
            else:
                evaluators.append(
                    BoundaryEvaluator(
                        dataset_name,
                        output_dir=output_folder,
                        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                    )
                )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Multi-scale + flip inference (cfg.TEST.AUG; paper Table 1 "MS+F"). Detectron2's TTA
        averages the RoI masks, i.e. H_eps(phi_N), over the augmentations before pasting."""
        logging.getLogger("detectron2").info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def setup(args):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # the configs default to CUDA; run where we are
    cfg.freeze()
    levelset_rcnn.config.check_registered_names(cfg)  # a typo in a head's name fails here, naming the key
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="levelset_rcnn")
    return cfg


def main(args):
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
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
