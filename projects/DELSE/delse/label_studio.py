"""Label Studio ML backend for DELSE: four extreme-point clicks in Label Studio's editor give a
polygon (or brush mask), each further click of the same label drags the contour there.

Speaks Label Studio's ML-backend protocol with the standard library's HTTP server::

    GET  /health    -> {"status": "UP", "model_class": "DELSE", "model_version": ...}
    POST /setup     -> {"model_version": ...}
    POST /predict   {"tasks": [...], "label_config": ..., "params": {"context": {"result": [...]}}}
                    -> {"results": [{"result": [...], "score": ..., "model_version": ...}, ...]}
    POST /webhook   -> {} (no-op)

Interactive requests carry the annotator's ``keypointlabels`` regions; every click re-sends all
points of that label and image, so the server is stateless: the first four points are the extreme
points (assigned to left/right/top/bottom by geometry), each further point is a drag target whose
source is the nearest vertex of the current contour, replayed in order. The last request's predictor
state is reused when the next one only adds points (speed, not correctness: replay is
deterministic). One model per process; requests are serialised around it by a lock.

Run (see the README's "DELSE in Label Studio")::

    python -m delse.label_studio --config-file configs/DELSE/delse_R_18_dsb2018.yaml \\
        --weights output/delse_R_18_dsb2018/model_final.pth --port 9090
"""
import argparse
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

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

MODEL_CLASS = "DELSE"
MAX_BODY_BYTES = 64 << 20


class BackendError(Exception):
    """A request that cannot be answered: ``status`` is the HTTP status sent back with ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
@dataclass
class LabelConfig:
    """What the backend needs of a project's label config.

    keypoints: KeyPointLabels name -> (Image name it points at, its label values).
    outputs: Image name -> list of (control name, "polygonlabels" | "brushlabels", label values).
    images: Image name -> the task data key of its ``value="$key"``.
    """

    keypoints: Dict[str, Tuple[str, List[str]]] = field(default_factory=dict)
    outputs: Dict[str, List[Tuple[str, str, List[str]]]] = field(default_factory=dict)
    images: Dict[str, str] = field(default_factory=dict)


_OUTPUT_TAGS = {"polygonlabels": "polygonlabels", "brushlabels": "brushlabels"}


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio label config; :class:`BackendError` 400 if DELSE cannot serve it."""
    if not isinstance(xml, str) or not xml.strip():
        raise BackendError(400, "label_config is missing or empty: Label Studio sends the project's XML config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise BackendError(400, f"label_config is not valid XML: {e}")
    cfg = LabelConfig()
    for el in root.iter():
        tag = el.tag.lower()
        name, to_name = el.get("name"), el.get("toName")
        labels = [c.get("value") for c in el if c.tag.lower() == "label" and c.get("value") is not None]
        if tag == "image" and name and (el.get("value") or "").startswith("$"):
            cfg.images[name] = el.get("value")[1:]
        elif tag == "keypointlabels" and name and to_name:
            cfg.keypoints[name] = (to_name, labels)
        elif tag in _OUTPUT_TAGS and name and to_name:
            cfg.outputs.setdefault(to_name, []).append((name, _OUTPUT_TAGS[tag], labels))
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


# ------------------------------------------------------------------------------- images
def _is_jwt(key: str) -> bool:
    return key.count(".") == 2 and all(key.split("."))


def _jwt_expiry(token: str) -> float:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])
    except Exception:  # no readable expiry: refresh again in a minute
        return time.time() + 60.0


class ImageLoader:
    """Fetches task images: Label Studio uploads and local files (``/data/...``, with
    ``label_studio_url`` and ``api_key``), plain http(s) URLs, and local folders by URL prefix.

    Args:
        label_studio_url: e.g. ``http://localhost:8080`` (env ``LABEL_STUDIO_URL``).
        api_key: a legacy token (sent as ``Token``) or a personal access token (a JWT refresh
            token, exchanged at ``/api/token/refresh/`` for a ``Bearer`` access token)
            (env ``LABEL_STUDIO_API_KEY``).
        path_map: list of (URL prefix, folder): a URL starting with the prefix is read from the
            folder (for ``/data/local-files/?d=REL`` the prefix ``/data/local-files/`` maps REL).
    """

    def __init__(self, label_studio_url=None, api_key=None, path_map=(), timeout=30.0):
        self.label_studio_url = (label_studio_url or "").rstrip("/") or None
        self.api_key = api_key or None
        self.path_map = [(p, Path(d)) for p, d in path_map]
        self.timeout = timeout
        self._access = None  # (token, expiry) for a personal access token
        self._lock = threading.Lock()

    def use_setup_defaults(self, hostname, access_token):
        """Label Studio's /setup names its URL and the project owner's legacy token; used only
        where no URL / key was configured."""
        if not self.label_studio_url and hostname:
            self.label_studio_url = hostname.rstrip("/")
            logger.info(f"LABEL_STUDIO_URL not set: using {self.label_studio_url} from Label Studio's /setup")
        if not self.api_key and access_token:
            self.api_key = access_token
            logger.info("LABEL_STUDIO_API_KEY not set: using the access token from Label Studio's /setup")

    # --- auth
    def _authorization(self, refresh=False):
        key = self.api_key
        if not _is_jwt(key):
            return f"Token {key}"
        with self._lock:
            if refresh or self._access is None or self._access[1] < time.time() + 30:
                self._access = self._refresh_access_token()
            return f"Bearer {self._access[0]}"

    def _refresh_access_token(self):
        url = f"{self.label_studio_url}/api/token/refresh/"
        req = urllib.request.Request(url, data=json.dumps({"refresh": self.api_key}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                access = json.loads(r.read())["access"]
        except urllib.error.HTTPError as e:
            raise BackendError(502, f"{url} refused LABEL_STUDIO_API_KEY as a personal access token "
                                    f"(HTTP {e.code}): check the key in Label Studio's Account & Settings")
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            raise BackendError(502, f"cannot exchange LABEL_STUDIO_API_KEY for an access token at {url}: {e}")
        return access, _jwt_expiry(access)

    # --- fetching
    def _local_path(self, url):
        for prefix, folder in self.path_map:
            if url.startswith(prefix):
                rest = url[len(prefix):]
                query = urllib.parse.urlparse(url).query
                if "d=" in query and rest.startswith("?"):
                    rest = urllib.parse.parse_qs(query)["d"][0]
                path = (folder / urllib.parse.unquote(rest).lstrip("/")).resolve()
                if folder.resolve() not in path.parents:
                    raise BackendError(400, f"image URL {url!r} leaves the mapped folder {folder}")
                return path
        return None

    def fetch_bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise BackendError(400, f"task image URL must be a non-empty string, got {url!r}")
        path = self._local_path(url)
        if path is not None:
            try:
                return path.read_bytes()
            except OSError as e:
                raise BackendError(404, f"image URL {url!r} maps to {path}, which cannot be read: {e.strerror}")
        if url.startswith("/"):
            if not self.label_studio_url:
                raise BackendError(500, f"image URL {url!r} is relative to Label Studio: set LABEL_STUDIO_URL "
                                        f"(--label-studio-url), or map it to a folder with --path-map")
            full, auth = self.label_studio_url + url, True
        elif url.startswith(("http://", "https://")):
            full = url
            auth = bool(self.label_studio_url) and url.startswith(self.label_studio_url + "/")
        else:
            raise BackendError(400, f"image URL {url!r} is not http(s), a Label Studio /data/ path or a "
                                    f"--path-map prefix")
        if auth and not self.api_key:
            raise BackendError(500, f"image URL {full} is served by Label Studio, which needs an API key: "
                                    f"set LABEL_STUDIO_API_KEY (--api-key)")
        for attempt in range(2):
            headers = {"Authorization": self._authorization(refresh=attempt > 0)} if auth else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(full, headers=headers), timeout=self.timeout) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                if e.code == 401 and auth and _is_jwt(self.api_key) and attempt == 0:
                    continue  # the access token expired early: refresh once
                hint = " (check LABEL_STUDIO_API_KEY)" if e.code in (401, 403) and auth else ""
                raise BackendError(502, f"cannot fetch image {full}: HTTP {e.code} {e.reason}{hint}")
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise BackendError(502, f"cannot fetch image {full}: {reason}"
                                        + (" (is LABEL_STUDIO_URL right?)" if auth else ""))
        raise AssertionError("unreachable")

    def fetch(self, url: str) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 BGR array."""
        data = self.fetch_bytes(url)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BackendError(422, f"image {url!r} ({len(data)} bytes) cannot be decoded as an image")
        return image


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


class DELSEBackend:
    """The protocol without HTTP: ``health()``, ``setup(body)``, ``predict(body)`` -> dicts.

    Args:
        predictor: a :class:`delse.DELSEPredictor`.
        loader: an :class:`ImageLoader`.
        output: ``"auto"`` (PolygonLabels if the config has one, else BrushLabels), ``"polygon"``
            or ``"brush"``.
    """

    def __init__(self, predictor, model_version, loader=None, output="auto", image_cache=4):
        if output not in ("auto", "polygon", "brush"):
            raise ValueError(f"output must be 'auto', 'polygon' or 'brush', got {output!r}")
        self.predictor = predictor
        self.model_version = model_version
        self.loader = loader or ImageLoader()
        self.output = output
        self.lock = threading.Lock()  # one model: one request at a time
        self._images = OrderedDict()  # (task id, url) -> image, the last few
        self._images_lock = threading.Lock()
        self._image_cache = image_cache
        self._last = None  # (task id, url, from_name, label, pixel points, result) the predictor holds

    def health(self):
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version}

    def setup(self, body):
        if not isinstance(body, dict):
            raise BackendError(400, "/setup body must be a JSON object")
        self.loader.use_setup_defaults(body.get("hostname"), body.get("access_token"))
        if body.get("schema"):
            try:
                parse_label_config(body["schema"])
            except BackendError as e:  # LS shows setup errors when connecting: say it now
                logger.warning(f"/setup: {e.message}")
        return {"model_version": self.model_version}

    # --- predict
    def predict(self, body):
        if not isinstance(body, dict):
            raise BackendError(400, "/predict body must be a JSON object")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BackendError(400, "/predict body needs 'tasks': a list of task objects")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError(400, "/predict 'params' must be an object")
        context = params.get("context") or {}
        if not isinstance(context, dict) or not isinstance(context.get("result", []), list):
            raise BackendError(400, "/predict 'params.context' must be an object with a 'result' list")
        regions = context.get("result") or []
        if not regions:  # no clicks (pre-annotation of a whole task list): DELSE has nothing to do
            return {"results": [self._prediction([]) for _ in tasks]}
        config = parse_label_config(body.get("label_config"))
        groups = self._groups(regions, config)
        return {"results": [self._prediction(self._predict_task(t, config, groups)) for t in tasks]}

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
        data = task.get("data")
        if not isinstance(data, dict):
            raise BackendError(400, f"task {task.get('id')!r} has no 'data' object")
        for g in groups:
            if len(g.points) < 4:
                logger.info(f"task {task.get('id')}: {len(g.points)} click(s) of {g.label!r}, waiting for 4")
                continue
            key = config.images.get(g.to_name)
            url = data.get(key)
            if url is None:
                raise BackendError(400, f"task {task.get('id')!r} data has no {key!r} (the image of "
                                        f"<Image name={g.to_name!r} value=\"${key}\">)")
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
        last = self._last
        start = None
        if last is not None and last[:4] == (task_id, url, group.from_name, group.label):
            done = last[4]
            if len(points) >= len(done) and points[:len(done)] == done:
                start = (len(done), last[5])
        self._last = None  # until the predictor holds a finished state again
        t0 = time.perf_counter()
        result = replay_clicks(self.predictor, image, points, start=start)
        logger.info(f"task {task_id}: {len(points)} clicks of {group.label!r} "
                    f"({'continued from ' + str(start[0]) if start else 'replayed'}) in "
                    f"{time.perf_counter() - t0:.3f} s")
        self._last = (task_id, url, group.from_name, group.label, list(points), result)
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


# ------------------------------------------------------------------------------- HTTP
def make_server(backend: DELSEBackend, host="127.0.0.1", port=9090) -> ThreadingHTTPServer:
    """A threading HTTP server for ``backend`` (``port=0``: a free port, ``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            logger.debug("%s - " + fmt, self.address_string(), *args)

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BackendError(400, f"{self.path}: bad Content-Length {self.headers.get('Content-Length')!r}")
            if length > MAX_BODY_BYTES:
                raise BackendError(413, f"{self.path}: body of {length} bytes exceeds {MAX_BODY_BYTES}")
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return {}
            try:
                return json.loads(raw)
            except ValueError as e:
                raise BackendError(400, f"{self.path}: body is not JSON ({e})")

        def _handle(self, method):
            t0 = time.perf_counter()
            path = urllib.parse.urlparse(self.path).path.rstrip("/") or "/"
            try:
                body = self._body() if method == "POST" else None
                if method == "GET" and path in ("/", "/health"):
                    status, payload = 200, backend.health()
                elif method == "GET" and path == "/versions":
                    status, payload = 200, {"versions": [backend.model_version]}
                elif method == "POST" and path == "/setup":
                    status, payload = 200, backend.setup(body)
                elif method == "POST" and path == "/predict":
                    status, payload = 200, backend.predict(body)
                elif method == "POST" and path == "/webhook":
                    status, payload = 200, {}
                else:
                    raise BackendError(404, f"{method} {path}: not an endpoint of this backend "
                                            f"(GET /health, POST /setup, /predict, /webhook)")
            except BackendError as e:
                logger.warning(f"{method} {path} -> {e.status}: {e.message}")
                status, payload = e.status, {"error": e.message}
            except Exception as e:  # a bug must not stop the server: answer 500 and log it
                logger.exception(f"{method} {path} failed")
                status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
            self._send(status, payload)
            logger.info(f"{method} {path} {status} {time.perf_counter() - t0:.3f} s")

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def model_version_of(weights):
    """``DELSE-<file stem>-<first 8 hex of its SHA-256>``, or ``DELSE-untrained``."""
    if not weights:
        return "DELSE-untrained"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"DELSE-{Path(weights).stem}-{h.hexdigest()[:8]}"


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


def _path_map(items):
    out = []
    for item in items:
        prefix, sep, folder = item.partition("=")
        if not sep or not prefix or not folder:
            raise SystemExit(f"--path-map {item!r}: expected URL_PREFIX=FOLDER")
        out.append((prefix, folder))
    root = os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    if root:  # Label Studio's own setting for its local-files storage
        out.append(("/data/local-files/", root))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m delse.label_studio", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the DELSE config the model was trained with")
    parser.add_argument("--weights", required=True, help="trained model (model_final.pth)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--output", default="auto", choices=["auto", "polygon", "brush"],
                        help="region type: auto = PolygonLabels if the label config has one, else BrushLabels")
    parser.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="Label Studio's URL, for /data/ image paths (env LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="legacy token or personal access token (env LABEL_STUDIO_API_KEY)")
    parser.add_argument("--path-map", action="append", default=[], metavar="URL_PREFIX=FOLDER",
                        help="read images whose URL starts with the prefix from a local folder (repeatable); "
                             "env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT maps /data/local-files/")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file")
    predictor = build_predictor(args.config_file, args.weights, args.device, args.opts)
    backend = DELSEBackend(
        predictor, model_version_of(args.weights),
        ImageLoader(args.label_studio_url, args.api_key, _path_map(args.path_map)), output=args.output,
    )
    server = make_server(backend, args.host, args.port)
    host, port = server.server_address[:2]
    logger.info(f"DELSE ML backend {backend.model_version} on {predictor.model.device} at http://{host}:{port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
