"""DELSE in a real Label Studio: a small DELSE R-18 nuclei model trained here, Label Studio 1.23 from
its own venv (`make label-studio`) on SQLite in a tmp dir (tests/_label_studio.py), the backend
(`delse-serve`) connected as an interactive ML backend with basic auth on, and the requests the
browser's smart keypoint tool makes (`/api/ml/{id}/interactive-annotating`) on a real dsb2018 dev image uploaded
through the REST API. With env CI set, missing shared data or Label Studio fail instead of skipping.

Optional: env DELSE_LS_SCREENSHOT=<png path> also saves the returned polygon in Label Studio's
editor, rendered by headless Chromium (python package playwright + a system chromium)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from levelset_d2.datasets import shared_data_root
from _label_studio import api_session, connect_backend, missing, start_backend, stop

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_root()
CONFIG = REPO / "configs/DELSE/delse_R_18_dsb2018.yaml"
# ~0.6 s per iteration on 2 CPU cores: about 2 minutes. Measured at 200 iterations: mIoU 0.83 on
# the 12 objects below (the full config trains 3000).
TRAIN_OPTS = ["SOLVER.MAX_ITER", "200", "MODEL.DELSE.PRETRAIN_ITERS", "120", "SOLVER.STEPS", "()",
              "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SEED", "0",
              "MODEL.DEVICE", "cpu"]
N_OBJECTS = 12

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Nucleus" smart="true" background="#ff6600"/>
  </KeyPointLabels>
  <PolygonLabels name="poly" toName="image" strokeWidth="2">
    <Label value="Nucleus" background="#ff6600"/>
  </PolygonLabels>
</View>"""

pytestmark = pytest.mark.slow


def _gt_mask(ann, height, width):
    seg = ann["segmentation"]
    if isinstance(seg, dict) and isinstance(seg["counts"], list):
        seg = mask_util.frPyObjects(seg, height, width)
    elif isinstance(seg, list):
        seg = mask_util.merge(mask_util.frPyObjects(seg, height, width))
    return mask_util.decode(seg).astype(bool)


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def _polygon_mask(points_pct, width, height):
    """Label Studio polygon (percent) -> (H, W) bool, rasterised by pycocotools (continuous
    coordinates: pixel i spans [i, i + 1), which is Label Studio's percent frame times the size)."""
    xy = np.asarray(points_pct, dtype=np.float64) * [width / 100.0, height / 100.0]
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([xy.ravel().tolist()], height, width))).astype(bool)


def _extreme_clicks(gt):
    """Left-, right-most, top and bottom GT pixels (first of ties), as (x, y) pixel indices."""
    ys, xs = np.nonzero(gt)
    picks = [np.argmin(xs), np.argmax(xs), np.argmin(ys), np.argmax(ys)]
    return [(float(xs[i]), float(ys[i])) for i in picks]


def _gt_boundary(gt):
    contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return np.concatenate([c[:, 0, :] for c in contours]).astype(np.float64)


def _drag_target(gt, polygon_xy):
    """The simulated annotator's 5th click: the GT boundary pixel farthest from the polygon."""
    g = _gt_boundary(gt)
    d = np.sqrt(((g[:, None, :] - np.asarray(polygon_xy)[None]) ** 2).sum(-1)).min(1)
    return tuple(g[int(d.argmax())]), float(d.max())


def _assert_same_polygon(returned_xy, expected_xy, width, height):
    """Label Studio's polygon (pixel (x, y), from percents rounded to 1e-4) is the in-process
    DELSEPredictor polygon, less find_contours' repeated closing vertex."""
    expected = np.asarray(expected_xy, dtype=np.float64)
    if len(expected) > 1 and np.allclose(expected[0], expected[-1]):
        expected = expected[:-1]
    tol = 1e-4 * max(width, height) / 100.0 + 1e-6  # the percent rounding, in pixels
    assert returned_xy.shape == expected.shape, (returned_xy.shape, expected.shape)
    np.testing.assert_allclose(returned_xy, expected, rtol=0, atol=tol)


def _distance_to(polygon_xy, point):
    """Pixels from ``point`` (x, y) to the nearest vertex of a (K, 2) polygon."""
    return float(np.sqrt(((np.asarray(polygon_xy) - np.asarray(point)) ** 2).sum(1)).min())


@pytest.fixture(scope="session")
def dsb2018():
    d = SHARED_DATA / "dsb2018"
    if not (d / "dev.json").exists():
        missing(f"dsb2018 not found at {d} (set LEVELSET_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def trained_delse(dsb2018, request):
    """A small DELSE R-18 nuclei model (cached in pytest's cache, keyed on config and options),
    its mIoU on N_OBJECTS dev nuclei from their GT extreme points, and the object the e2e test
    annotates."""
    import delse
    from delse.label_studio import nearest_contour_point

    configs = [CONFIG, *sorted(CONFIG.parent.glob("Base-*.yaml"))]  # the file and its _BASE_s
    key = hashlib.sha256(("".join(c.read_text() for c in configs) + json.dumps(TRAIN_OPTS)).encode()).hexdigest()[:12]
    out = Path(request.config.cache.mkdir(f"delse_label_studio_{key}"))
    weights = out / "model_final.pth"
    if not weights.exists():
        cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *TRAIN_OPTS,
               "OUTPUT_DIR", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
        assert proc.returncode == 0 and weights.exists(), proc.stderr[-3000:]

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cpu"
    predictor = delse.DELSEPredictor(cfg)
    dev = json.loads((dsb2018 / "dev.json").read_text())
    images = {im["id"]: im for im in dev["images"]}
    anns = sorted((a for a in dev["annotations"] if a["area"] >= 300 and not a.get("iscrowd")), key=lambda a: a["id"])
    objects = []
    for ann in anns[::max(1, len(anns) // N_OBJECTS)][:N_OBJECTS]:
        im = images[ann["image_id"]]
        image = cv2.imread(str(dsb2018 / "images" / im["file_name"]))
        gt = _gt_mask(ann, im["height"], im["width"])
        clicks = _extreme_clicks(gt)
        W, H = im["width"], im["height"]
        # IoU of the polygon, as the test measures Label Studio's answer (percent = (pixel + 0.5) * 100 / size)
        r = predictor.predict(image, clicks)
        iou4 = _iou(_polygon_mask((r.polygon + 0.5) * 100 / [W, H], W, H), gt)
        target, dist4 = _drag_target(gt, r.polygon)
        r5 = predictor.correct(tuple(nearest_contour_point(r.polygons, target)), target)
        iou5 = _iou(_polygon_mask((r5.polygon + 0.5) * 100 / [W, H], W, H), gt)
        dist5 = _distance_to(r5.polygon, target)
        objects.append({"ann": ann, "image": im, "gt": gt, "clicks": clicks, "iou": iou4, "iou_drag": iou5,
                        "dist": dist4, "dist_drag": dist5,
                        "polygon": r.polygon.copy(), "polygon_drag": r5.polygon.copy()})
    miou = float(np.mean([o["iou"] for o in objects]))
    # A broken training must fail here, not pass with a trivially low threshold.
    assert miou >= 0.6, f"the fixture's DELSE model reaches only mIoU {miou:.3f} on {len(objects)} dev objects"
    # The annotated object: the largest of those where one simulated drag does not lower the IoU
    # and moves the contour towards the drag target (a model trained for 2 minutes, whose weights
    # differ across machines by float rounding: its drag helps on most small nuclei, not all; the
    # fixture prints how many). The test checks Label Studio's answers against these in-process ones.
    helped = [o for o in objects if o["iou_drag"] >= o["iou"] and o["dist_drag"] < o["dist"]]
    assert helped, "no measured object where a drag does not lower the IoU and moves the contour to its target"
    target = max(helped, key=lambda o: o["ann"]["area"])
    print(f"\nDELSE fixture model: mIoU {miou:.3f} over {len(objects)} dev objects, a drag helps on "
          f"{len(helped)}; annotating ann {target['ann']['id']} (IoU {target['iou']:.3f} -> {target['iou_drag']:.3f}, "
          f"target {target['dist']:.1f} px -> {target['dist_drag']:.1f} px from the contour)")
    return {"weights": weights, "miou": miou, "object": target, "n": len(objects)}


@pytest.fixture(scope="session")
def backend(trained_delse, label_studio, tmp_path_factory):
    """``delse-serve`` (``python -m delse.label_studio``) with basic auth, as a subprocess."""
    url, pat, _, _ = label_studio
    log = tmp_path_factory.mktemp("delse_backend") / "backend.log"
    ml_url, proc = start_backend("delse.label_studio", ["--config-file", str(CONFIG), "--weights",
                                                        str(trained_delse["weights"])], url, pat, log)
    try:
        yield ml_url, log
    finally:
        stop(proc)


def test_delse_in_label_studio(trained_delse, label_studio, backend, dsb2018):
    ls_url, pat, login, ls_log = label_studio
    ml_url, backend_log = backend
    api = api_session(ls_url, pat)

    r = api.post(ls_url + "/api/projects", json={"title": "DELSE nuclei", "label_config": LABEL_CONFIG}, timeout=30)
    assert r.status_code == 201, r.text[:500]
    project = r.json()["id"]
    obj = trained_delse["object"]
    W, H = obj["image"]["width"], obj["image"]["height"]
    name = obj["image"]["file_name"]
    with open(dsb2018 / "images" / name, "rb") as f:
        r = api.post(f"{ls_url}/api/projects/{project}/import", files={"file": (name, f, "image/png")}, timeout=60)
    assert r.status_code == 201, r.text[:500]
    task = api.get(f"{ls_url}/api/tasks", params={"project": project}, timeout=30).json()["tasks"][0]
    assert task["data"]["image"].startswith("/data/upload/")  # fetched by the backend with the PAT
    ml = connect_backend(api, ls_url, ml_url, project, "DELSE", interactive=True)

    def click(x, y):  # what the smart KeyPointLabels tool sends, in percent of the image
        return {"id": f"k{len(clicks)}", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
                "original_width": W, "original_height": H, "image_rotation": 0, "is_positive": True,
                "value": {"x": (x + 0.5) * 100 / W, "y": (y + 0.5) * 100 / H, "width": 0.4,
                          "keypointlabels": ["Nucleus"]}}

    def annotate():
        r = api.post(f"{ls_url}/api/ml/{ml}/interactive-annotating",
                     json={"task": task["id"], "context": {"result": clicks}}, timeout=120)
        assert r.status_code == 200 and "errors" not in r.json(), (r.text[:1000], Path(backend_log).read_text()[-2000:])
        return r.json()["data"]["result"]

    clicks = []
    for x, y in obj["clicks"][:3]:
        clicks.append(click(x, y))
    assert annotate() == []

    clicks.append(click(*obj["clicks"][3]))
    result = annotate()
    assert len(result) == 1
    region = result[0]
    assert (region["type"], region["from_name"], region["to_name"]) == ("polygonlabels", "poly", "image")
    assert region["value"]["polygonlabels"] == ["Nucleus"] and region["value"]["closed"]
    assert (region["original_width"], region["original_height"]) == (W, H)
    gt = obj["gt"]
    iou4 = _iou(_polygon_mask(region["value"]["points"], W, H), gt)
    # Threshold from the fixture's measurement: its mIoU over the measured dev objects minus 0.15
    # (one object may sit below the mean; the fixture fails below mIoU 0.6).
    threshold = trained_delse["miou"] - 0.15
    assert iou4 >= threshold, (iou4, trained_delse["miou"], obj["iou"])

    poly4 = np.asarray(region["value"]["points"]) * [W / 100.0, H / 100.0] - 0.5  # pixel indices
    _assert_same_polygon(poly4, obj["polygon"], W, H)  # what DELSEPredictor returns in process
    target, dist4 = _drag_target(gt, poly4)
    clicks.append(click(*target))
    result = annotate()
    assert len(result) == 1
    points5 = result[0]["value"]["points"]
    iou5 = _iou(_polygon_mask(points5, W, H), gt)
    poly5 = np.asarray(points5) * [W / 100.0, H / 100.0] - 0.5
    dist5 = _distance_to(poly5, target)
    _assert_same_polygon(poly5, obj["polygon_drag"], W, H)
    assert iou5 >= iou4 - 1e-3, (iou4, iou5)
    assert dist5 < dist4, (dist4, dist5)  # the contour moved towards the drag target
    print(f"\nmIoU {trained_delse['miou']:.3f} over {trained_delse['n']} dev objects; annotated ann "
          f"{obj['ann']['id']} in {name}: IoU {iou4:.3f} after 4 clicks, {iou5:.3f} after the drag "
          f"(target {dist4:.1f} px -> {dist5:.1f} px from the contour)")

    shot = os.environ.get("DELSE_LS_SCREENSHOT")
    if shot:
        _screenshot(ls_url, api, login, project, task["id"], result + clicks, shot)


def _screenshot(ls_url, api, login, project, task_id, regions, path):
    """Save the returned regions as the task's annotation, open it in Label Studio's editor in
    headless Chromium and save a screenshot (checked by eye; kept out of git)."""
    playwright = pytest.importorskip("playwright.sync_api")
    r = api.post(f"{ls_url}/api/tasks/{task_id}/annotations", json={"result": regions}, timeout=30)
    assert r.status_code == 201, r.text[:500]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(ls_url + "/user/login/")
        page.fill("input[name=email]", login[0])
        page.fill("input[name=password]", login[1])
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{ls_url}/projects/{project}/data?task={task_id}")
        page.wait_for_timeout(10000)
        page.screenshot(path=path)
        browser.close()
