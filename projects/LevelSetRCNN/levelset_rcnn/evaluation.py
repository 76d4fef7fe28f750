"""COCO AP with the optional sub-pixel polygons of LevelSet R-CNN's zero level set."""
from detectron2.evaluation import COCOEvaluator

from .postprocessing import add_polygons, polygons_to_coco

__all__ = ["LevelSetCOCOEvaluator"]


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
