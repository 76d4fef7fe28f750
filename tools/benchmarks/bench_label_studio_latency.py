#!/usr/bin/env python
"""Latency of the DELSE Label Studio backend through its HTTP path (the Flask app on waitress of
levelset_d2.label_studio_server, with basic auth on; BENCHMARKS.md, section
"Label Studio latency"): POST /predict bodies as Label Studio sends them, on dsb2018 dev nuclei
clicked at their GT extreme points, images read through --path-map (no Label Studio needed).

Per object, the requests of an annotator who also clicks another object in between:
- 4 clicks (a new task: image read + decode + predict),
- a 5th click, the drag, continuing from the last request's predictor state (the usual case),
- another object's 4 clicks on the same image (not reported),
- a 6th click, a second drag, back on the first object: it goes on from the state the backend kept,
- the same 6 clicks with the kept states dropped: replayed from scratch (predict + 2 drags; what a
  request costs once its object's state is no longer kept).

    OMP_NUM_THREADS=2 .venv/bin/python tools/benchmarks/bench_label_studio_latency.py \\
        --weights output/delse_R_18_dsb2018/model_final.pth --objects 10 [KEY VALUE ...]
"""
import argparse
import base64
import json
import threading
import time
import urllib.request
from pathlib import Path

from _benchmarks import print_provenance

import numpy as np
from pycocotools import mask as mask_util

from levelset.metrics import to_rle
from levelset_d2.datasets import shared_data_root

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", default=str(REPO / "configs/DELSE/delse_R_18_dsb2018.yaml"))
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", default=str(shared_data_root() / "dsb2018"))
    ap.add_argument("--objects", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...), as delse-serve takes them")
    args = ap.parse_args()
    if args.objects < 5:
        ap.error("--objects must be >= 5 (medians over at least 5 objects)")

    import torch

    from delse.label_studio import DELSEBackend, ImageLoader, build_predictor, make_server

    data = Path(args.data)
    backend = DELSEBackend(build_predictor(args.config_file, args.weights, args.device, args.opts), "bench",
                           ImageLoader(path_map=[("/data/upload/", str(data / "images"))]))
    auth = ("bench", "bench-pass")  # as deployed: basic auth on
    server = make_server(backend, "127.0.0.1", 0, basic_auth=auth)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}/predict"
    authorization = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    config = (REPO / "tests/test_label_studio_e2e.py").read_text().split('LABEL_CONFIG = """')[1].split('"""')[0]

    dev = json.loads((data / "dev.json").read_text())
    images = {im["id"]: im for im in dev["images"]}
    anns = sorted((a for a in dev["annotations"] if a["area"] >= 300 and not a.get("iscrowd")), key=lambda a: a["id"])
    anns = anns[::max(1, len(anns) // args.objects)][:args.objects]

    def post(body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
                                                                             "Authorization": authorization})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        return time.perf_counter() - t0, out

    rows = []
    for task_id, ann in enumerate(anns):
        im = images[ann["image_id"]]
        W, H = im["width"], im["height"]
        gt = mask_util.decode(to_rle(ann["segmentation"], H, W)).astype(bool)
        ys, xs = np.nonzero(gt)
        pts = [(xs[i], ys[i]) for i in (xs.argmin(), xs.argmax(), ys.argmin(), ys.argmax())]
        cy = ys.mean()
        drags = [(min(float(xs.max()) + 2, W - 1.0), float(cy)),  # 2 px beyond the right extreme
                 (max(float(xs.min()) - 2, 0.0), float(cy))]  # then beyond the left one
        clicks = [{"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": W,
                   "original_height": H, "value": {"x": (x + 0.5) * 100 / W, "y": (y + 0.5) * 100 / H,
                                                   "keypointlabels": [label]}}
                  for (x, y), label in zip(pts + drags + pts, ["Nucleus"] * 6 + ["Other"] * 4)]

        def body(regions):
            return {"tasks": [{"id": task_id, "data": {"image": f"/data/upload/{im['file_name']}"}}],
                    "label_config": config, "params": {"context": {"result": regions}}}

        t4, out = post(body(clicks[:4]))
        assert out["results"][0]["result"], f"no polygon for annotation {ann['id']}"
        t5, _ = post(body(clicks[:5]))
        post(body(clicks[:5] + clicks[6:]))  # another object (label "Other") of the same image
        t6, _ = post(body(clicks[:6] + clicks[6:]))  # back to the first object: a second drag
        backend.forget_states()
        t6r, _ = post(body(clicks[:6] + clicks[6:]))
        rows.append((t4, t5, t6, t6r))
        print(f"ann {ann['id']:>6} {im['file_name']} {W}x{H}: 4 clicks {t4 * 1000:6.1f} ms, drag "
              f"{t5 * 1000:6.1f} ms, drag after another object {t6 * 1000:6.1f} ms, replayed {t6r * 1000:6.1f} ms")
    med = np.median(np.asarray(rows), 0) * 1000
    print(f"\nmedian over {len(rows)} objects (torch threads {torch.get_num_threads()}, device {args.device}): "
          f"4 clicks {med[0]:.1f} ms, drag {med[1]:.1f} ms, drag after another object {med[2]:.1f} ms, "
          f"replayed {med[3]:.1f} ms")
    print_provenance()
    server.close()


if __name__ == "__main__":
    main()
