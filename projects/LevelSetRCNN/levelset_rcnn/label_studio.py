"""Label Studio ML backend for LevelSet R-CNN: pre-annotation. Each task's image gets every
detected instance as a ``polygonlabels`` region: the zero level set of the instance's final TSDF
(sub-pixel, marching squares; :func:`levelset_rcnn.add_polygons`) with its class and score, for
Label Studio's "Retrieve predictions" on a whole project (or on each task as it is opened, with
the project's "Retrieve predictions when loading a task automatically"). An annotator then corrects the polygons (or clicks
objects the model missed with DELSE, ``delse-serve``).

The server (Flask app on waitress, basic auth, limits, image fetching) is the shared
:mod:`levelset_d2.label_studio_server`; this module is the model adapter and its command.

Bounded work per request: Label Studio 1.23 sends all selected tasks in one ``/predict`` request
and gives up after ``ML_TIMEOUT_PREDICT`` (100 s). A request with at most ``max_tasks`` tasks is
answered in full; a larger one gets a single empty result, on which Label Studio falls back to one
request per task (its path for backends without batch support, ``MLBackend._get_predictions_from_
ml_backend_one_by_one``), so each request does one image's work however large the project.

A polygon is the largest contour of an instance's zero level set (Label Studio polygons have no
holes; a second component of one instance is rare and dropped). Coordinates: the polygons are in
Detectron2's continuous image frame (pixel i spans [i, i + 1)), which is Label Studio's percent
frame times the image size, so ``percent = 100 * x / width`` with no half-pixel shift.

Run (see the README's "Pre-annotation with LevelSet R-CNN")::

    BASIC_AUTH_USER=ls BASIC_AUTH_PASS=... levelset-rcnn-serve \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml \\
        --weights output/levelset_rcnn_R_50_FPN_1x_coco/model_final.pth --port 9091
"""
import argparse
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from levelset_d2.label_studio_server import (
    BackendError,
    LabelStudioBackend,
    add_server_arguments,
    loader_from_args,
    model_version_of,
    read_label_config,
    serve,
)

from .postprocessing import add_polygons

__all__ = ["LevelSetRCNNBackend", "build_predictor", "instance_regions", "main", "outer_contour"]

logger = logging.getLogger(__name__)

MAX_TASKS = 8  # per request: at <= 3 s an image, well inside Label Studio's 100 s timeout


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def outer_contour(contours: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    """The largest-area contour of one instance (K, 2) without the repeated closing vertex, or
    None when no contour has 3 vertices."""
    best = None
    for c in contours:
        c = np.asarray(c, dtype=np.float64)
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]  # find_contours repeats the first vertex of a closed contour
        if len(c) >= 3 and (best is None or _area(c) > _area(best)):
            best = c
    return best


def instance_regions(instances, class_names: Sequence[str], from_name: str, to_name: str,
                     width: int, height: int) -> List[dict]:
    """Detectron2 ``Instances`` with ``pred_polygons`` -> Label Studio ``polygonlabels`` regions
    (percent coordinates, rounded to 1e-4), one per instance with a polygon, in the model's order."""
    regions = []
    for contours, cls, score in zip(instances.pred_polygons, instances.pred_classes.tolist(),
                                    instances.scores.tolist()):
        polygon = outer_contour(contours)
        if polygon is None:
            continue
        label = class_names[cls] if cls < len(class_names) else str(cls)
        points = polygon * [100.0 / width, 100.0 / height]
        regions.append({
            "id": uuid.uuid4().hex[:10],
            "from_name": from_name,
            "to_name": to_name,
            "type": "polygonlabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "score": float(score),
            "value": {"points": points.round(4).tolist(), "closed": True, "polygonlabels": [label]},
        })
    return regions


class LevelSetRCNNBackend(LabelStudioBackend):
    """LevelSet R-CNN behind Label Studio's prediction requests (``predict(body)`` -> dict).

    Args:
        predictor: a Detectron2 ``DefaultPredictor`` of a LevelSet R-CNN model built with
            ``MODEL.LEVELSET.RETURN_POLYGONS`` (see :func:`build_predictor`).
        class_names: the model's class index -> the PolygonLabels value it is sent as.
        max_tasks: most tasks predicted in one request (see the module docstring).
    """

    model_class = "LevelSetRCNN"

    def __init__(self, predictor, class_names: Sequence[str], model_version: str, loader=None, max_tasks=MAX_TASKS):
        super().__init__(model_version, loader)
        self.predictor = predictor
        self.class_names = list(class_names)
        self.max_tasks = max_tasks
        self.lock = threading.Lock()  # one model: one image at a time

    def check_label_config(self, xml):
        self._output(read_label_config(xml))

    @staticmethod
    def _output(config):
        """(Image name, PolygonLabels name, its label values) of the label config."""
        for image, controls in config.outputs.items():
            for name, kind, values in controls:
                if kind == "polygonlabels" and image in config.images:
                    return image, name, values
        raise BackendError(400, "label config has no <PolygonLabels> on an <Image value=\"$key\">: "
                                "LevelSet R-CNN pre-annotates polygons")

    def predict_tasks(self, tasks, context, label_config):
        config = read_label_config(label_config)
        output = self._output(config)
        if len(tasks) > self.max_tasks:
            logger.info(f"{len(tasks)} tasks in one request, more than {self.max_tasks}: one empty result, "
                        f"so that Label Studio asks for them one task per request")
            return [self._prediction([])]
        return [self._prediction(self._predict_task(task, config, *output)) for task in tasks]

    def _prediction(self, result):
        score = float(np.mean([r["score"] for r in result])) if result else 0.0
        return {"result": result, "score": score, "model_version": self.model_version}

    def _predict_task(self, task, config, image_name, control, values):
        image = self.loader.fetch(self.task_image_url(task, config, image_name))  # outside the lock
        height, width = image.shape[:2]
        t0 = time.perf_counter()
        with self.lock:
            instances = self.predictor(image)["instances"].to("cpu")
        if not instances.has("pred_tsdf"):
            raise BackendError(500, "the model returns no TSDF: serve a LevelSet R-CNN config "
                                    "(MODEL.ROI_MASK_HEAD.NAME LevelSetMaskHead)")
        regions = instance_regions(add_polygons(instances), self.class_names, control, image_name, width, height)
        if values:  # only the labels the project has
            unknown = {r["value"]["polygonlabels"][0] for r in regions} - set(values)
            if unknown:
                logger.warning(f"classes {sorted(unknown)} are no PolygonLabels value of {control!r}: dropped")
            regions = [r for r in regions if r["value"]["polygonlabels"][0] in values]
        logger.info(f"task {task.get('id')}: {len(regions)} instance(s) in {time.perf_counter() - t0:.3f} s")
        return regions


def build_predictor(config_file, weights, device="auto", opts=(), fast_cpu=True):
    """(DefaultPredictor returning ``pred_tsdf``, class names) for a LevelSet R-CNN config. On the CPU
    with ``fast_cpu`` its model is :func:`levelset_d2.inference.prepare_for_cpu_inference`'s (frozen
    BatchNorm folded, channels-last weights: the same outputs up to float rounding, ~10 % faster)."""
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor

    import levelset_rcnn
    from levelset_d2.inference import prepare_for_cpu_inference

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = str(weights or "")
    cfg.MODEL.DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg.MODEL.LEVELSET.RETURN_POLYGONS = True
    cfg.freeze()
    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    names = MetadataCatalog.get(datasets[0]).get("thing_classes", None) if datasets else None
    predictor = DefaultPredictor(cfg)
    if fast_cpu and cfg.MODEL.DEVICE == "cpu":
        prepare_for_cpu_inference(predictor.model)
    return predictor, list(names or [str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="levelset-rcnn-serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the LevelSet R-CNN config the model was trained with")
    parser.add_argument("--weights", required=True, help="trained model (model_final.pth)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--labels", default=None,
                        help="comma-separated PolygonLabels values for the model's classes, in class order "
                             "(default: the thing_classes of the config's dataset)")
    parser.add_argument("--max-tasks", type=int, default=MAX_TASKS,
                        help="most tasks predicted in one request; Label Studio sends larger ones again "
                             "one task per request (default %(default)s)")
    add_server_arguments(parser, port=9091)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file")
    predictor, class_names = build_predictor(args.config_file, args.weights, args.device, args.opts)
    if args.labels:
        class_names = [name.strip() for name in args.labels.split(",")]
    backend = LevelSetRCNNBackend(predictor, class_names, model_version_of("LevelSetRCNN", args.weights),
                                  loader_from_args(args), max_tasks=args.max_tasks)
    serve(backend, args)


if __name__ == "__main__":
    main()
