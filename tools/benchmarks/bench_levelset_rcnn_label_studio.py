#!/usr/bin/env python
"""Pre-annotation time of the LevelSet R-CNN Label Studio backend (`levelset-rcnn-serve`) through
its HTTP path (the Flask app on waitress of levelset_d2.label_studio_server, basic auth on): one
/predict request per task, as Label Studio sends them, for the COCO sample images whose longer
side is 640 px, read through --path-map (no Label Studio needed). Each request is image read +
decode, the model at its test size (MIN_SIZE_TEST), the zero-level-set polygons and the JSON.

Timing does not need a trained model: with MODEL.WEIGHTS "" (random initialisation) and
``--score-thresh 0`` every one of the TEST.DETECTIONS_PER_IMAGE detections reaches the mask head
and becomes a polygon (the worst case); with the config's threshold an untrained model keeps some
(how many depends on the initialisation: seed 0). The time grows with the number of detections.

    OMP_NUM_THREADS=2 .venv/bin/python tools/benchmarks/bench_levelset_rcnn_label_studio.py \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml --score-thresh 0 \\
        MODEL.WEIGHTS ""
"""
import argparse
import base64
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

from _benchmarks import print_provenance

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("LEVELSET_SHARED_DATA", REPO.parent / "shared" / "data"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", default=str(REPO / "configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml"))
    ap.add_argument("--images", default=str(SHARED_DATA / "coco_val2017_sample" / "images"))
    ap.add_argument("--size", type=int, default=640, help="longer side of the images used")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images (the first request warms up)")
    ap.add_argument("--score-thresh", type=float, default=None, help="MODEL.ROI_HEADS.SCORE_THRESH_TEST")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = ap.parse_args()

    import torch

    from levelset_d2.label_studio_server import ImageLoader, make_server
    from levelset_rcnn.label_studio import LevelSetRCNNBackend, build_predictor

    opts = list(args.opts)
    if args.score_thresh is not None:
        opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.score_thresh)]
    weights = dict(zip(opts[::2], opts[1::2])).get("MODEL.WEIGHTS", "")
    torch.manual_seed(0)  # the same random initialisation (and so detections) in every run
    predictor, names = build_predictor(args.config_file, weights, args.device, opts)
    folder = Path(args.images)
    files = sorted(f.name for f in folder.iterdir() if max(cv2.imread(str(f)).shape[:2]) == args.size)
    assert len(files) >= 5, f"fewer than 5 images with longer side {args.size} px in {folder}"
    backend = LevelSetRCNNBackend(predictor, names, "bench", ImageLoader(path_map=[("/data/upload/", str(folder))]))
    auth = ("bench", "bench-pass")
    server = make_server(backend, "127.0.0.1", 0, basic_auth=auth)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}/predict"
    headers = {"Content-Type": "application/json",
               "Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()}
    config = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
              + "".join(f'<Label value="{n}"/>' for n in names) + "</PolygonLabels></View>")

    def post(i, name):
        body = {"tasks": [{"id": i, "data": {"image": f"/data/upload/{name}"}}], "label_config": config,
                "params": {"context": {}}}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return time.perf_counter() - t0, len(out["results"][0]["result"])

    post(-1, files[0])  # warm-up
    times, counts = [], []
    for rep in range(args.repeats):
        for i, name in enumerate(files):
            t, n = post(rep * len(files) + i, name)
            times.append(t)
            counts.append(n)
            h, w = cv2.imread(str(folder / name)).shape[:2]
            print(f"{name} {w}x{h}: {t * 1000:7.1f} ms, {n} polygons")
    print(f"\nmedian over {len(times)} requests ({len(files)} images x {args.repeats}; torch threads "
          f"{torch.get_num_threads()}, device {args.device}, test size {predictor.cfg.INPUT.MIN_SIZE_TEST}/"
          f"{predictor.cfg.INPUT.MAX_SIZE_TEST}): {np.median(times) * 1000:.1f} ms per image "
          f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}); polygons per image: median "
          f"{np.median(counts):.0f}")
    print_provenance()
    server.close()


if __name__ == "__main__":
    main()
