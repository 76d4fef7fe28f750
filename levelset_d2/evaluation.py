"""Evaluators of detection models (COCO, LVIS AP*, Cityscapes) with the boundary metrics beside them."""
import logging
import types

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, CityscapesInstanceEvaluator, DatasetEvaluators, LVISEvaluator

from .datasets import prepare_dataset

__all__ = ["build_detection_evaluator", "patch_lvis_numpy"]


def build_detection_evaluator(cfg, dataset_name, output_folder, coco_evaluator=COCOEvaluator):
    """The evaluator of ``dataset_name``'s ``evaluator_type`` ("coco", "lvis", "cityscapes_instance"),
    plus :class:`~levelset_d2.boundary_evaluation.BoundaryEvaluator` (AF1, AF2, Boundary AP) when
    ``TEST.BOUNDARY_EVAL`` and the model predicts masks.

    Args:
        coco_evaluator: the class used for "coco" datasets (a project may export more per result).
    """
    prepare_dataset(dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
    evaluators = []
    if evaluator_type == "coco":
        evaluators.append(coco_evaluator(dataset_name, output_dir=output_folder, max_dets_per_image=max_dets))
    elif evaluator_type == "lvis":
        # "AP*" of LevelSet R-CNN: a COCO model on lvis_v0.5_val_cocofied (see the lvis_eval configs).
        patch_lvis_numpy()
        evaluators.append(LVISEvaluator(dataset_name, output_dir=output_folder, max_dets_per_image=max_dets))
    elif evaluator_type == "cityscapes_instance":
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    else:
        raise NotImplementedError(f"No evaluator for dataset {dataset_name} of type {evaluator_type!r}")
    # Boundary metrics on exhaustively annotated sets; not on LVIS, whose federated annotation
    # COCO-style matching would misread.
    if cfg.TEST.BOUNDARY_EVAL and cfg.MODEL.MASK_ON and evaluator_type != "lvis":
        try:
            from .boundary_evaluation import BoundaryEvaluator
        except ImportError as e:
            logging.getLogger(__name__).warning(f"Boundary metrics unavailable: {e}")
        else:
            evaluators.append(BoundaryEvaluator(dataset_name, output_dir=output_folder, max_dets_per_image=max_dets))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def patch_lvis_numpy() -> None:
    """
    lvis-api 0.5.3 (the release on PyPI) calls ``np.float``, removed in NumPy 1.24. Give its eval
    module a view of NumPy that still has it, without touching the global ``numpy`` module.
    """
    import lvis.eval

    if getattr(lvis.eval.np, "float", None) is float:
        return
    compat = types.ModuleType("numpy")
    compat.__getattr__ = lambda name: getattr(np, name)  # PEP 562: everything else is numpy's
    compat.float = float
    lvis.eval.np = compat
