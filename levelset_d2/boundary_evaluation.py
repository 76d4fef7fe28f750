"""Boundary metrics beside COCO AP: AF1 / AF2 (LevelSet R-CNN, ECCV 2020, Sec. 5 and Table 5) and
Boundary AP (Cheng et al., CVPR 2021). The metrics themselves are :mod:`levelset.metrics`; this
module is only the Detectron2 glue.

Use it with ``DatasetEvaluators([COCOEvaluator(name, ...), BoundaryEvaluator(name, ...)])``.
"""
import contextlib
import copy
import io
import itertools
import logging
import os
from typing import Dict, List, Optional

import torch
from pycocotools.coco import COCO

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from levelset.metrics import af_scores, boundary_ap

__all__ = ["BoundaryEvaluator"]


class BoundaryEvaluator(DatasetEvaluator):
    """
    Boundary quality of predicted instance masks on a COCO-format dataset.

    * ``AF1``, ``AF2``: the boundary F1 of true-positive masks at 1 and 2 px tolerance, averaged
      over IoU thresholds 0.50:0.05:0.95 and classes (:func:`levelset.metrics.af_scores`).
    * ``BoundaryAP``, ``BoundaryAP50``, ``BoundaryAP75``: COCO AP with IoU = min(mask IoU,
      Boundary IoU), bands of 2 % of the image diagonal (:func:`levelset.metrics.boundary_ap`).

    All in percent, like Detectron2's AP. Ground truth is the dataset's ``json_file`` (or, for a
    dataset that is not COCO json, its conversion to COCO written under ``output_dir``, as
    COCOEvaluator does). Predictions are gathered to the main process, which alone returns results.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None,
                 max_dets_per_image: int = 100, *, distributed: bool = True,
                 dilation_ratio: float = 0.02):
        """
        Args:
            dataset_name: a dataset registered in Detectron2's DatasetCatalog / MetadataCatalog.
            output_dir: where to write the COCO conversion of a non-COCO dataset (required then).
            max_dets_per_image: detections kept per image and category by score (COCOeval's cut).
            distributed: gather predictions from all workers (True) or evaluate this one's only.
            dilation_ratio: Boundary IoU band width, as a fraction of the image diagonal.
        """
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._max_dets_per_image = max_dets_per_image
        self._distributed = distributed
        self._dilation_ratio = dilation_ratio
        self._cpu_device = torch.device("cpu")

        self._metadata = MetadataCatalog.get(dataset_name)
        if not hasattr(self._metadata, "json_file"):
            if output_dir is None:
                raise ValueError(f"output_dir is needed to convert '{dataset_name}' to COCO format")
            cache_path = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
            self._metadata.json_file = cache_path
            convert_to_coco_json(dataset_name, cache_path)
        json_file = PathManager.get_local_path(self._metadata.json_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_api = COCO(json_file)
        self.reset()

    def reset(self):
        self._predictions: List[Dict] = []  # COCO result dicts, contiguous category ids

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs: dicts with ``"image_id"``.
            outputs: the model's outputs: dicts with ``"instances"`` carrying ``pred_masks``
                (N, H, W), ``scores`` (N,), ``pred_classes`` (N,) and ``pred_boxes``.
        """
        for input, output in zip(inputs, outputs):
            if "instances" not in output:
                continue
            instances = output["instances"].to(self._cpu_device)
            if instances.has("pred_masks"):
                self._predictions.extend(instances_to_coco_json(instances, input["image_id"]))

    def evaluate(self):
        """
        Returns:
            ``{"boundary": {"AF1", "AF2", "BoundaryAP", "BoundaryAP50", "BoundaryAP75"}}`` in
            percent on the main process; ``{}`` on the others, or without predictions or GT.
        """
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if len(predictions) == 0:
            self._logger.warning("[BoundaryEvaluator] Did not receive valid predictions.")
            return {}
        if "annotations" not in self._coco_api.dataset:
            self._logger.info("[BoundaryEvaluator] No annotations: nothing to evaluate.")
            return {}

        results = self._to_dataset_category_ids(copy.deepcopy(predictions))
        af = af_scores(self._coco_api, results, max_dets=self._max_dets_per_image)
        ap = boundary_ap(self._coco_api, results, dilation_ratio=self._dilation_ratio,
                         max_dets=self._max_dets_per_image)
        metrics = {
            "AF1": 100 * af["AF1"],
            "AF2": 100 * af["AF2"],
            "BoundaryAP": 100 * ap["AP"],
            "BoundaryAP50": 100 * ap["AP50"],
            "BoundaryAP75": 100 * ap["AP75"],
        }
        self._logger.info("Boundary metrics:\n" + create_small_table(metrics))
        return {"boundary": metrics}

    def _to_dataset_category_ids(self, results: List[Dict]) -> List[Dict]:
        """Map contiguous class ids back to the json's category ids, as COCOEvaluator does."""
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping:
            reverse = {v: k for k, v in mapping.items()}
            for result in results:
                result["category_id"] = reverse[result["category_id"]]
        return results
