"""Attacks on the running Label Studio ML backend (levelset_d2.label_studio_server with DELSE's
adapter), on loopback only: each is refused or bounded, and after each a good request is served
with the right polygon. The model is a tiny randomly initialised DELSE (fixed seed): its polygons
are arbitrary but deterministic, which is all a check of "served correctly" needs.

Around the server under attack: a fake Label Studio (serves images to ``Token LEGACY`` only, and
redirects, bombs, floods and dribbles on request) and two canaries on other local ports, which
record every request they get: one no image may come from, one allowed as an image host."""
import argparse
import concurrent.futures
from collections import OrderedDict
import json
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import torch

from delse.label_studio import DELSEBackend, ImageLoader
from levelset_d2.label_studio_server import add_server_arguments, make_server, serve

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"
W, H = 160, 90
AUTH = ("labelstudio", "s3cret-pass")
READ_TIMEOUT = 2  # s: idle connections are closed after this (and waitress's 1 s cleanup)
MAX_BODY = 1 << 20
MAX_IMAGE_BYTES = 1 << 20
MAX_PIXELS = 1_000_000
IMAGE_TIMEOUT = 2.0
MAX_CLICKS = 20
NOT_FOUND = "task image not found (or not in a folder this server may read)"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Nucleus" smart="true"/></KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
</View>"""
# The extreme points of the disk of _image() in pixels, and the clicks as Label Studio sends them.
EXTREME = [(60.0, 45.0), (100.0, 45.0), (80.0, 25.0), (80.0, 65.0)]


def _image():
    img = np.full((H, W, 3), 40, np.uint8)
    cv2.circle(img, (80, 45), 20, (200, 180, 160), -1)
    return img


def _png_bomb(side=8000):
    """A valid grayscale PNG of side x side zero pixels: ~60 kB that decode to side^2 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _click(x, y):
    return {"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": W,
            "original_height": H, "value": {"x": (x + 0.5) * 100 / W, "y": (y + 0.5) * 100 / H,
                                            "keypointlabels": ["Nucleus"]}}


_task_ids = iter(range(1000, 10**6))


def _body(url="/data/upload/cell.png", clicks=None):
    """A /predict body for a new task id each time (the backend's image cache is per task, so the
    image is fetched again)."""
    return {"tasks": [{"id": next(_task_ids), "data": {"image": url}}], "label_config": LABEL_CONFIG,
            "params": {"context": {"result": clicks if clicks is not None else [_click(*p) for p in EXTREME]}}}


class _Recorder(BaseHTTPRequestHandler):
    """A canary: answers 200 to everything and records (path, headers)."""

    requests = None  # set per subclass

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append((self.path, dict(self.headers)))
        data = cv2.imencode(".png", _image())[1].tobytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Images for ``Token LEGACY``; /data/upload/redirect?to=URL redirects there; bomb.png,
    huge.png (no Content-Length, 3 MB) and slow.png (a byte every 0.2 s)."""

    canary = allowed = None  # base URLs, set by the fixture

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.headers.get("Authorization") != "Token LEGACY":
            return self._reply(401, b'{"detail": "no"}')
        path, _, query = self.path.partition("?")
        if path == "/data/upload/cell.png":
            return self._reply(200, cv2.imencode(".png", _image())[1].tobytes())
        if path == "/data/upload/bomb.png":
            return self._reply(200, _png_bomb())
        if path == "/data/upload/redirect":
            self.send_response(302)
            self.send_header("Location", query[len("to="):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path in ("/data/upload/huge.png", "/data/upload/slow.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            self.close_connection = True
            try:
                for _ in range(60 if path.endswith("slow.png") else 48):
                    self.wfile.write(b"\x00" * (1 if path.endswith("slow.png") else 65536))
                    self.wfile.flush()
                    if path.endswith("slow.png"):
                        time.sleep(0.2)
            except OSError:
                pass  # the backend hung up: what it should do
            return None
        return self._reply(404, b'{"detail": "not found"}')

    def _reply(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "image/png" if status == 200 else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _start(handler):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture(scope="module")
def predictor():
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return delse.DELSEPredictor(cfg)


@pytest.fixture(scope="module")
def env(predictor, tmp_path_factory):
    """The server under attack and what surrounds it."""
    files = tmp_path_factory.mktemp("ls_files")
    (files / "public").mkdir()
    cv2.imwrite(str(files / "public" / "cell.png"), _image())
    (files / "secret.txt").write_text("outside the mapped folder")
    (files / "public" / "link.png").symlink_to(files / "secret.txt")
    (files / "public" / "big.png").write_bytes(b"\x00" * (MAX_IMAGE_BYTES + 1))
    (files / "public" / "bomb.png").write_bytes(_png_bomb())
    # What the annotator must get back: DELSE's polygon in process, in Label Studio percents.
    poly = predictor.predict(_image(), EXTREME).polygon[:-1]
    expected = np.stack([(poly[:, 0] + 0.5) * 100 / W, (poly[:, 1] + 0.5) * 100 / H], 1)

    canary_log, allowed_log = [], []
    canary_srv, canary = _start(type("Canary", (_Recorder,), {"requests": canary_log}))
    allowed_srv, allowed = _start(type("Allowed", (_Recorder,), {"requests": allowed_log}))
    ls_srv, ls = _start(_FakeLabelStudio)
    loader = ImageLoader(ls, "LEGACY", [("/data/local-files/", str(files / "public"))], [allowed[len("http://"):]],
                         max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_PIXELS, timeout=IMAGE_TIMEOUT)
    backend = DELSEBackend(predictor, "DELSE-test", loader, max_clicks=MAX_CLICKS)
    server = make_server(backend, "127.0.0.1", 0, basic_auth=AUTH, threads=4, read_timeout=READ_TIMEOUT,
                         max_body_bytes=MAX_BODY)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    yield argparse.Namespace(url=url, port=server.effective_port, ls=ls, canary=canary, canary_log=canary_log,
                             allowed=allowed, allowed_log=allowed_log, backend=backend, expected=expected)
    server.close()
    for srv in (canary_srv, allowed_srv, ls_srv):
        srv.shutdown()
        srv.server_close()


def _post(env, body=None, raw=None, auth=AUTH, path="/predict", timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    r = requests.post(env.url + path, data=data, auth=auth, timeout=timeout,
                      headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


def _assert_good(env, url="/data/upload/cell.png"):
    """A good request is served, with DELSE's polygon."""
    status, out = _post(env, _body(url))
    assert status == 200, out
    region = out["results"][0]["result"][0]
    np.testing.assert_allclose(region["value"]["points"], env.expected, atol=1e-4)


def _raw_http(env, request: bytes, timeout=10.0) -> bytes:
    """Send bytes on a fresh connection; the server's answer (until it closes or 1 s of silence)."""
    data = b""
    with socket.create_connection(("127.0.0.1", env.port), timeout=timeout) as s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before the body ended
            pass
        try:
            data = s.recv(65536)
            s.settimeout(1.0)
            while True:
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except (socket.timeout, ConnectionResetError):
            pass
    return data


def _auth_header():
    import base64

    return b"Authorization: Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()) + b"\r\n"


def test_good_request_and_endpoints(env):
    _assert_good(env)  # through Label Studio's host, with its key
    _assert_good(env, "/data/local-files/?d=cell.png")  # through the path map
    r = requests.get(env.url + "/health", auth=AUTH, timeout=10)
    assert r.json() == {"status": "UP", "model_class": "DELSE", "model_version": "DELSE-test"}


def test_basic_auth_is_required(env):
    for auth in (None, (AUTH[0], "wrong"), ("other", AUTH[1]), (AUTH[0], AUTH[1] + "x")):
        for method, path in (("get", "/health"), ("post", "/predict"), ("post", "/setup")):
            r = getattr(requests, method)(env.url + path, auth=auth, timeout=10, json=_body())
            assert r.status_code == 401, (auth, path, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Basic") and "basic auth" in r.json()["error"]
    # A bearer token where basic auth is expected.
    r = requests.get(env.url + "/health", headers={"Authorization": "Bearer x"}, timeout=10)
    assert r.status_code == 401
    _assert_good(env)


def test_negative_and_huge_content_length(env):
    for length, status in ((b"-1", b"400"), (b"-99999999", b"400"), (b"1000000000000", b"413"),
                           (str(MAX_BODY + 1).encode(), b"413"), (b"12abc", b"400")):
        t0 = time.perf_counter()
        answer = _raw_http(env, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + _auth_header()
                           + b"Content-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n{}")
        assert answer.split(b"\r\n")[0].split(b" ")[1] == status, (length, answer[:300])
        assert time.perf_counter() - t0 < 5  # answered without waiting for a body that never comes
        _assert_good(env)
    # A body over the limit that is really sent, chunked (no Content-Length to check up front).
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(MAX_BODY // len(chunk) + 2)) + b"0\r\n\r\n"
    answer = _raw_http(env, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + _auth_header()
                       + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert answer.split(b"\r\n")[0].split(b" ")[1] == b"413", answer[:300]
    _assert_good(env)


def test_slow_clients_hold_no_worker_and_are_disconnected(env):
    # More slow clients than worker threads (4), each stuck in the middle of its headers.
    slow = []
    for _ in range(12):
        s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")
        slow.append(s)
    t0 = time.perf_counter()
    _assert_good(env)
    assert time.perf_counter() - t0 < 10
    # A client that sent its headers and half of its body and then went quiet.
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" + _auth_header() + b"Content-Length: 100\r\n\r\n{\"ta")
    slow.append(s)
    _assert_good(env)
    # The server hangs up on each after READ_TIMEOUT idle seconds (checked every second).
    deadline = time.perf_counter() + READ_TIMEOUT + 5
    for s in slow:
        s.settimeout(max(0.1, deadline - time.perf_counter()))
        try:
            assert s.recv(100) == b""  # closed, nothing sent
        except ConnectionResetError:
            pass
        s.close()
    assert time.perf_counter() < deadline
    _assert_good(env)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b"null", b'"tasks"', b"42",
                                 b"[" * 100000 + b"]" * 100000, b'{"tasks": [1, 2]}', b'{"tasks": {"0": {}}}'])
def test_bodies_that_are_not_a_predict_request(env, raw):
    status, out = _post(env, raw=raw)
    assert status == 400, out
    assert "Traceback" not in out["error"] and "File " not in out["error"]
    _assert_good(env)


def test_ssrf_to_other_local_ports_never_connects(env):
    before = len(env.canary_log)
    host, port = env.canary[len("http://"):].split(":")
    for url in (env.canary + "/secret", f"http://localhost:{port}/secret", f"http://[::1]:{port}/secret",
                f"http://127.0.0.1:{port}@evil/x", f"http://0x7f000001:{port}/x", "http://169.254.169.254/latest/meta-data/",
                # Label Studio's own host name, but another port
                f"http://127.0.0.1:{int(port) + 1 if int(port) < 65535 else 1}/x",
                "file:///etc/passwd", "gopher://127.0.0.1:70/x", "ftp://127.0.0.1/x"):
        status, out = _post(env, _body(url))
        assert status in (400, 403), (url, status, out)
        assert "/etc" not in out["error"], out
        _assert_good(env)
    assert len(env.canary_log) == before, env.canary_log


def test_redirects_stay_on_allowed_hosts_and_never_carry_the_key(env):
    before = len(env.canary_log)
    # Label Studio's host redirects to a host that is not allowed: refused, nothing sent there.
    status, out = _post(env, _body(f"/data/upload/redirect?to={env.canary}/steal"))
    assert status == 403 and "redirects to a host that is not allowed" in out["error"], out
    assert env.canary not in out["error"]
    assert len(env.canary_log) == before
    _assert_good(env)
    # ... to an allowed image host: followed, without Label Studio's key.
    n = len(env.allowed_log)
    status, out = _post(env, _body(f"/data/upload/redirect?to={env.allowed}/image.png"))
    assert status == 200, out
    np.testing.assert_allclose(out["results"][0]["result"][0]["value"]["points"], env.expected, atol=1e-4)
    assert len(env.allowed_log) == n + 1
    path, headers = env.allowed_log[-1]
    assert path == "/image.png" and not any(k.lower() in ("authorization", "cookie") for k in headers), headers
    # An absolute URL to the allowed host: no key either.
    status, out = _post(env, _body(env.allowed + "/direct.png"))
    assert status == 200 and not any(k.lower() == "authorization" for k in env.allowed_log[-1][1])
    _assert_good(env)


def test_setup_cannot_hijack_label_studio_credentials(env):
    loader = env.backend.loader
    configured = (loader.label_studio_url, loader.api_key)
    hijack = {"project": "1.1", "schema": LABEL_CONFIG, "hostname": env.canary, "access_token": "attacker"}
    status, out = _post(env, hijack, auth=None, path="/setup")
    assert status == 401
    status, out = _post(env, hijack, path="/setup")  # even with the password: nothing replaced
    assert status == 200 and out == {"model_version": "DELSE-test"}
    assert (loader.label_studio_url, loader.api_key) == configured
    before = len(env.canary_log)
    _assert_good(env)  # the relative /data/upload/ URL still goes to Label Studio, with its key
    assert len(env.canary_log) == before
    # A loader without Label Studio configured takes nothing from /setup unless the operator allows it.
    bare = ImageLoader()
    bare.use_setup_credentials(env.canary, "attacker")
    assert (bare.label_studio_url, bare.api_key) == (None, None)


@pytest.mark.parametrize("url", [
    "/data/local-files/?d=../secret.txt", "/data/local-files/?d=../../../../../../etc/passwd",
    "/data/local-files/?d=%2e%2e/secret.txt", "/data/local-files/?d=/etc/passwd",
    "/data/local-files/?d=link.png",  # a symlink inside the folder to a file outside it
    "/data/local-files/?d=.", "/data/local-files/?d=", "/data/local-files/?xd=cell.png",
    "/data/local-files/?d=missing.png", "/data/local-files/..%2fsecret.txt", "/data/local-files/?d=cell.png%00.txt",
])
def test_path_map_reads_one_answer_for_missing_and_not_allowed(env, url):
    status, out = _post(env, _body(url))
    assert (status, out) == (404, {"error": NOT_FOUND}), (url, status, out)
    _assert_good(env)


def test_image_size_caps(env):
    for url, words in (("/data/local-files/?d=big.png", "larger than this server's limit"),
                       ("/data/upload/huge.png", "larger than this server's limit")):
        t0 = time.perf_counter()
        status, out = _post(env, _body(url))
        assert status == 413 and words in out["error"], (url, out)
        assert time.perf_counter() - t0 < 5
        _assert_good(env)
    # A download that dribbles: cut at the time cap.
    t0 = time.perf_counter()
    status, out = _post(env, _body("/data/upload/slow.png"))
    assert status == 504 and f"within {IMAGE_TIMEOUT:g} s" in out["error"], out
    assert time.perf_counter() - t0 < IMAGE_TIMEOUT + 3
    _assert_good(env)


def test_decompression_bomb_is_refused_from_its_header(env):
    bomb = _png_bomb()
    assert len(bomb) < 200_000  # 64 megapixels in under 200 kB
    for url in ("/data/upload/bomb.png", "/data/local-files/?d=bomb.png"):
        t0 = time.perf_counter()
        status, out = _post(env, _body(url))
        assert status == 413 and out["error"] == (f"the task image has 8000 x 8000 pixels, more than this "
                                                  f"server's limit of {MAX_PIXELS} (--max-image-pixels)"), out
        assert time.perf_counter() - t0 < 5
        _assert_good(env)


def test_too_many_clicks_are_refused_before_any_model_pass(env):
    clicks = [_click(60 + i % 40, 25 + i % 40) for i in range(500)]
    t0 = time.perf_counter()
    status, out = _post(env, _body(clicks=clicks))
    assert status == 422 and f"limit of {MAX_CLICKS} clicks" in out["error"], out
    assert time.perf_counter() - t0 < 2  # 496 drags would take minutes
    # At the limit: served (4 extreme points + 16 drags).
    status, out = _post(env, _body(clicks=[_click(*p) for p in EXTREME] + [_click(85, 30 + i) for i in range(16)]))
    assert status == 200 and len(out["results"][0]["result"]) == 1
    _assert_good(env)


def test_internal_errors_show_no_internals(env, monkeypatch):
    class Broken:
        def predict(self, *args):
            raise RuntimeError("/srv/secret/model.pth: boom")

    monkeypatch.setattr(env.backend, "predictor", Broken())
    monkeypatch.setattr(env.backend, "_states", OrderedDict())  # no kept state to continue from
    status, out = _post(env, _body())
    assert status == 500 and out == {"error": "internal error of the ML backend (details in its log)"}
    monkeypatch.undo()
    _assert_good(env)


def test_a_flood_of_new_objects_keeps_a_bounded_number_of_states(env):
    """A stranger's 30 objects (one task id each): the backend keeps the states of 8 of them, no more, and a
    good request is served after."""
    for _ in range(30):
        assert _post(env, _body())[0] == 200  # _body: a new task id each time
    assert len(env.backend._states) == 8
    _assert_good(env)


def test_flood_of_concurrent_requests(env):
    """100 requests at once (25x the worker threads): each answered, the good ones correctly."""
    def one(i):
        if i % 2:
            return _post(env, raw=b"{not json")[0]
        status, out = _post(env, _body(), timeout=120)
        assert status == 200
        np.testing.assert_allclose(out["results"][0]["result"][0]["value"]["points"], env.expected, atol=1e-4)
        return status

    workers = {t for t in threading.enumerate() if t.name.startswith("waitress-")}
    assert len(workers) >= 4  # this server's 4 (other tests' servers may still be up)
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(one, range(100)))
    assert statuses == [200, 400] * 50
    # Served by the servers' existing worker threads, not a thread per connection.
    assert {t for t in threading.enumerate() if t.name.startswith("waitress-")} == workers
    _assert_good(env)


def test_binding_beyond_localhost_needs_basic_auth(env, monkeypatch):
    monkeypatch.delenv("BASIC_AUTH_USER", raising=False)
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert "default 127.0.0.1" in " ".join(parser.format_help().split())
    assert parser.parse_args([]).host == "127.0.0.1"
    with pytest.raises(SystemExit, match="reachable from other machines"):
        serve(env.backend, parser.parse_args(["--host", "0.0.0.0"]))
    monkeypatch.setenv("BASIC_AUTH_PASS", "x")
    with pytest.raises(SystemExit, match="needs both"):
        serve(env.backend, parser.parse_args(["--host", "0.0.0.0"]))
