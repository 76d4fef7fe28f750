"""The Label Studio ML backend (delse.label_studio) without Label Studio: coordinates, point
assignment, replayed drags against direct DELSEPredictor calls, image fetching with both kinds of
API key from a fake Label Studio, and errors that leave the server serving. A tiny randomly
initialised DELSE model: its polygons are arbitrary but deterministic, which is all these need."""
import itertools
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from delse.label_studio import (
    DELSEBackend,
    ImageLoader,
    assign_extreme_points,
    make_server,
    percent_to_pixel,
    pixel_to_percent,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"
W, H = 160, 90  # non-square on purpose

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Nucleus" smart="true"/>
  </KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
  <BrushLabels name="brush" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""


def _image():
    img = np.full((H, W, 3), 40, np.uint8)
    cv2.circle(img, (80, 45), 20, (200, 180, 160), -1)
    return img


@pytest.fixture(scope="module")
def predictor():
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return delse.DELSEPredictor(cfg)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ls_images")
    cv2.imwrite(str(d / "cell.png"), _image())
    return d


@pytest.fixture(scope="module")
def server(predictor, image_dir):
    backend = DELSEBackend(predictor, "DELSE-test", ImageLoader(path_map=[("/data/upload/", str(image_dir))]))
    srv = make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=srv.run, daemon=True).start()
    yield f"http://127.0.0.1:{srv.effective_port}", backend
    srv.close()


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _click(x_pct, y_pct, label="Nucleus", positive=True):
    return {"id": "k", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
            "original_width": W, "original_height": H, "is_positive": positive,
            "value": {"x": x_pct, "y": y_pct, "width": 0.5, "keypointlabels": [label]}}


def _body(clicks, url="/data/upload/cell.png", config=LABEL_CONFIG):
    return {"tasks": [{"id": 7, "data": {"image": url}}], "project": "1.1", "label_config": config,
            "params": {"context": {"result": clicks}}}


# Extreme points of the disk, in pixels and as the percents Label Studio sends (hand-computed:
# percent = (pixel + 0.5) * 100 / size, W = 160, H = 90).
LEFT, RIGHT, TOP, BOTTOM = (60.0, 45.0), (100.0, 45.0), (80.0, 25.0), (80.0, 65.0)
PCT = {LEFT: (37.8125, 50.5555556), RIGHT: (62.8125, 50.5555556),
       TOP: (50.3125, 28.3333333), BOTTOM: (50.3125, 72.7777778)}


def test_percent_pixel_conversion_non_square():
    # Pixel i spans [i, i + 1) of Label Studio's continuous frame: its centre is i + 0.5.
    assert percent_to_pixel(25.0, 50.0, 200, 100) == pytest.approx((49.5, 49.5))
    assert percent_to_pixel(0.0, 0.0, 200, 100) == pytest.approx((-0.5, -0.5))
    assert percent_to_pixel(100.0, 100.0, 200, 100) == pytest.approx((199.5, 99.5))
    np.testing.assert_allclose(pixel_to_percent([[49.5, 49.5], [0, 0], [199, 99]], 200, 100),
                               [[25.0, 50.0], [0.25, 0.5], [99.75, 99.5]])
    for px, (x, y) in PCT.items():
        assert percent_to_pixel(x, y, W, H) == pytest.approx(px, abs=1e-5)


@pytest.mark.parametrize("points,expected", [
    ([LEFT, RIGHT, TOP, BOTTOM], [LEFT, RIGHT, TOP, BOTTOM]),
    # A thin diagonal object: left and top are neighbours, so is right and bottom.
    ([(0, 1), (10, 9), (1, 0), (9, 10)], [(0, 1), (10, 9), (1, 0), (9, 10)]),
])
def test_extreme_point_assignment_any_order(points, expected):
    for perm in itertools.permutations(points):
        np.testing.assert_array_equal(assign_extreme_points(perm), expected, err_msg=str(perm))


def _nearest_vertex(polygons, target):
    best, best_d = None, np.inf
    for poly in polygons:
        for v in poly:
            d = (v[0] - target[0]) ** 2 + (v[1] - target[1]) ** 2
            if d < best_d:
                best, best_d = v, d
    return best


def test_replayed_drags_match_direct_calls(server, predictor):
    url, _ = server
    drags = [(104.0, 52.0), (70.0, 20.0)]  # pixels; percents below by (p + 0.5) * 100 / size
    drag_pct = [((x + 0.5) * 100 / W, (y + 0.5) * 100 / H) for x, y in drags]
    # Clicks in a shuffled order: assignment is by geometry.
    clicks = [_click(*PCT[p]) for p in (BOTTOM, LEFT, TOP, RIGHT)]
    status, four = _post(url + "/predict", _body(clicks))
    assert status == 200
    expected = predictor.predict(_image(), [LEFT, RIGHT, TOP, BOTTOM])
    region = four["results"][0]["result"][0]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Nucleus"]
    assert region["value"]["closed"] and (region["original_width"], region["original_height"]) == (W, H)
    poly = expected.polygon[:-1]  # find_contours closes the contour; Label Studio's is implicit
    np.testing.assert_allclose(region["value"]["points"],
                               np.stack([(poly[:, 0] + 0.5) * 100 / W, (poly[:, 1] + 0.5) * 100 / H], 1),
                               atol=1e-4)
    for k in range(1, len(drags) + 1):
        status, out = _post(url + "/predict", _body(clicks + [_click(*p) for p in drag_pct[:k]]))
        assert status == 200
        direct = predictor.correct(tuple(_nearest_vertex(expected.polygons, drags[k - 1])), drags[k - 1])
        expected = direct
        poly = direct.polygon[:-1]
        np.testing.assert_allclose(out["results"][0]["result"][0]["value"]["points"],
                                   np.stack([(poly[:, 0] + 0.5) * 100 / W, (poly[:, 1] + 0.5) * 100 / H], 1),
                                   atol=1e-4)
    # The same five clicks once more after another task's request: the same polygon.
    _post(url + "/predict", {**_body(clicks), "tasks": [{"id": 8, "data": {"image": "/data/upload/cell.png"}}]})
    status, again = _post(url + "/predict", _body(clicks + [_click(*p) for p in drag_pct]))
    assert again["results"][0]["result"][0]["value"]["points"] == out["results"][0]["result"][0]["value"]["points"]


class _Counting:
    """A predictor that counts its passes (everything else is the wrapped one's)."""

    def __init__(self, predictor):
        self.predictor, self.calls = predictor, {"predict": 0, "correct": 0}

    def predict(self, *args, **kwargs):
        self.calls["predict"] += 1
        return self.predictor.predict(*args, **kwargs)

    def correct(self, *args, **kwargs):
        self.calls["correct"] += 1
        return self.predictor.correct(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.predictor, name)


@pytest.mark.parametrize("state_cache, passes", [(8, {"predict": 2, "correct": 1}), (1, {"predict": 3, "correct": 1}),
                                                 (0, {"predict": 3, "correct": 1})])
def test_going_back_to_an_earlier_object_continues_its_kept_state(predictor, image_dir, state_cache, passes):
    """Object A (task 7), object B (task 8, the same image), then a drag on A: with the states of the last
    objects kept, A's drag is one correct() on A's state (no replay of its 4 clicks); keeping one state (B's)
    or none replays A. Every way gives the polygon of a direct predict + correct on A."""
    counting = _Counting(predictor)
    backend = DELSEBackend(counting, "t", ImageLoader(path_map=[("/data/upload/", str(image_dir))]),
                           state_cache=state_cache)
    clicks = [_click(*PCT[p]) for p in (LEFT, RIGHT, TOP, BOTTOM)]
    drag = (104.0, 52.0)
    drag_click = _click((drag[0] + 0.5) * 100 / W, (drag[1] + 0.5) * 100 / H)

    def request(task_id, regions):
        task = {"id": task_id, "data": {"image": "/data/upload/cell.png"}}
        return backend.predict_tasks([task], {"result": regions}, LABEL_CONFIG)[0]["result"][0]["value"]["points"]

    request(7, clicks)
    request(8, [_click(*PCT[p]) for p in (LEFT, RIGHT, TOP, BOTTOM)][:3] + [_click(50.3125, 70.0)])  # another object
    points = request(7, clicks + [drag_click])
    assert counting.calls == passes
    first = predictor.predict(_image(), [LEFT, RIGHT, TOP, BOTTOM])
    poly = predictor.correct(tuple(_nearest_vertex(first.polygons, drag)), drag).polygon[:-1]
    np.testing.assert_allclose(points, np.stack([(poly[:, 0] + 0.5) * 100 / W, (poly[:, 1] + 0.5) * 100 / H], 1),
                               atol=1e-4)


def test_a_negative_state_cache_is_refused(predictor):
    with pytest.raises(ValueError, match="state_cache"):
        DELSEBackend(predictor, "t", state_cache=-1)


def test_fewer_than_four_points_and_negative_clicks(server):
    url, _ = server
    three = [_click(*PCT[p]) for p in (LEFT, RIGHT, TOP)]
    status, out = _post(url + "/predict", _body(three))
    assert status == 200 and out["results"][0]["result"] == []
    status, out = _post(url + "/predict", _body(three + [_click(*PCT[BOTTOM], positive=False)]))
    assert status == 200 and out["results"][0]["result"] == []
    # No context at all (pre-annotation): one empty prediction per task.
    status, out = _post(url + "/predict", {"tasks": [{"id": 1, "data": {}}, {"id": 2, "data": {}}]})
    assert status == 200 and [r["result"] for r in out["results"]] == [[], []]


def test_brush_output_is_label_studios_rle(predictor, image_dir):
    brush = pytest.importorskip("label_studio_sdk.converter.brush")
    backend = DELSEBackend(predictor, "v", ImageLoader(path_map=[("/data/upload/", str(image_dir))]), output="brush")
    out = backend.predict(_body([_click(*PCT[p]) for p in (LEFT, RIGHT, TOP, BOTTOM)]))
    region = out["results"][0]["result"][0]
    assert region["type"] == "brushlabels" and region["from_name"] == "brush"
    decoded = brush.decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3]
    expected = predictor.predict(_image(), [LEFT, RIGHT, TOP, BOTTOM]).mask
    np.testing.assert_array_equal(decoded > 0, expected)


def test_endpoints(server):
    url, _ = server
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "UP", "model_class": "DELSE", "model_version": "DELSE-test"}
    assert _post(url + "/setup", {"project": "1.1", "schema": LABEL_CONFIG}) == (200, {"model_version": "DELSE-test"})
    assert _post(url + "/webhook", {"action": "ANNOTATION_CREATED"}) == (200, {})
    status, out = _post(url + "/nothing", {})
    assert status == 404 and "/predict" in out["error"]


def test_bad_requests_answer_errors_and_the_server_keeps_serving(server):
    url, _ = server
    good = _body([_click(*PCT[p]) for p in (LEFT, RIGHT, TOP, BOTTOM)])
    no_kp = LABEL_CONFIG.replace("KeyPointLabels", "RectangleLabels")
    closed_port = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    dead = f"http://127.0.0.1:{closed_port.server_address[1]}/missing.png"
    closed_port.server_close()
    cases = [
        (None, b"{not json", 400, "not JSON"),
        ({"tasks": "x"}, None, 400, "'tasks'"),
        ({**good, "params": {"context": {"result": 3}}}, None, 400, "'result' list"),
        (_body(good["params"]["context"]["result"], config="<View><Image"), None, 400, "not valid XML"),
        (_body(good["params"]["context"]["result"], config=no_kp), None, 400, "KeyPointLabels"),
        (_body([{**_click(1, 2), "value": {"x": "a"}}] * 4), None, 400, "numeric 'x'"),
        # Not Label Studio's host nor an allowed one: refused before any connection.
        (_body(good["params"]["context"]["result"], url=dead), None, 403, "'127.0.0.1' is not allowed"),
        (_body(good["params"]["context"]["result"], url="/data/other/1.png"), None, 500, "LABEL_STUDIO_URL"),
        # Outside the mapped folder and missing: one answer, no path in it.
        (_body(good["params"]["context"]["result"], url="/data/upload/../../etc/passwd"), None, 404, "not found"),
        (_body(good["params"]["context"]["result"], url="/data/upload/none.png"), None, 404, "not found"),
        ({**good, "tasks": [{"id": 3, "data": {"img": "x"}}]}, None, 400, "'image'"),
    ]
    for body, raw, status, words in cases:
        got, out = _post(url + "/predict", body, raw=raw)
        assert got == status and words in out["error"], (body, raw, got, out)
        assert "/tmp" not in out["error"] and "etc/passwd" not in out["error"], out
        got, out = _post(url + "/predict", good)
        assert got == 200 and len(out["results"][0]["result"]) == 1


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Serves /data/upload/1/cell.png to ``Token LEGACY`` or ``Bearer ACCESS``; exchanges the
    refresh token PAT at /api/token/refresh/."""

    image = b""
    pat = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"
    refreshes = 0

    def log_message(self, *args):
        pass

    def _reply(self, status, data, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/token/refresh/" and body.get("refresh") == self.pat:
            type(self).refreshes += 1
            # exp far in the future: {"exp": 4102444800} base64url-encoded
            return self._reply(200, json.dumps({"access": "h.eyJleHAiOiA0MTAyNDQ0ODAwfQ.s"}).encode())
        self._reply(401, b'{"detail": "bad refresh token"}')

    def do_GET(self):
        if self.headers.get("Authorization") not in ("Token LEGACY", "Bearer h.eyJleHAiOiA0MTAyNDQ0ODAwfQ.s"):
            return self._reply(401, b'{"detail": "no"}')
        if self.path != "/data/upload/1/cell.png":
            return self._reply(404, b'{"detail": "not found"}')
        self._reply(200, self.image, "image/png")


@pytest.fixture(scope="module")
def fake_ls():
    _FakeLabelStudio.image = cv2.imencode(".png", _image())[1].tobytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_image_loader_legacy_token_and_personal_access_token(fake_ls):
    from delse.label_studio import BackendError

    for key in ("LEGACY", _FakeLabelStudio.pat):
        loader = ImageLoader(fake_ls, key)
        np.testing.assert_array_equal(loader.fetch("/data/upload/1/cell.png"), _image())
        # An absolute URL to the same Label Studio gets the key too.
        np.testing.assert_array_equal(loader.fetch(fake_ls + "/data/upload/1/cell.png"), _image())
    assert _FakeLabelStudio.refreshes == 1  # the access token is kept until it expires
    for key, words in [("WRONG", "refused the API key"), ("a.b.c", "refused LABEL_STUDIO_API_KEY")]:
        with pytest.raises(BackendError, match=words) as e:
            ImageLoader(fake_ls, key).fetch("/data/upload/1/cell.png")
        assert e.value.status == 502
    with pytest.raises(BackendError, match="set LABEL_STUDIO_API_KEY") as e:
        ImageLoader(fake_ls).fetch("/data/upload/1/cell.png")
    with pytest.raises(BackendError, match="did not return the task image") as e:
        ImageLoader(fake_ls, "LEGACY").fetch("/data/upload/1/other.png")
    # Label Studio's /setup hands its URL and a token: used only where the operator allows it and
    # none was configured.
    loader = ImageLoader()
    loader.use_setup_credentials(fake_ls, "LEGACY")
    assert (loader.label_studio_url, loader.api_key) == (None, None)
    loader = ImageLoader(accept_setup_credentials=True)
    loader.use_setup_credentials(fake_ls, "LEGACY")
    np.testing.assert_array_equal(loader.fetch("/data/upload/1/cell.png"), _image())
    loader.use_setup_credentials("http://127.0.0.1:1", "OTHER")  # a second /setup replaces nothing
    assert (loader.label_studio_url, loader.api_key) == (fake_ls, "LEGACY")
