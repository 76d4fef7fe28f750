"""A trained LevelSet R-CNN's evolution, detection by detection: what the analysis tools share.

:func:`trace_evolution` runs a model on one image as ``DefaultPredictor`` does (resized to the test
size) and keeps what the mask branch read and every iterate phi_0 ... phi_N;
:func:`match_to_ground_truth` pairs its detections with annotated instances by box IoU. Used by
``tools/analysis/evolution.py`` (its ``detections``, ``frozen-phi0`` and ``figure`` commands).
"""
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from levelset_d2.inference import test_time_input

from .mask_head import split_hyperparameters
from .roi_heads import LevelSetROIHeads, pool_image_crops, with_image

__all__ = ["EvolutionTrace", "trace_evolution", "match_to_ground_truth"]


@dataclass
class EvolutionTrace:
    """One image's detections and their evolution (R detections).

    Attributes:
        instances: the detections; boxes in the resized input's pixels.
        pooled: (R, C, P, P) the mask pooler's RoI features.
        inputs: the mask head's other inputs (``image_crops``, ``fine_features``) when it reads them.
        image_crops: (R, 3, S, S) the RoIs' crops of the normalised input at the evolution's S x S,
            whether or not the head reads them (the frozen-phi_0 diagnostic's image variants do).
        phis: [phi_0, ..., phi_N], each (R, 1, S, S) in the head's [-1, 1] units (phi_0 upsampled to S).
        hyperparameters: {name: (R,) or (R, N)} the learned per-instance hyperparameters.
        scale: (4,) factors taking XYXY boxes from the resized input to the original image.
    """
    instances: Instances
    pooled: torch.Tensor
    inputs: Dict[str, torch.Tensor]
    image_crops: torch.Tensor
    phis: List[torch.Tensor]
    hyperparameters: Dict[str, torch.Tensor]
    scale: np.ndarray

    def boxes_in_image(self) -> Boxes:
        """The detections' boxes in the original image's pixels."""
        return Boxes(self.instances.pred_boxes.tensor.cpu() * torch.from_numpy(self.scale))


@torch.no_grad()
def trace_evolution(cfg, model, image: np.ndarray, score_thresh: float = 0.0) -> EvolutionTrace:
    """
    Run a LevelSet R-CNN (``LevelSetMaskHead``) on one image and keep its mask branch's inputs and iterates.

    Args:
        cfg: the model's config: the image is resized to its test size as ``DefaultPredictor`` does.
        model: a ``GeneralizedRCNN`` in eval mode (it is set to eval).
        image: (H, W, 3) uint8 in the model's input format (``cfg.INPUT.FORMAT``).
        score_thresh: detections below it are dropped before the mask branch is rerun.
    """
    model.eval()
    h, w = image.shape[:2]
    images = model.preprocess_image([test_time_input(cfg, image)[0]])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    heads = model.roi_heads
    det = heads(images, features, proposals, None)[0][0]
    det = det[det.scores >= score_thresh]
    boxes = [det.pred_boxes]
    if isinstance(heads, LevelSetROIHeads):
        x, inputs = heads.mask_head_inputs(with_image(features, images), boxes)
    else:  # Detectron2's StandardROIHeads (public attributes of its mask branch)
        x, inputs = heads.mask_pooler([features[f] for f in heads.mask_in_features], boxes), {}
    head = heads.mask_head
    out = head.layers(x, **inputs)
    phi0 = head.initial_phi(out["initial_tsdf_logits"], det.pred_classes)
    S = head.evolution_resolution
    return EvolutionTrace(
        instances=det, pooled=x, inputs=inputs,
        image_crops=inputs.get("image_crops", pool_image_crops(images.tensor, boxes, S)),
        phis=head.evolve(phi0, out, return_all=True),
        hyperparameters=split_hyperparameters(out["hyperparameters"], head.num_steps),
        scale=np.array([w / images.image_sizes[0][1], h / images.image_sizes[0][0]] * 2, dtype=np.float32),
    )


def match_to_ground_truth(boxes: Boxes, annotations: List[dict], min_iou: float = 0.5):
    """
    Each detection's best annotated instance by box IoU.

    Args:
        boxes: (R,) detection boxes in the image's pixels.
        annotations: Detectron2 dataset-dict annotations (crowd regions are skipped).
        min_iou: detections whose best box IoU is below it are unmatched.
    Returns:
        (matched, gt_index, iou, gt): matched (R,) bool; gt_index (R,) index into ``gt``; iou (R,) the
        best box IoU; gt the non-crowd annotations. All empty when there are no detections or no GT.
    """
    gt = [a for a in annotations if not a.get("iscrowd", 0)]
    if not gt or len(boxes) == 0:
        empty = torch.zeros(len(boxes))
        return empty.bool(), empty.long(), empty, gt
    gt_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt],
                                  dtype=torch.float32))
    iou, best = pairwise_iou(boxes, gt_boxes).max(dim=1)
    return iou >= min_iou, best, iou, gt
