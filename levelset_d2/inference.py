"""The model input ``DefaultPredictor`` builds, for tools that call a model's parts themselves."""
import numpy as np
import torch

from detectron2.data import transforms as T

__all__ = ["test_time_input"]


def test_time_input(cfg, image: np.ndarray):
    """
    One image as Detectron2's ``DefaultPredictor`` feeds it to a model: resized by
    ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, as a float (3, h, w) tensor, with the
    original size as ``height`` / ``width`` (so ``detector_postprocess`` maps outputs back to it).

    Args:
        cfg: the model's config.
        image: (H, W, 3) uint8 in the model's input format (``cfg.INPUT.FORMAT``).
    Returns:
        (input dict for ``model([input])`` / ``model.preprocess_image([input])``, the resize transform,
        whose ``apply_box`` takes image XYXY boxes to the input's pixels).
    """
    transform = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(image)
    resized = transform.apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}, transform
