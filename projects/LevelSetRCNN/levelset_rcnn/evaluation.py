"""Evaluators: COCO AP with the optional sub-pixel polygons, and LVIS AP* on lvis-api 0.5.3."""
import types

import numpy as np

from detectron2.evaluation import COCOEvaluator

from .postprocessing import add_polygons, polygons_to_coco

__all__ = ["LevelSetCOCOEvaluator", "patch_lvis_numpy"]


class LevelSetCOCOEvaluator(COCOEvaluator):
    """
    Detectron2's COCOEvaluator (AP from the pasted ``pred_masks``, i.e. the RLE of H_eps(phi_N) >= 0.5).
    When the model returns ``pred_tsdf`` (``MODEL.LEVELSET.RETURN_POLYGONS``), each result of
    ``coco_instances_results.json`` also carries ``"polygons"``: the sub-pixel zero level set in
    COCO polygon format (holes are contours of their own, so AP keeps using the RLE).
    """

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction, output in zip(self._predictions[start:], outputs):
            if "instances" not in output or not output["instances"].has("pred_tsdf"):
                continue
            instances = add_polygons(output["instances"].to(self._cpu_device))
            for result, contours in zip(prediction["instances"], instances.pred_polygons):
                result["polygons"] = polygons_to_coco(contours)


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
