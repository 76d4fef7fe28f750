"""The Label Studio ML-backend server both projects share: the web app, its limits and
authentication, safe image fetching and the command-line options. A project adds the model: a
:class:`LabelStudioBackend` subclass with ``predict_tasks`` (DELSE: interactive clicks,
``delse.label_studio``; LevelSet R-CNN: pre-annotation, ``levelset_rcnn.label_studio``).

Protocol (Label Studio's ML backend API)::

    GET  /health    -> {"status": "UP", "model_class": ..., "model_version": ...}
    POST /setup     -> {"model_version": ...}
    POST /predict   {"tasks": [...], "label_config": ..., "params": {"context": {...}}}
                    -> {"results": [{"result": [...], "score": ..., "model_version": ...}, ...]}
    POST /webhook   -> {} (no-op)

Why Flask + waitress: Flask (the framework of Label Studio's own example backends) gives routing,
JSON errors and the body-size limit; waitress is a production WSGI server that reads each request
completely in its asynchronous I/O loop before a worker thread sees it, so slow clients hold no
thread, and it bounds what a deployment needs bounded by configuration: worker threads
(``threads``), open connections (``connection_limit``), header and body size and the idle read
timeout (``channel_timeout``). It runs in one process, so the model is loaded once and DELSE's
state between an annotator's clicks stays in that process (gunicorn's forked workers would load it
once per worker and split the clicks of one object between them), and it runs in a thread in tests.

Security defaults (see the README's deployment section): bind 127.0.0.1; HTTP basic auth
(Label Studio's "Basic auth" ML-backend setting) required to bind anywhere else unless
``--allow-unauthenticated``; ``/setup`` never sets or replaces Label Studio's URL or API key unless
``--accept-setup-credentials`` and none is configured; images only from Label Studio's host, the
``--allowed-image-host`` hosts and ``--path-map`` folders, with caps on bytes, pixels (read from
the image header before decoding) and download time; error messages name the cause but no paths,
upstream status or tracebacks (those go to the server log).
"""
import argparse
import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "BackendError",
    "ImageLoader",
    "LabelConfig",
    "LabelStudioBackend",
    "add_server_arguments",
    "create_app",
    "decode_image",
    "loader_from_args",
    "make_server",
    "model_version_of",
    "read_label_config",
    "serve",
]

logger = logging.getLogger(__name__)

# Defaults of the limits (each a command-line option of add_server_arguments).
MAX_BODY_BYTES = 16 << 20  # a /predict body: tasks and clicks, no images
MAX_IMAGE_BYTES = 50 << 20
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000; 120 MB decoded as BGR
IMAGE_TIMEOUT = 30.0  # seconds for a whole image download
READ_TIMEOUT = 30  # seconds a connection may stay idle (waitress channel_timeout)
THREADS = 4
CONNECTION_LIMIT = 64
MAX_REDIRECTS = 3


class BackendError(Exception):
    """A request that cannot be answered: ``status`` is the HTTP status sent back with ``message``
    (written for the client: it names the cause, never a server path or an upstream answer)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------- label config
@dataclass
class LabelConfig:
    """What the backends need of a project's label config.

    keypoints: KeyPointLabels name -> (Image name it points at, its label values).
    outputs: Image name -> list of (control name, "polygonlabels" | "brushlabels", label values).
    images: Image name -> the task data key of its ``value="$key"``.
    """

    keypoints: Dict[str, Tuple[str, List[str]]] = field(default_factory=dict)
    outputs: Dict[str, List[Tuple[str, str, List[str]]]] = field(default_factory=dict)
    images: Dict[str, str] = field(default_factory=dict)


_OUTPUT_TAGS = {"polygonlabels": "polygonlabels", "brushlabels": "brushlabels"}


def read_label_config(xml: str) -> LabelConfig:
    """The Image, KeyPointLabels and PolygonLabels / BrushLabels tags of a label config;
    :class:`BackendError` 400 if it is missing or not XML."""
    if not isinstance(xml, str) or not xml.strip():
        raise BackendError(400, "label_config is missing or empty: Label Studio sends the project's XML config")
    try:
        root = ET.fromstring(xml)  # expat: no external entities, no DTD fetching
    except ET.ParseError as e:
        raise BackendError(400, f"label_config is not valid XML: {e}")
    cfg = LabelConfig()
    for el in root.iter():
        tag = str(el.tag).lower()
        name, to_name = el.get("name"), el.get("toName")
        labels = [c.get("value") for c in el if str(c.tag).lower() == "label" and c.get("value") is not None]
        if tag == "image" and name and (el.get("value") or "").startswith("$"):
            cfg.images[name] = el.get("value")[1:]
        elif tag == "keypointlabels" and name and to_name:
            cfg.keypoints[name] = (to_name, labels)
        elif tag in _OUTPUT_TAGS and name and to_name:
            cfg.outputs.setdefault(to_name, []).append((name, _OUTPUT_TAGS[tag], labels))
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


def _origin(url: str):
    """(scheme, lower-case host, port) of an http(s) URL, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def _host_pattern(entry: str):
    """``--allowed-image-host`` HOST, HOST:PORT or a URL -> (host, port or None)."""
    parts = urllib.parse.urlsplit(entry if "//" in entry else "//" + entry)
    if not parts.hostname:
        raise ValueError(f"allowed image host {entry!r}: expected HOST, HOST:PORT or a URL")
    return parts.hostname.lower(), parts.port


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 BGR; the size is read from the header first and an
    image over ``max_pixels`` is refused before anything is decoded (decompression bombs)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError:  # PIL's own, far larger limit
        raise BackendError(413, f"the task image has more pixels than this server's limit of {max_pixels}")
    except (UnidentifiedImageError, OSError, ValueError):
        raise BackendError(422, "the task image is not in a readable image format")
    if width * height > max_pixels:
        raise BackendError(413, f"the task image has {width} x {height} pixels, more than this server's "
                                f"limit of {max_pixels} (--max-image-pixels)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BackendError(422, "the task image cannot be decoded")
    return image


class ImageLoader:
    """Fetches task images from where an operator allowed: Label Studio (``/data/...`` paths and
    absolute URLs on its host, sent with the API key), hosts named in ``allowed_hosts`` (no key),
    and local folders by URL prefix (``path_map``). Redirects are followed only within those hosts,
    and the key is sent only to Label Studio's own scheme, host and port.

    Args:
        label_studio_url: e.g. ``http://localhost:8080`` (env ``LABEL_STUDIO_URL``).
        api_key: a legacy token (sent as ``Token``) or a personal access token (a JWT refresh
            token, exchanged at ``/api/token/refresh/`` for a ``Bearer`` access token)
            (env ``LABEL_STUDIO_API_KEY``).
        path_map: list of (URL prefix, folder): a URL starting with the prefix is read from the
            folder (for ``/data/local-files/?d=REL`` the prefix ``/data/local-files/`` maps REL).
        allowed_hosts: further image hosts, ``HOST`` (any port) or ``HOST:PORT``.
        accept_setup_credentials: let Label Studio's ``/setup`` set the URL and key where none
            is configured (once; never replaces one).
        max_bytes, max_pixels, timeout: caps on an image's size in bytes, its width x height, and
            the seconds of its whole download.
    """

    def __init__(self, label_studio_url=None, api_key=None, path_map=(), allowed_hosts=(), *,
                 accept_setup_credentials=False, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS,
                 timeout=IMAGE_TIMEOUT):
        import requests

        self.label_studio_url = (label_studio_url or "").rstrip("/") or None
        if self.label_studio_url and _origin(self.label_studio_url) is None:
            raise ValueError(f"Label Studio URL {label_studio_url!r} is not an http(s) URL")
        self.api_key = api_key or None
        self.path_map = [(p, Path(d).resolve()) for p, d in path_map]
        self.allowed_hosts = [_host_pattern(h) for h in allowed_hosts]
        self.accept_setup_credentials = accept_setup_credentials
        self.max_bytes, self.max_pixels, self.timeout = max_bytes, max_pixels, timeout
        self._access = None  # (token, expiry) for a personal access token
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies or ~/.netrc credentials from the environment

    def use_setup_credentials(self, hostname, access_token):
        """Label Studio's /setup names its URL and a token: used only with
        ``accept_setup_credentials`` and only where none is configured (so the first /setup wins
        and no later one replaces it)."""
        if not (hostname or access_token):
            return
        if not self.accept_setup_credentials:
            logger.info("/setup sent Label Studio's URL / key: ignored (--accept-setup-credentials is off)")
            return
        with self._lock:
            if not self.label_studio_url and hostname and _origin(str(hostname)):
                self.label_studio_url = str(hostname).rstrip("/")
                logger.info(f"Label Studio URL from /setup: {self.label_studio_url}")
            if not self.api_key and access_token:
                self.api_key = str(access_token)
                logger.info("Label Studio API key from /setup")

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
        import requests

        url = f"{self.label_studio_url}/api/token/refresh/"
        try:
            r = self._session.post(url, json={"refresh": self.api_key}, timeout=self.timeout, allow_redirects=False)
            if r.status_code != 200:
                logger.warning(f"{url} answered {r.status_code} to the personal access token")
                raise BackendError(502, "Label Studio refused LABEL_STUDIO_API_KEY as a personal access "
                                        "token: check the key in Label Studio's Account & Settings")
            access = r.json()["access"]
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            logger.warning(f"token refresh at {url} failed: {e!r}")
            raise BackendError(502, "cannot exchange LABEL_STUDIO_API_KEY for an access token at Label Studio")
        return access, _jwt_expiry(access)

    # --- local files
    def _read_mapped(self, url):
        """The bytes of a ``path_map`` URL, None if no prefix matches. Missing files, paths
        outside the folder and anything not a regular file get one answer."""
        for prefix, folder in self.path_map:
            if not url.startswith(prefix):
                continue
            rest = url[len(prefix):]
            if rest.startswith("?"):  # /data/local-files/?d=REL
                rest = (urllib.parse.parse_qs(rest[1:]).get("d") or [""])[0]
            else:
                rest = urllib.parse.unquote(rest.split("?")[0])
            not_found = BackendError(404, "task image not found (or not in a folder this server may read)")
            if not rest or "\x00" in rest:
                raise not_found
            path = (folder / rest.lstrip("/")).resolve()
            if not path.is_relative_to(folder) or not path.is_file():
                logger.warning(f"image URL {url!r} -> {path}: missing or outside {folder}")
                raise not_found
            try:
                with open(path, "rb") as f:
                    data = f.read(self.max_bytes + 1)
            except OSError as e:  # e.g. no permission: the same answer as missing
                logger.warning(f"image URL {url!r} -> {path}: {e}")
                raise not_found
            if len(data) > self.max_bytes:
                raise BackendError(413, f"the task image is larger than this server's limit of "
                                        f"{self.max_bytes} bytes (--max-image-bytes)")
            return data
        return None

    # --- http
    def _allowed(self, origin):
        if origin is None:
            return False
        if self.label_studio_url and origin == _origin(self.label_studio_url):
            return True
        return any(origin[1] == host and (port is None or origin[2] == port) for host, port in self.allowed_hosts)

    def fetch_bytes(self, url: str) -> bytes:
        """The bytes of a task image URL (see the class docstring for where from)."""
        if not isinstance(url, str) or not url:
            raise BackendError(400, "task image URL must be a non-empty string")
        data = self._read_mapped(url)
        if data is not None:
            return data
        if url.startswith("/"):
            if not self.label_studio_url:
                raise BackendError(500, "task image URL is relative to Label Studio, and this server has no "
                                        "Label Studio URL: set LABEL_STUDIO_URL (--label-studio-url) or map "
                                        "the path to a folder with --path-map")
            url = self.label_studio_url + url
        elif _origin(url) is None:
            raise BackendError(400, "task image URL is not http(s), a Label Studio /data/ path or a --path-map prefix")
        if not self._allowed(_origin(url)):
            raise BackendError(403, f"task image host {_origin(url)[1]!r} is not allowed: only Label Studio's "
                                    f"host and --allowed-image-host hosts")
        return self._download(url)

    def _download(self, url):
        import requests

        deadline = time.monotonic() + self.timeout
        refreshed = False
        for _ in range(MAX_REDIRECTS + 1):
            auth = self.label_studio_url is not None and _origin(url) == _origin(self.label_studio_url)
            if auth and not self.api_key:
                raise BackendError(500, "task image is served by Label Studio, which needs an API key: "
                                        "set LABEL_STUDIO_API_KEY (--api-key)")
            headers = {"Accept-Encoding": "identity"}  # the byte cap counts what is decoded
            if auth:
                headers["Authorization"] = self._authorization(refresh=refreshed)
            try:
                with self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                       timeout=(min(10.0, self.timeout), self.timeout)) as r:
                    if r.is_redirect:
                        url = urllib.parse.urljoin(url, r.headers.get("Location", ""))
                        if not self._allowed(_origin(url)):
                            logger.warning(f"image redirect to {url!r} refused: host not allowed")
                            raise BackendError(403, "the task image redirects to a host that is not allowed")
                        continue
                    if r.status_code == 401 and auth and _is_jwt(self.api_key) and not refreshed:
                        refreshed = True  # the access token expired early: refresh once
                        continue
                    if r.status_code != 200:
                        logger.warning(f"image {url!r}: HTTP {r.status_code}")
                        if auth and r.status_code in (401, 403):
                            raise BackendError(502, "Label Studio refused the API key for the task image: "
                                                    "check LABEL_STUDIO_API_KEY")
                        raise BackendError(502, "the image host did not return the task image")
                    return self._read_capped(r, deadline)
            except requests.Timeout:
                raise BackendError(504, f"the task image did not arrive within {self.timeout:g} s")
            except requests.RequestException as e:
                logger.warning(f"image {url!r}: {e!r}")
                raise BackendError(502, "cannot reach the task image's host"
                                        + (" (is LABEL_STUDIO_URL right?)" if auth else ""))
        raise BackendError(502, f"the task image redirects more than {MAX_REDIRECTS} times")

    def _read_capped(self, response, deadline):
        too_big = BackendError(413, f"the task image is larger than this server's limit of {self.max_bytes} "
                                    f"bytes (--max-image-bytes)")
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        chunks, size = [], 0
        while True:
            # read1: whatever one socket read gives, so a server that dribbles meets the deadline
            chunk = response.raw.read1(64 << 10)
            if not chunk:
                break
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            if time.monotonic() > deadline:
                raise BackendError(504, f"the task image did not arrive within {self.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def fetch(self, url: str) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 BGR array."""
        return decode_image(self.fetch_bytes(url), self.max_pixels)


# ------------------------------------------------------------------------------- backend
class LabelStudioBackend:
    """The protocol without HTTP: ``health()``, ``setup(body)``, ``predict(body)`` -> dicts.
    Subclasses set ``model_class`` and implement ``predict_tasks`` (and may check a label config
    in ``check_label_config``).

    Args:
        model_version: reported to Label Studio with every prediction.
        loader: the :class:`ImageLoader` for task images.
    """

    model_class = "model"

    def __init__(self, model_version: str, loader: Optional[ImageLoader] = None):
        self.model_version = model_version
        self.loader = loader or ImageLoader()

    def health(self):
        return {"status": "UP", "model_class": self.model_class, "model_version": self.model_version}

    def setup(self, body):
        if not isinstance(body, dict):
            raise BackendError(400, "/setup body must be a JSON object")
        self.loader.use_setup_credentials(body.get("hostname"), body.get("access_token"))
        if body.get("schema"):
            try:
                self.check_label_config(body["schema"])
            except BackendError as e:  # Label Studio shows setup errors when connecting: say it now
                logger.warning(f"/setup: {e.message}")
        return {"model_version": self.model_version}

    def check_label_config(self, xml: str) -> None:
        read_label_config(xml)

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
        return {"results": self.predict_tasks(tasks, context, body.get("label_config"))}

    def predict_tasks(self, tasks: List[dict], context: dict, label_config) -> List[dict]:
        """One prediction ``{"result": [...], "score": ..., "model_version": ...}`` per task."""
        raise NotImplementedError

    @staticmethod
    def task_image_url(task, config: LabelConfig, image_name: str):
        """The task's image URL for ``<Image name=image_name value="$key">``."""
        data = task.get("data")
        if not isinstance(data, dict):
            raise BackendError(400, f"task {task.get('id')!r} has no 'data' object")
        key = config.images.get(image_name)
        url = data.get(key)
        if url is None:
            raise BackendError(400, f"task {task.get('id')!r} data has no {key!r} (the image of "
                                    f"<Image name={image_name!r} value=\"${key}\">)")
        return url


def model_version_of(model: str, weights) -> str:
    """``<model>-<weights file stem>-<first 8 hex of its SHA-256>``, or ``<model>-untrained``."""
    if not weights:
        return f"{model}-untrained"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{model}-{Path(weights).stem}-{h.hexdigest()[:8]}"


# ------------------------------------------------------------------------------- HTTP
def create_app(backend: LabelStudioBackend, basic_auth: Optional[Tuple[str, str]] = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The Flask app of ``backend``: every endpoint behind HTTP basic auth when ``basic_auth`` is
    (user, password); every error a JSON ``{"error": ...}``."""
    from flask import Flask, Response, request
    from werkzeug.exceptions import HTTPException

    app = Flask(f"label_studio_ml_{backend.model_class}")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    def reply(status, payload, headers=None):
        return Response(json.dumps(payload), status=status, mimetype="application/json", headers=headers)

    @app.before_request
    def authenticate():
        if basic_auth is None:
            return None
        given = request.authorization
        ok = (given is not None and given.type == "basic"
              and hmac.compare_digest((given.username or "").encode(), basic_auth[0].encode())
              & hmac.compare_digest((given.password or "").encode(), basic_auth[1].encode()))
        if not ok:
            return reply(401, {"error": "HTTP basic auth required: set the ML backend's basic auth user "
                                        "and password in Label Studio"},
                         {"WWW-Authenticate": 'Basic realm="Label Studio ML backend"'})
        return None

    def body():
        raw = request.get_data(cache=False)
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise BackendError(400, f"{request.path}: body is not JSON")

    @app.get("/")
    @app.get("/health")
    def health():
        return reply(200, backend.health())

    @app.get("/versions")
    def versions():
        return reply(200, {"versions": [backend.model_version]})

    @app.post("/setup")
    def setup():
        return reply(200, backend.setup(body()))

    @app.post("/predict")
    def predict():
        t0 = time.perf_counter()
        payload = backend.predict(body())
        logger.info(f"/predict: {len(payload['results'])} result(s) in {time.perf_counter() - t0:.3f} s")
        return reply(200, payload)

    @app.post("/webhook")
    def webhook():
        body()
        return reply(200, {})

    @app.errorhandler(BackendError)
    def backend_error(e):
        logger.warning(f"{request.method} {request.path} -> {e.status}: {e.message}")
        return reply(e.status, {"error": e.message})

    @app.errorhandler(HTTPException)
    def http_error(e):
        message = f"{e.code} {e.name}"
        if e.code == 404:
            message += ": not an endpoint of this backend (GET /health, POST /setup, /predict, /webhook)"
        elif e.code == 413:
            message += f": the request body exceeds this server's limit of {max_body_bytes} bytes"
        return reply(e.code, {"error": message})

    @app.errorhandler(Exception)
    def internal_error(e):  # a bug must not stop the server, nor show its internals
        logger.exception(f"{request.method} {request.path} failed")
        return reply(500, {"error": "internal error of the ML backend (details in its log)"})

    return app


def make_server(backend: LabelStudioBackend, host="127.0.0.1", port=9090, *, basic_auth=None,
                threads=THREADS, read_timeout=READ_TIMEOUT, connection_limit=CONNECTION_LIMIT,
                max_body_bytes=MAX_BODY_BYTES):
    """A waitress server for ``backend`` (not started: ``server.run()``; ``port=0``: a free port,
    ``server.effective_port``; ``server.close()`` stops it)."""
    import waitress

    return waitress.create_server(
        create_app(backend, basic_auth, max_body_bytes), host=host, port=port,
        threads=threads, connection_limit=connection_limit, channel_timeout=read_timeout,
        cleanup_interval=max(1, min(30, read_timeout // 2)),  # how often idle connections are closed
        max_request_body_size=max_body_bytes, max_request_header_size=64 << 10, ident="",
    )


# ------------------------------------------------------------------------------- command line
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


def add_server_arguments(parser: argparse.ArgumentParser, port: int = 9090) -> None:
    """The options every backend command shares: address, auth, Label Studio, images, limits."""
    g = parser.add_argument_group("server and security")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; another address needs "
                        "basic auth or --allow-unauthenticated)")
    g.add_argument("--port", type=int, default=port, help="(default %(default)s)")
    g.add_argument("--basic-auth-user", default=os.environ.get("BASIC_AUTH_USER"),
                   help="HTTP basic auth user Label Studio must send (its ML backend 'Basic auth' setting; "
                        "env BASIC_AUTH_USER); the password comes from env BASIC_AUTH_PASS. Default: none")
    g.add_argument("--allow-unauthenticated", action="store_true",
                   help="bind beyond localhost without basic auth (anyone who reaches the port can use it)")
    g.add_argument("--threads", type=int, default=THREADS, help="worker threads (default %(default)s)")
    g.add_argument("--read-timeout", type=int, default=READ_TIMEOUT,
                   help="seconds a client connection may stay idle (default %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="(default %(default)s)")
    g = parser.add_argument_group("Label Studio and images")
    g.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="Label Studio's URL, for /data/ image paths (env LABEL_STUDIO_URL)")
    g.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="legacy token or personal access token (env LABEL_STUDIO_API_KEY); sent only to "
                        "Label Studio's own host")
    g.add_argument("--accept-setup-credentials", action="store_true",
                   help="let Label Studio's /setup set the URL and key where none is configured "
                        "(default: off; /setup never replaces a configured one)")
    g.add_argument("--allowed-image-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="also fetch task images from this host, without the API key (repeatable); "
                        "default: only Label Studio's host and --path-map folders")
    g.add_argument("--path-map", action="append", default=[], metavar="URL_PREFIX=FOLDER",
                   help="read images whose URL starts with the prefix from a local folder (repeatable); "
                        "env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT maps /data/local-files/")
    g.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="(default %(default)s)")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="width x height, checked in the image header before decoding (default %(default)s)")
    g.add_argument("--image-timeout", type=float, default=IMAGE_TIMEOUT,
                   help="seconds for a whole image download (default %(default)s)")
    parser.add_argument("--log-level", default="INFO")


def loader_from_args(args) -> ImageLoader:
    """The :class:`ImageLoader` of the options of :func:`add_server_arguments`."""
    try:
        return ImageLoader(args.label_studio_url, args.api_key, _path_map(args.path_map), args.allowed_image_host,
                           accept_setup_credentials=args.accept_setup_credentials, max_bytes=args.max_image_bytes,
                           max_pixels=args.max_image_pixels, timeout=args.image_timeout)
    except ValueError as e:  # a malformed --label-studio-url or --allowed-image-host
        raise SystemExit(str(e))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def basic_auth_from_args(args):
    """(user, password) or None; SystemExit if only one of them is set."""
    password = os.environ.get("BASIC_AUTH_PASS")
    if bool(args.basic_auth_user) != bool(password):
        raise SystemExit("basic auth needs both --basic-auth-user (env BASIC_AUTH_USER) and env BASIC_AUTH_PASS")
    return (args.basic_auth_user, password) if password else None


def serve(backend: LabelStudioBackend, args) -> None:
    """Run ``backend`` with the options of :func:`add_server_arguments` until interrupted."""
    auth = basic_auth_from_args(args)
    if auth is None and not _is_loopback(args.host) and not args.allow_unauthenticated:
        raise SystemExit(f"--host {args.host} is reachable from other machines: set basic auth (env BASIC_AUTH_USER "
                         f"and BASIC_AUTH_PASS, and the same in Label Studio's ML backend settings) or pass "
                         f"--allow-unauthenticated")
    server = make_server(backend, args.host, args.port, basic_auth=auth, threads=args.threads,
                         read_timeout=args.read_timeout, max_body_bytes=args.max_body_bytes)
    logger.info(f"{backend.model_class} ML backend {backend.model_version} at http://{args.host}:"
                f"{server.effective_port} (basic auth {'on' if auth else 'OFF'})")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
