"""Sub-pixel polygons from the final TSDF (section 5: "if we apply marching squares to the final
TSDF instead, we could obtain sub-pixel accuracy for the boundaries")."""
from typing import List

import numpy as np
import torch

from detectron2.structures import Boxes, Instances
from levelset.polygons import zero_level_polygons

__all__ = ["tsdf_to_polygons", "add_polygons", "polygons_to_coco"]


def tsdf_to_polygons(tsdf: torch.Tensor, boxes: Boxes) -> List[List[np.ndarray]]:
    """
    Zero level set of each RoI's TSDF by marching squares, mapped into image coordinates.

    Pixel (i, j) of an S x S RoI grid has its centre at ``x0 + (j + 0.5) * w / S`` (the convention of
    RoIAlign and of Detectron2's mask pasting), so contours agree with the pasted ``pred_masks``
    (:func:`levelset.polygons.zero_level_polygons`).

    Args:
        tsdf: (R, 1, S, S) or (R, S, S), positive inside.
        boxes: R boxes (XYXY) in the image the polygons should live in.
    Returns:
        per RoI, a list of closed contours, each a float (K, 2) array of (x, y); holes are separate
        contours wound the other way round (``find_contours`` with positive_orientation="high").
    """
    tsdf = tsdf.reshape(len(tsdf), tsdf.shape[-2], tsdf.shape[-1]).detach().float().cpu().numpy()
    boxes = boxes.tensor.detach().float().cpu().numpy()
    return [zero_level_polygons(phi, box) for phi, box in zip(tsdf, boxes)]


def add_polygons(instances: Instances) -> Instances:
    """
    Set ``pred_polygons`` from ``pred_tsdf`` and ``pred_boxes`` (present when the model was built
    with ``MODEL.LEVELSET.RETURN_POLYGONS``). Call it on the outputs of the model / DefaultPredictor,
    whose boxes are already in the output image's coordinates.
    """
    if instances.has("pred_tsdf"):
        instances.pred_polygons = tsdf_to_polygons(instances.pred_tsdf, instances.pred_boxes)
    return instances


def polygons_to_coco(contours: List[np.ndarray]) -> List[List[float]]:
    """One RoI's contours as a COCO polygon list ``[[x0, y0, x1, y1, ...], ...]`` (>= 3 points)."""
    return [c.reshape(-1).round(2).tolist() for c in contours if len(c) >= 3]
