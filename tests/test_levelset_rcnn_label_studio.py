"""LevelSet R-CNN pre-annotation through the Label Studio ML backend (levelset_rcnn.label_studio,
`levelset-rcnn-serve`): in process against Detectron2's DefaultPredictor, and end to end in a real
Label Studio ("Retrieve predictions" on a project). The model is the tiny synthetic-shapes
LevelSet R-CNN, randomly initialised with a fixed seed and saved: untrained, it still returns its
20 detections per image (scores ~1/5 over the 0.05 threshold) with level-set polygons, the same in
every process that loads the file, which is all a check of the serving path needs."""
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import torch
from pycocotools import mask as mask_util

from levelset_d2.label_studio_server import ImageLoader, make_server
from levelset_rcnn.label_studio import LevelSetRCNNBackend, build_predictor

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/LevelSetRCNN/tiny_levelset_rcnn_synthetic.yaml"
CLASSES = ["disc", "ring", "blob", "pair"]  # the synthetic dataset's thing_classes
AUTH = ("ls", "pass")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">""" + "".join(f'<Label value="{c}"/>' for c in CLASSES) + """
  </PolygonLabels>
</View>"""
SIZES = [(160, 120), (128, 128), (200, 90)]  # (W, H), non-square


def _image(i):
    w, h = SIZES[i]
    img = np.full((h, w, 3), 30 + 20 * i, np.uint8)
    cv2.circle(img, (w // 3, h // 2), 18 + 3 * i, (200, 190, 180), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w // 2 + 30, h // 4 + 25), (60, 200, 90), -1)
    return img


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model, randomly initialised with seed 0, as a checkpoint file."""
    import levelset_rcnn
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("levelset_rcnn_random")
    DetectionCheckpointer(build_model(cfg), save_dir=str(out)).save("model_random")
    return out / "model_random.pth"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ls_rcnn_images")
    for i in range(len(SIZES)):
        cv2.imwrite(str(d / f"shapes{i}.png"), _image(i))
    return d


def _expected(weights, image_bgr, labels=CLASSES):
    """What the backend must send for one image, from the in-process DefaultPredictor: per
    instance (label, score, polygon in Label Studio percents), the largest contour of its zero
    level set (area by OpenCV), in the predictor's order."""
    from levelset_rcnn import add_polygons

    predictor, names = build_predictor(CONFIG, weights, "cpu")
    assert names == CLASSES
    instances = add_polygons(predictor(image_bgr)["instances"].to("cpu"))
    h, w = image_bgr.shape[:2]
    out = []
    for contours, cls, score, mask in zip(instances.pred_polygons, instances.pred_classes.tolist(),
                                          instances.scores.tolist(), instances.pred_masks.numpy()):
        contours = [c[:-1] if np.allclose(c[0], c[-1]) else c for c in contours]
        contours = [c for c in contours if len(c) >= 3]
        if not contours or CLASSES[cls] not in labels:
            continue
        polygon = max(contours, key=lambda c: abs(cv2.contourArea(c.astype(np.float32))))
        out.append((CLASSES[cls], score, polygon * [100.0 / w, 100.0 / h], mask))
    return out


def _assert_regions(regions, expected, w, h):
    assert len(regions) == len(expected) > 0
    for region, (label, score, points, _) in zip(regions, expected):
        assert (region["type"], region["from_name"], region["to_name"]) == ("polygonlabels", "poly", "image")
        assert (region["original_width"], region["original_height"]) == (w, h)
        assert region["value"]["polygonlabels"] == [label] and region["value"]["closed"]
        assert region["score"] == pytest.approx(score, abs=1e-6)
        np.testing.assert_allclose(region["value"]["points"], points, rtol=0, atol=1e-4 + 1e-9)


def _polygon_mask(points_pct, w, h):
    xy = np.asarray(points_pct) * [w / 100.0, h / 100.0]
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects([xy.ravel().tolist()], h, w))).astype(bool)


@pytest.fixture(scope="module")
def server(weights, images):
    predictor, names = build_predictor(CONFIG, weights, "cpu")
    backend = LevelSetRCNNBackend(predictor, names, "LevelSetRCNN-test",
                                  ImageLoader(path_map=[("/data/upload/", str(images))]), max_tasks=2)
    srv = make_server(backend, "127.0.0.1", 0, basic_auth=AUTH)
    threading.Thread(target=srv.run, daemon=True).start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()


def _predict(url, tasks, config=LABEL_CONFIG):
    r = requests.post(url + "/predict", json={"tasks": tasks, "label_config": config, "params": {"context": {}}},
                      auth=AUTH, timeout=120)
    return r.status_code, r.json()


def test_predictions_are_the_default_predictors_zero_level_sets(server, weights):
    tasks = [{"id": i, "data": {"image": f"/data/upload/shapes{i}.png"}} for i in range(2)]
    status, out = _predict(server, tasks)
    assert status == 200 and len(out["results"]) == 2
    for i, result in enumerate(out["results"]):
        w, h = SIZES[i]
        expected = _expected(weights, _image(i))
        _assert_regions(result["result"], expected, w, h)
        assert result["model_version"] == "LevelSetRCNN-test"
        assert result["score"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-6)
        # The polygons are in Label Studio's frame: rasterised, each lies inside the predictor's
        # pasted mask (same TSDF, > 0 on the pixel grid; median 0.87-0.95 measured, 0.43-0.62 with
        # a half-pixel shift). Not IoU: an untrained TSDF has many components, the region only the largest.
        precision = []
        for region, (_, _, _, mask) in zip(result["result"], expected):
            inside = _polygon_mask(region["value"]["points"], w, h)
            if inside.sum() >= 50:
                precision.append((inside & mask).sum() / inside.sum())
        assert len(precision) >= 3 and np.median(precision) > 0.8, precision
        xy = np.concatenate([r["value"]["points"] for r in result["result"]]) * [w / 100.0, h / 100.0]
        assert np.mean(np.abs(xy * 2 - np.round(xy * 2)) > 1e-3) > 0.5  # not on the half-pixel grid


def test_label_values_of_the_project_filter_the_classes(server, weights):
    config = LABEL_CONFIG.replace('<Label value="ring"/>', "").replace('<Label value="blob"/>', "")
    status, out = _predict(server, [{"id": 0, "data": {"image": "/data/upload/shapes0.png"}}], config)
    assert status == 200
    w, h = SIZES[0]
    _assert_regions(out["results"][0]["result"], _expected(weights, _image(0), ["disc", "pair"]), w, h)


def test_more_tasks_than_the_limit_get_one_empty_result(server):
    """Label Studio then asks again one task per request (its fallback for non-batch backends)."""
    tasks = [{"id": i, "data": {"image": f"/data/upload/shapes{i}.png"}} for i in range(3)]
    status, out = _predict(server, tasks)
    assert status == 200 and out == {"results": [{"result": [], "score": 0.0, "model_version": "LevelSetRCNN-test"}]}


def test_label_config_needs_polygon_labels(server):
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"/></View>'
    status, out = _predict(server, [{"id": 0, "data": {"image": "/data/upload/shapes0.png"}}], config)
    assert status == 400 and "<PolygonLabels>" in out["error"]
    assert requests.post(server + "/predict", json={}, timeout=10).status_code == 401


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_levelset_rcnn_pre_annotates_a_label_studio_project(label_studio, weights, images, tmp_path):
    """Three tasks imported into a real Label Studio, "Retrieve predictions" for all of them with
    the backend's limit at 2 tasks per request (so Label Studio's one-task-per-request fallback is
    exercised), and every task's prediction equal to the in-process DefaultPredictor's polygons."""
    from _label_studio import api_session, connect_backend, start_backend, stop

    ls_url, pat, _, _ = label_studio
    log = tmp_path / "backend.log"
    ml_url, proc = start_backend("levelset_rcnn.label_studio",
                                 ["--config-file", str(CONFIG), "--weights", str(weights), "--max-tasks", "2"],
                                 ls_url, pat, log)
    try:
        api = api_session(ls_url, pat)
        r = api.post(ls_url + "/api/projects", json={"title": "LevelSet R-CNN", "label_config": LABEL_CONFIG},
                     timeout=30)
        assert r.status_code == 201, r.text[:500]
        project = r.json()["id"]
        files = {f"shapes{i}.png": (f"shapes{i}.png", (images / f"shapes{i}.png").read_bytes(), "image/png")
                 for i in range(len(SIZES))}
        r = api.post(f"{ls_url}/api/projects/{project}/import", files=files, timeout=60)
        assert r.status_code == 201, r.text[:500]
        tasks = api.get(f"{ls_url}/api/tasks", params={"project": project}, timeout=30).json()["tasks"]
        assert len(tasks) == len(SIZES)
        connect_backend(api, ls_url, ml_url, project, "LevelSet R-CNN", interactive=False)
        r = api.post(f"{ls_url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                     json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)
        assert r.status_code == 200, r.text[:500]
        for task in tasks:
            i = int(Path(task["data"]["image"]).stem.split("shapes")[-1])  # uploads are renamed <hash>-shapes<i>.png
            predictions = api.get(f"{ls_url}/api/predictions", params={"task": task["id"]}, timeout=30).json()
            assert len(predictions) == 1, (task["id"], predictions, log.read_text()[-2000:])
            assert predictions[0]["model_version"].startswith("LevelSetRCNN-model_random-")
            w, h = SIZES[i]
            _assert_regions(predictions[0]["result"], _expected(weights, _image(i)), w, h)
        text = log.read_text()
        assert "3 tasks in one request, more than 2" in text, text[-2000:]  # then one request per task
        print(f"\n{len(tasks)} tasks pre-annotated; backend log:\n" + "\n".join(
            line for line in text.splitlines() if "instance(s)" in line or "result(s)" in line))
    finally:
        stop(proc)
