"""Label Studio ML backend for DELSE: four extreme-point clicks in Label Studio's editor give a
polygon (or brush mask), each further click of the same label drags the contour there.

The server (Flask app on waitress, basic auth, limits, image fetching) is the shared
:mod:`levelset_d2.label_studio_server`; this module is DELSE's model adapter and its command.

Interactive requests carry the annotator's ``keypointlabels`` regions; every click re-sends all
points of that label and image, so correctness needs no server state: the first four points are the extreme
points (assigned to left/right/top/bottom by geometry), each further point is a drag target whose
source is the nearest vertex of the current contour, replayed in order. The predictor states of the
last few objects (task, image, label) are kept, and a request that only adds points to one of them
goes on from it (speed, not correctness: replay is deterministic), so going back to an earlier
object of an image does not replay its clicks. One model per process; requests are serialised
around it by a lock, and a request with more than ``max_clicks`` clicks (each drag is a full model
pass) is refused.

Run (see the README's "DELSE in Label Studio")::

    BASIC_AUTH_USER=ls BASIC_AUTH_PASS=... delse-serve \\
        --config-file configs/DELSE/delse_R_18_dsb2018.yaml \\
        --weights output/delse_R_18_dsb2018/model_final.pth --port 9090
"""
import argparse
import contextlib
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from levelset_d2.label_studio_server import (
    BackendError,
    ImageLoader,
    LabelConfig,
    LabelStudioBackend,
    add_server_arguments,
    loader_from_args,
    make_server,
    model_version_of,
    read_label_config,
    serve,
)

__all__ = [
    "BackendError",
    "DELSEBackend",
    "ImageLoader",
    "LabelConfig",
    "assign_extreme_points",
    "make_server",
    "main",
    "parse_label_config",
    "percent_to_pixel",
    "pixel_to_percent",
    "replay_clicks",
]

logger = logging.getLogger(__name__)

MAX_CLICKS = 20  # per request; each click after the fourth is a full model pass


# ------------------------------------------------------------------------------- coordinates
# Label Studio's x, y are continuous percents of the image (0 = left/top edge, 100 = right/bottom
# edge); DELSE's are pixel indices with pixel centres at integers. Pixel i spans [i, i + 1) in
# Label Studio's frame, hence the half-pixel shift.
def percent_to_pixel(x, y, width, height):
    """Label Studio percent (x, y) of a ``width`` x ``height`` image -> DELSE pixel (x, y)."""
    return x * width / 100.0 - 0.5, y * height / 100.0 - 0.5


def pixel_to_percent(points, width, height):
    """(K, 2) DELSE pixel (x, y) -> (K, 2) Label Studio percent (x, y)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.stack([(points[:, 0] + 0.5) * 100.0 / width, (points[:, 1] + 0.5) * 100.0 / height], 1)


def assign_extreme_points(points):
    """Four clicks in any order -> (4, 2) float array (left, right, top, bottom).

    The assignment maximises (x_right - x_left) + (y_bottom - y_top) over the 24 ways of naming
    the clicks; for clicks on the four sides of the object's box, ties only arise between
    coinciding clicks. The clicks are sorted first, so the answer does not depend on their order.
    """
    from itertools import permutations

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (4, 2):
        raise ValueError(f"four extreme points needed, got {len(pts)}")
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    best, best_score = None, -np.inf
    for l, r, t, b in permutations(range(4)):
        score = (pts[r, 0] - pts[l, 0]) + (pts[b, 1] - pts[t, 1])
        if score > best_score:
            best, best_score = (l, r, t, b), score
    return pts[list(best)]


def nearest_contour_point(polygons, point):
    """The vertex of ``polygons`` (list of (K, 2)) nearest to ``point`` (x, y), or None."""
    verts = [p for p in polygons if len(p)]
    if not verts:
        return None
    verts = np.concatenate(verts)
    return verts[int(((verts - np.asarray(point, dtype=np.float64)) ** 2).sum(1).argmin())]


def replay_clicks(predictor, image_bgr, points, start=None):
    """Run DELSE on an annotator's clicks (x, y image pixels): the first four are the extreme
    points, each further one a drag from the nearest contour vertex onto it.

    Args:
        start: (n_done, result) when ``predictor`` already holds the state after the first
            ``n_done`` of ``points`` (n_done >= 4): only the remaining drags are run.
    Returns:
        the final :class:`delse.DELSEResult`.
    """
    if start is None:
        result = predictor.predict(image_bgr, assign_extreme_points(points[:4]))
        done = 4
    else:
        done, result = start
    for target in points[done:]:
        source = nearest_contour_point(result.polygons, target)
        if source is None:
            logger.warning(f"drag onto {tuple(map(float, target))} ignored: the contour is empty")
            continue
        result = predictor.correct(tuple(map(float, source)), tuple(map(float, target)))
    return result


# ------------------------------------------------------------------------------- label config
def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio label config; :class:`BackendError` 400 if DELSE cannot serve it."""
    cfg = read_label_config(xml)
    if not cfg.keypoints:
        raise BackendError(400, "label config has no <KeyPointLabels> control: DELSE needs the annotator's "
                                "clicks (see the README's label config)")
    for kp, (image, _) in cfg.keypoints.items():
        if image not in cfg.images:
            raise BackendError(400, f"KeyPointLabels {kp!r} points at toName={image!r}, which is no "
                                    f"<Image value=\"$key\"> of the label config")
        if image not in cfg.outputs:
            raise BackendError(400, f"label config has no <PolygonLabels> or <BrushLabels> with toName={image!r} "
                                    f"for the output of KeyPointLabels {kp!r}")
    return cfg


# ------------------------------------------------------------------------------- backend
def _brush_rle(mask):
    """Label Studio's brush RLE of an (H, W) bool mask, by label-studio-sdk's own converter."""
    try:
        # The converter package prints the missing optional dependencies of its other modules.
        with contextlib.redirect_stdout(io.StringIO()):
            from label_studio_sdk.converter.brush import mask2rle
    except ImportError as e:
        raise BackendError(500, f"brushlabels output needs label-studio-sdk ({e}): run `make label-studio`, "
                                f"which installs its converter into .venv/")
    return mask2rle(mask.astype(np.uint8) * 255)


@dataclass
class _Group:
    """The clicks of one KeyPointLabels label on one image, in the order sent."""

    from_name: str
    to_name: str
    label: Optional[str]
    points: List[Tuple[float, float]]  # Label Studio percents


class DELSEBackend(LabelStudioBackend):
    """DELSE behind Label Studio's interactive requests (``predict(body)`` -> dict, no HTTP).

    Args:
        predictor: a :class:`delse.DELSEPredictor`.
        loader: an :class:`ImageLoader`.
        output: ``"auto"`` (PolygonLabels if the config has one, else BrushLabels), ``"polygon"``
            or ``"brush"``.
        max_clicks: most keypoint clicks in one request; more is refused (422).
        state_cache: predictor states kept, one per object, the most recent (0: every request
            replays its clicks). A state holds the crop and the branches' outputs (~2 MB for the
            256 px R-50 annotator) and the result's mask, 1 byte per image pixel.
    """

    model_class = "DELSE"

    def __init__(self, predictor, model_version, loader=None, output="auto", image_cache=4, max_clicks=MAX_CLICKS,
                 state_cache=8):
        if output not in ("auto", "polygon", "brush"):
            raise ValueError(f"output must be 'auto', 'polygon' or 'brush', got {output!r}")
        if state_cache < 0:
            raise ValueError(f"state_cache must be >= 0, got {state_cache}")
        super().__init__(model_version, loader)
        self.predictor = predictor
        self.output = output
        self.max_clicks = max_clicks
        self.lock = threading.Lock()  # one model: one request at a time
        self._images = OrderedDict()  # (task id, url) -> image, the last few
        self._images_lock = threading.Lock()
        self._image_cache = image_cache
        # (task id, url, from_name, label) -> (pixel points, result, predictor state), the last few objects
        self._states = OrderedDict()
        self._state_cache = state_cache

    def forget_states(self):
        """Drop the kept predictor states: the next request of every object replays its clicks."""
        with self.lock:
            self._states.clear()

    def check_label_config(self, xml):
        parse_label_config(xml)

    def predict_tasks(self, tasks, context, label_config):
        regions = context.get("result") or []
        if not regions:  # no clicks (pre-annotation of a whole task list): DELSE has nothing to do
            return [self._prediction([]) for _ in tasks]
        if len(regions) > self.max_clicks:
            raise BackendError(422, f"the request has {len(regions)} regions in its context, more than this "
                                    f"server's limit of {self.max_clicks} clicks (--max-clicks)")
        config = parse_label_config(label_config)
        groups = self._groups(regions, config)
        return [self._prediction(self._predict_task(t, config, groups)) for t in tasks]

    def _prediction(self, result):
        # DELSE has no confidence output; the score is a constant.
        return {"result": result, "score": 1.0 if result else 0.0, "model_version": self.model_version}

    def _groups(self, regions, config):
        groups = OrderedDict()
        for i, r in enumerate(regions):
            if not isinstance(r, dict) or r.get("type", "").lower() != "keypointlabels":
                continue
            value = r.get("value")
            if not isinstance(value, dict):
                raise BackendError(400, f"context.result[{i}] has no 'value' object")
            try:
                x, y = float(value["x"]), float(value["y"])
            except (KeyError, TypeError, ValueError):
                raise BackendError(400, f"context.result[{i}].value needs numeric 'x' and 'y' (percent), got {value}")
            if not (np.isfinite(x) and np.isfinite(y)):
                raise BackendError(400, f"context.result[{i}].value has non-finite x, y: {x}, {y}")
            if r.get("is_positive", value.get("is_positive", True)) is False:
                logger.info(f"context.result[{i}]: negative click at ({x:.2f}%, {y:.2f}%) ignored: DELSE takes "
                            f"extreme points and drag targets only")
                continue
            from_name = r.get("from_name")
            if from_name not in config.keypoints:
                raise BackendError(400, f"context.result[{i}] from_name={from_name!r} is no KeyPointLabels of the "
                                        f"label config (have {sorted(config.keypoints)})")
            to_name = r.get("to_name") or config.keypoints[from_name][0]
            labels = value.get("keypointlabels") or []
            label = labels[0] if labels else None
            key = (from_name, to_name, label)
            groups.setdefault(key, _Group(from_name, to_name, label, [])).points.append((x, y))
        return list(groups.values())

    def _output_control(self, config, to_name):
        controls = config.outputs[to_name]
        if self.output != "auto":
            wanted = self.output + "labels"
            controls = [c for c in controls if c[1] == wanted]
            if not controls:
                raise BackendError(400, f"--output {self.output}: the label config has no "
                                        f"<{'PolygonLabels' if self.output == 'polygon' else 'BrushLabels'}> "
                                        f"with toName={to_name!r}")
        polygons = [c for c in controls if c[1] == "polygonlabels"]
        return (polygons or controls)[0]

    def _image(self, task_id, url):
        key = (task_id, url)
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        image = self.loader.fetch(url)  # outside the locks: a slow download blocks nobody
        with self._images_lock:
            self._images[key] = image
            while len(self._images) > self._image_cache:
                self._images.popitem(last=False)
        return image

    def _predict_task(self, task, config, groups):
        results = []
        for g in groups:
            if len(g.points) < 4:
                logger.info(f"task {task.get('id')}: {len(g.points)} click(s) of {g.label!r}, waiting for 4")
                continue
            url = self.task_image_url(task, config, g.to_name)
            image = self._image(task.get("id"), url)
            H, W = image.shape[:2]
            points = [percent_to_pixel(x, y, W, H) for x, y in g.points]
            with self.lock:
                result = self._run(task.get("id"), url, g, points, image)
            region = self._region(config, g, result, W, H)
            if region is not None:
                results.append(region)
        return results

    def _run(self, task_id, url, group, points, image):
        key = (task_id, url, group.from_name, group.label)
        kept = self._states.pop(key, None)  # out until the predictor holds a finished state again
        start = None
        if kept is not None:
            done, result, state = kept
            if len(points) >= len(done) and points[:len(done)] == done:
                self.predictor.restore(state)
                start = (len(done), result)
        t0 = time.perf_counter()
        result = replay_clicks(self.predictor, image, points, start=start)
        logger.info(f"task {task_id}: {len(points)} clicks of {group.label!r} "
                    f"({'continued from ' + str(start[0]) if start else 'replayed'}) in "
                    f"{time.perf_counter() - t0:.3f} s")
        self._states[key] = (list(points), result, self.predictor.state)
        while len(self._states) > self._state_cache:
            self._states.popitem(last=False)
        return result

    def _region(self, config, group, result, W, H):
        name, kind, values = self._output_control(config, group.to_name)
        if group.label is not None and values and group.label not in values:
            logger.warning(f"label {group.label!r} of {group.from_name!r} is not a value of {name!r} "
                           f"(has {values}): carried over as is")
        region = {
            "id": uuid.uuid4().hex[:10],
            "from_name": name,
            "to_name": group.to_name,
            "type": kind,
            "original_width": W,
            "original_height": H,
            "image_rotation": 0,
            "readonly": False,
        }
        labels = [group.label] if group.label is not None else []
        if kind == "polygonlabels":
            poly = np.asarray(result.polygon, dtype=np.float64)
            if len(poly) > 1 and np.allclose(poly[0], poly[-1]):
                poly = poly[:-1]  # find_contours repeats the first vertex; Label Studio closes it
            if len(poly) < 3:
                return None
            region["value"] = {"points": pixel_to_percent(poly, W, H).round(4).tolist(), "closed": True,
                               "polygonlabels": labels}
        else:
            if not result.mask.any():
                return None
            region["value"] = {"format": "rle", "rle": _brush_rle(result.mask), "brushlabels": labels}
        return region


# ------------------------------------------------------------------------------- command line
def build_predictor(config_file, weights, device="auto", opts=()):
    """A :class:`delse.DELSEPredictor` for a config file and trained weights."""
    import torch

    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = str(weights or "")
    cfg.MODEL.DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg.freeze()
    return delse.DELSEPredictor(cfg)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delse-serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the DELSE config the model was trained with")
    parser.add_argument("--weights", required=True, help="trained model (model_final.pth)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--output", default="auto", choices=["auto", "polygon", "brush"],
                        help="region type: auto = PolygonLabels if the label config has one, else BrushLabels")
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS,
                        help="most clicks in one request (default %(default)s)")
    add_server_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file")
    predictor = build_predictor(args.config_file, args.weights, args.device, args.opts)
    backend = DELSEBackend(predictor, model_version_of("DELSE", args.weights), loader_from_args(args), output=args.output,
                           max_clicks=args.max_clicks)
    logger.info(f"DELSE on {predictor.model.device}")
    serve(backend, args)


if __name__ == "__main__":
    main()
