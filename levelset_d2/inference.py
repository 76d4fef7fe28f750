"""The model input ``DefaultPredictor`` builds, for tools that call a model's parts themselves, and a
model prepared for fast CPU inference (the Label Studio backends)."""
import numpy as np
import torch

from detectron2.data import transforms as T
from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["fold_frozen_batchnorm", "prepare_for_cpu_inference", "test_time_input"]


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


@torch.no_grad()
def fold_frozen_batchnorm(model: torch.nn.Module) -> int:
    """
    Fold every ``FrozenBatchNorm2d`` that follows a Detectron2 ``Conv2d`` (its ``norm``) into the conv's
    weight and bias, in place: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var +
    eps)``. The same function, one pass over each feature map less. Only for inference: the folded
    weights are no longer frozen-BN parameters (do not train or save a folded model as a checkpoint).

    Returns:
        the number of convs folded.
    """
    folded = 0
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, FrozenBatchNorm2d):
            bn = module.norm
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            shift = bn.bias - bn.running_mean * scale
            module.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = shift if module.bias is None else module.bias * scale + shift
            module.bias = torch.nn.Parameter(bias, requires_grad=False)
            module.norm = None
            folded += 1
    return folded


def prepare_for_cpu_inference(model: torch.nn.Module) -> torch.nn.Module:
    """
    A model in eval mode made faster on the CPU: frozen BatchNorm folded into the convs
    (:func:`fold_frozen_batchnorm`) and the weights in channels-last memory layout, which oneDNN's
    convolutions run faster (the R-50-FPN backbone ~20-25 % on 2 cores, BENCHMARKS.md, Label Studio
    latency). Outputs are unchanged up to float rounding. In place; returns the model.
    """
    model.eval()
    fold_frozen_batchnorm(model)
    return model.to(memory_format=torch.channels_last)
