"""Speed and memory of LevelSet R-CNN against Mask R-CNN: same inputs, same detections, one run.

    .venv/bin/python tools/benchmarks/bench_speed.py [--depth 50] [--dets 50] [--images 4] [--device cpu]

Both models are R-<depth>-FPN built from the COCO configs. LevelSet R-CNN gets Mask R-CNN's
backbone, RPN and box head weights, so both detect the same boxes; the mask branch is also timed
on exactly ``--dets`` fixed boxes per image (Detectron2's ``detected_instances``). Each model is measured in its own
subprocess so that peak memory (CPU max RSS; CUDA max allocated) is its own.

Inference latency is also measured with both models in one process, image by image in alternation
over ``--rounds`` rounds, and so is the training step (``--train-steps`` pairs of steps on the same
batches, the same RoI sampling seed): on a shared or throttled machine those ratios are the ones to
read, since drift between two processes' runs can exceed the difference between the models.

Reports per model: inference latency per image, mask-branch time per RoI, training step time
(batch of 2 real COCO images, forward + backward + SGD step), the share of the step spent building
TSDF targets, and peak memory; then the ratios LevelSet R-CNN / Mask R-CNN.

``--heads`` times the mask branches alone instead, in one process, alternating round by round:
Mask R-CNN's, LevelSet R-CNN's (paper features), LevelSet R-CNN's with MODEL.LEVELSET.IMAGE_FEATURES
"raw" (crops pooled from the image included), and the cheaper Chan-Vese features heads
(FEATURES_INPUT "tsdf_convs" / FEATURES_NUM_CONV 0; FEATURES_CONV_DIM 64), and the standardised Chan-Vese features, alone and read
from p2 pooled at 28 x 28 (that RoIAlign itself not timed); on ``--device``; it reports the median time per RoI and the
ratio to Mask R-CNN's head. Random weights and inputs (R-50 COCO configs: 256 x 14 x 14 pooled
features, 80 classes, boxes of 5-35 % of an 800 x 1216 image).

    .venv/bin/python tools/benchmarks/bench_speed.py --heads [--rois 50] [--rounds 15] [--threads 2]
    .venv/bin/python tools/benchmarks/bench_speed.py --profile "+ image crop, no features conv" [--rois 100]

``--breakdown HEAD`` (implies ``--heads``) times the parts of one LevelSet R-CNN head (initial TSDF head,
hyperparameter head, Chan-Vese features head, the steps) beside the whole heads, in alternation: where
its extra time over Mask R-CNN's head goes.

    .venv/bin/python tools/benchmarks/bench_speed.py --breakdown "LevelSet R-CNN"

``--profile HEAD`` (implies ``--heads``) times nothing else: it prints ``torch.profiler``'s operator
table (self CPU time) for ``--rounds`` calls of that head (where its time goes).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "mask_rcnn": REPO / "configs/LevelSetRCNN/mask_rcnn_R_50_FPN_1x_coco.yaml",
    "levelset_rcnn": REPO / "configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml",
}
# Random weights: FrozenBN (identity statistics) lets activations blow up through the backbone,
# so both models use GroupNorm there. The mask heads are unchanged.
NORM = ["MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build(name, args):
    """One model on the shared weights, and the test inputs: (cfg, model, dataset, test_inputs)."""
    import torch

    import levelset_rcnn
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS[name]))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", str(args.depth), *NORM,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.DEVICE", args.device,
                         "INPUT.MIN_SIZE_TEST", str(args.size), "INPUT.MIN_SIZE_TRAIN", f"({args.size},)"])
    if args.depth < 50:
        cfg.merge_from_list(["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    if args.train_iou_threshold is not None:
        cfg.merge_from_list(["MODEL.ROI_HEADS.IOU_THRESHOLDS", f"[{args.train_iou_threshold}]"])
    if name == "levelset_rcnn":
        cfg.merge_from_list(args.levelset_opts)
    model = build_model(cfg)
    # Same weights for the shared parts: the backbone, RPN and box head of a seeded Mask R-CNN.
    shared = torch.load(args.shared_weights, map_location=args.device, weights_only=True)
    missing, unexpected = model.load_state_dict(shared, strict=False)
    assert not unexpected or name == "levelset_rcnn", unexpected
    model.eval()
    dataset = DatasetCatalog.get("coco_sample_val2017")[: args.images]
    test_inputs = [DatasetMapper(cfg, is_train=False)(dict(d)) for d in dataset]
    return cfg, model, dataset, test_inputs


def training_batches(cfg, dataset):
    """Batches of 2 mapped training images (fixed augmentation seed), the same for every model."""
    import random

    import torch

    from detectron2.data import DatasetMapper

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    mapper = DatasetMapper(cfg, is_train=True)
    return [[mapper(dict(d)) for d in dataset[i: i + 2]] for i in range(0, len(dataset) - 1, 2)]


def train_step(model, opt, batch, device):
    """One forward + backward + SGD step on ``batch``; returns its wall time (s)."""
    import torch

    torch.manual_seed(0)  # the same RoI sampling for every model
    _sync(device)
    t0 = time.perf_counter()
    losses = model(batch)
    sum(losses.values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def _ratios(seconds, prefix=""):
    """Median and range of the per-round LevelSet / Mask R-CNN ratios of ``seconds`` (name -> list)."""
    r = [l / m for l, m in zip(seconds["levelset_rcnn"], seconds["mask_rcnn"])]
    return {f"{prefix}ratio": float(np.median(r)), f"{prefix}ratio_min": min(r), f"{prefix}ratio_max": max(r)}


# --heads: the mask branches alone. Name -> (model of CONFIGS, config overrides).
IMAGE = ["MODEL.ROI_HEADS.NAME", "LevelSetROIHeads", "MODEL.LEVELSET.IMAGE_FEATURES", "raw"]
NO_CONV = ["MODEL.LEVELSET.FEATURES_NUM_CONV", "0"]
SHARED_CONVS = ["MODEL.LEVELSET.FEATURES_INPUT", "tsdf_convs", *NO_CONV]
HEADS = {
    "Mask R-CNN": ("mask_rcnn", []),
    "LevelSet R-CNN": ("levelset_rcnn", []),
    "+ image crop": ("levelset_rcnn", IMAGE),
    "+ image crop, shared convs": ("levelset_rcnn", IMAGE + SHARED_CONVS),
    "+ image crop, no features conv": ("levelset_rcnn", IMAGE + NO_CONV),
    "paper features, shared convs": ("levelset_rcnn", SHARED_CONVS),
    # Issue #21 speed goal: the features head's one conv EMBED_CHANNELS (64) or 128 wide instead of 256.
    "paper features, 64-wide features conv": ("levelset_rcnn", ["MODEL.LEVELSET.FEATURES_CONV_DIM", "64"]),
    "paper features, 128-wide features conv": ("levelset_rcnn", ["MODEL.LEVELSET.FEATURES_CONV_DIM", "128"]),
    # ... and the hyperparameter head reading the pooled RoI features (no convs: average pool + 2 FC).
    "paper features, no hyperparameter convs": ("levelset_rcnn", ["MODEL.LEVELSET.HYPERPARAM_NUM_CONV", "0"]),
    "paper features, one hyperparameter conv": ("levelset_rcnn", ["MODEL.LEVELSET.HYPERPARAM_NUM_CONV", "1"]),
    "paper features, 64-wide hyperparameter convs": ("levelset_rcnn", ["MODEL.LEVELSET.HYPERPARAM_CONV_DIM", "64"]),
    # The nuclei model (image crop, no features conv) with a lighter hyperparameter head.
    "+ image crop, no features conv, one hyperparameter conv": (
        "levelset_rcnn", IMAGE + NO_CONV + ["MODEL.LEVELSET.HYPERPARAM_NUM_CONV", "1"]),
    "+ image crop, no features conv, no hyperparameter convs": (
        "levelset_rcnn", IMAGE + NO_CONV + ["MODEL.LEVELSET.HYPERPARAM_NUM_CONV", "0"]),
    # Issue #21 item 4: F standardised; and read from p2 pooled again at 28 x 28 (64-wide convs).
    "standardised F": ("levelset_rcnn", ["MODEL.LEVELSET.STANDARDIZE_FEATURES", "True"]),
    "standardised F from p2 at 28": ("levelset_rcnn", [
        "MODEL.LEVELSET.STANDARDIZE_FEATURES", "True", "MODEL.ROI_HEADS.NAME", "LevelSetROIHeads",
        "MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION", "28", "MODEL.LEVELSET.FEATURES_CONV_DIM", "64"]),
}
HEADS_ROUNDS = 15  # default --rounds of --heads


def build_head(name, device="cpu"):
    """The mask head ``name`` of :data:`HEADS` (random weights, eval mode) on 256 x 14 x 14 RoI features."""
    import levelset_rcnn
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.mask_head import build_mask_head

    model, opts = HEADS[name]
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS[model]))
    cfg.merge_from_list(["MODEL.DEVICE", device, *opts])
    return build_mask_head(cfg, ShapeSpec(channels=256, height=14, width=14)).to(device).eval()


def measure_heads(args):
    """The mask heads alone, in this process, alternating round by round (machine drift hits all
    alike); with ``--profile HEAD``, torch.profiler's operator table of that head instead."""
    import torch

    from detectron2.structures import Boxes, Instances
    from levelset_rcnn.roi_heads import pool_image_crops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    heads = {name: build_head(name, dev) for name in HEADS}
    R, (H, W) = args.rois, (800, 1216)
    x, image = torch.randn(R, 256, 14, 14, device=dev), torch.randn(1, 3, H, W, device=dev)
    fine = torch.randn(R, 256, 28, 28, device=dev)  # the p2 RoIAlign LevelSetROIHeads adds (pooler not timed)
    g = torch.Generator().manual_seed(0)
    wh = (torch.rand(R, 2, generator=g) * 0.3 + 0.05) * torch.tensor([W, H])
    xy = torch.rand(R, 2, generator=g) * (torch.tensor([W, H]) - wh)
    boxes = Boxes(torch.cat([xy, xy + wh], 1).to(dev))
    classes = torch.randint(0, 80, (R,), generator=g).to(dev)

    def run(name):
        inst = Instances((H, W), pred_boxes=boxes, pred_classes=classes)
        head = heads[name]
        inputs = {}
        if getattr(head, "image_crop_resolution", 0):
            inputs["image_crops"] = pool_image_crops(image, [boxes], head.image_crop_resolution)
        if getattr(head, "features_pooler_resolution", 0):
            inputs["fine_features"] = fine
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            head(x, [inst], **inputs)
        _sync(dev)
        return time.perf_counter() - t0

    for name in heads:  # warm-up
        run(name)
    if args.breakdown:
        return measure_breakdown(args, heads, run, x, classes)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(args.rounds):
                run(args.profile)
        print(f"{args.profile}: {R} RoIs, {args.rounds} calls, {args.threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    times = {name: [] for name in heads}
    for _ in range(args.rounds):
        for name in heads:
            times[name].append(run(name))
    ms = {name: 1000 * float(np.median(t)) / R for name, t in times.items()}
    print(f"{R} RoIs, {args.rounds} rounds, device {dev}, {args.threads} threads; median ms per RoI:")
    base = ms["Mask R-CNN"]
    for name, v in ms.items():
        print(f"  {name}: {v:.2f} ({v / base:.2f}x Mask R-CNN)")


def measure_breakdown(args, heads, run, x, classes):
    """``--breakdown HEAD``: the whole Mask R-CNN head, the whole HEAD, and HEAD's parts (its public
    layers, called one by one on the same RoI features), timed in alternation over ``--rounds``."""
    import torch

    head = heads[args.breakdown]
    if getattr(head, "image_crop_resolution", 0) or getattr(head, "features_pooler_resolution", 0) \
            or not hasattr(head, "chan_vese_features"):
        raise SystemExit(f"--breakdown: {args.breakdown!r} is not a LevelSet R-CNN head on the pooled RoI features alone")
    with torch.no_grad():
        out = head.layers(x)
        phi0 = head.initial_phi(out["initial_tsdf_logits"], classes)
        # What the features head reads; the TSDF head's convs (FEATURES_INPUT tsdf_convs) are timed there.
        source = head.tsdf_convs(x) if head.features_input == "tsdf_convs" else x

    def timed(f):
        def seconds():
            _sync(args.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                f()
            _sync(args.device)
            return time.perf_counter() - t0
        return seconds

    parts = {  # name -> callable returning seconds
        "Mask R-CNN head (whole)": lambda: run("Mask R-CNN"),
        f"{args.breakdown} (whole)": lambda: run(args.breakdown),
        "  initial TSDF head (Mask R-CNN's layers, tanh of the class)": timed(lambda: head.initial_phi(head.initial_tsdf_logits(x), classes)),
        "  hyperparameter head": timed(lambda: head.hyperparameter_head(x)),
        "  Chan-Vese features head": timed(lambda: head.chan_vese_features(source)),
        "  Chan-Vese steps (levelset.chan_vese)": timed(lambda: head.evolve(phi0, out)),
    }
    times = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, seconds in parts.items():
            times[name].append(seconds())
    R = x.shape[0]
    base = 1000 * float(np.median(times["Mask R-CNN head (whole)"])) / R
    print(f"{args.breakdown}: {R} RoIs, {args.rounds} rounds, {args.threads} threads; median ms per RoI "
          "(share of Mask R-CNN's whole head):")
    ms = {name: 1000 * float(np.median(t)) / R for name, t in times.items()}
    for name, v in ms.items():
        print(f"  {name}: {v:.2f} ({v / base:.2f}x)")
    rest = ms[f"{args.breakdown} (whole)"] - sum(v for name, v in ms.items() if name.startswith("  "))
    print(f"  rest (the masks, dict and split overheads; whole minus parts): {rest:.2f} ({rest / base:.2f}x)")


def measure_interleaved(args):
    """Runs in a subprocess: both models in one process, timed image by image in alternation over
    ``--rounds`` rounds (first model swapped every round), so that machine drift hits both alike."""
    import torch

    built = {name: build(name, args) for name in CONFIGS}
    models, inputs = {name: b[1] for name, b in built.items()}, built["mask_rcnn"][3]
    totals = {name: [] for name in CONFIGS}
    with torch.no_grad():
        for model in models.values():
            model([inputs[0]])  # warm-up
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]
            round_total = dict.fromkeys(CONFIGS, 0.0)
            for x in inputs:
                for name in order:
                    _sync(args.device)
                    t0 = time.perf_counter()
                    models[name]([x])
                    _sync(args.device)
                    round_total[name] += time.perf_counter() - t0
            for name in CONFIGS:
                totals[name].append(round_total[name])

    # Training steps in alternation too: pair i is one step of each model on the same batch (the
    # first model swapped every pair), after one warm-up step each.
    from detectron2.utils.events import EventStorage

    batches = training_batches(built["mask_rcnn"][0], built["mask_rcnn"][2])
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for name, m in models.items()}
    steps = {name: [] for name in CONFIGS}
    with EventStorage(0):  # the heads log metrics during training
        for m in models.values():
            m.train()
        for i in range(args.train_steps + 1):
            order = list(CONFIGS) if i % 2 == 0 else list(CONFIGS)[::-1]
            for name in order:
                t = train_step(models[name], opts[name], batches[i % len(batches)], args.device)
                if i > 0:
                    steps[name].append(t)
    print("RESULT " + json.dumps(dict(
        ms={name: 1000 * float(np.median(t)) / len(inputs) for name, t in totals.items()}, **_ratios(totals),
        step_ms={name: 1000 * float(np.median(t)) for name, t in steps.items()}, **_ratios(steps, "step_"))))


def measure(name, args):
    """Runs in a subprocess: build one model, time it, print a json line."""
    import torch

    from levelset_rcnn import mask_head as lsmh
    from levelset_rcnn.roi_heads import with_image

    cfg, model, dataset, test_inputs = build(name, args)

    mask_time = [0.0, 0]

    def pre(module, inp):
        _sync(args.device)
        module._t0 = time.perf_counter()

    def post(module, inp, out):
        _sync(args.device)
        mask_time[0] += time.perf_counter() - module._t0
        mask_time[1] += inp[0].shape[0]

    model.roi_heads.mask_head.register_forward_pre_hook(pre)
    model.roi_heads.mask_head.register_forward_hook(post)

    def fixed_detections(x, n):
        """n seeded boxes in the resized image, the same for both models."""
        from detectron2.structures import Boxes, Instances

        H, W = x["image"].shape[1:]
        g = torch.Generator().manual_seed(0)
        size = (torch.rand(n, 2, generator=g) * 0.3 + 0.05) * torch.tensor([W, H])
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H]) - size)
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(torch.cat([xy, xy + size], 1).to(args.device))
        inst.pred_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (n,), generator=g).to(args.device)
        inst.scores = torch.ones(n, device=args.device)
        return inst

    with torch.no_grad():
        model([test_inputs[0]])  # warm-up
        times, num_dets = [], []
        for x in test_inputs:  # the whole pipeline, with the detections the shared weights give
            _sync(args.device)
            t0 = time.perf_counter()
            out = model([x])
            _sync(args.device)
            times.append(time.perf_counter() - t0)
            num_dets.append(len(out[0]["instances"]))
        mask_time[:] = [0.0, 0]
        for x in test_inputs:  # the mask branch on exactly args.dets fixed boxes per image
            # GeneralizedRCNN.inference(detected_instances=...) without its postprocessing, with the
            # image beside the features (IMAGE_FEATURES "raw" pools crops of it; others ignore it).
            images = model.preprocess_image([x])
            features = with_image(model.backbone(images.tensor), images)
            out = model.roi_heads.forward_with_given_boxes(features, [fixed_detections(x, args.dets)])
            assert len(out[0]) == args.dets
    infer_ms = 1000 * float(np.median(times))
    per_roi_ms = 1000 * mask_time[0] / max(mask_time[1], 1)

    # Training step; time spent building TSDF targets is accumulated by wrapping the function.
    target_time = [0.0]
    real_targets = lsmh.tsdf_targets

    def timed_targets(*a, **k):
        _sync(args.device)
        t0 = time.perf_counter()
        r = real_targets(*a, **k)
        _sync(args.device)
        target_time[0] += time.perf_counter() - t0
        return r

    lsmh.tsdf_targets = timed_targets
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batches = training_batches(cfg, dataset)
    from detectron2.utils.events import EventStorage

    steps = []
    with EventStorage(0):  # the heads log metrics during training
        for i in range(args.train_steps + 1):
            t = train_step(model, opt, batches[i % len(batches)], args.device)
            if i == 0:
                target_time[0] = 0.0  # warm-up step
                mask_time[:] = [0.0, 0]
                continue
            steps.append(t)
    train_rois = mask_time[1] / len(steps)  # foreground RoIs the mask head trains on, per step
    step_ms = 1000 * float(np.median(steps))
    target_share = target_time[0] / sum(steps)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(dict(infer_ms=infer_ms, per_roi_ms=per_roi_ms, step_ms=step_ms, dets=num_dets,
                                      train_rois=train_rois,
                                      target_share=target_share, peak_mb=peak_mb)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--dets", type=int, default=50, help="detections per image (both models)")
    ap.add_argument("--images", type=int, default=4, help="real COCO sample images to time")
    ap.add_argument("--size", type=int, default=800, help="short side of the input images")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    ap.add_argument("--levelset-opts", nargs="*", default=[], metavar="KEY VALUE",
                    help="config overrides for LevelSet R-CNN only (a head variant)")
    ap.add_argument("--train-iou-threshold", type=float, default=None,
                    help="MODEL.ROI_HEADS.IOU_THRESHOLDS for both models (default: the config's 0.5). The "
                         "untrained RPN's proposals rarely overlap a GT box, so the mask head trains on few "
                         "RoIs; a low threshold (e.g. 0.05) fills the 25%% foreground quota of 512 per image, "
                         "as a trained RPN does on crowded images")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the interleaved inference timing (both models in one process; default 3), "
                         f"or with --heads of the heads' timing (default {HEADS_ROUNDS})")
    heads = ap.add_argument_group("--heads: the mask branches alone")
    heads.add_argument("--heads", action="store_true", help="time the mask heads alone per RoI, alternating")
    heads.add_argument("--rois", type=int, default=50, help="RoIs per head call")
    heads.add_argument("--threads", type=int, default=2, help="torch threads")
    heads.add_argument("--profile", choices=list(HEADS), metavar="HEAD",
                       help=f"profile this head instead of timing all (implies --heads); one of {list(HEADS)}")
    heads.add_argument("--breakdown", choices=list(HEADS), metavar="HEAD",
                       help="time this LevelSet R-CNN head's parts (initial TSDF, hyperparameter and features "
                            "heads, Chan-Vese steps) beside the whole heads (implies --heads)")
    ap.add_argument("--measure", choices=[*CONFIGS, "interleaved"], help=argparse.SUPPRESS)
    ap.add_argument("--shared-weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.heads or args.profile or args.breakdown:
        args.rounds = HEADS_ROUNDS if args.rounds is None else args.rounds
        return measure_heads(args)
    args.rounds = 3 if args.rounds is None else args.rounds
    if args.images < 2:
        ap.error("--images must be at least 2 (the training step takes a batch of 2 images)")
    if args.measure == "interleaved":
        return measure_interleaved(args)
    if args.measure:
        return measure(args.measure, args)

    import torch

    import levelset_rcnn
    from detectron2.modeling import build_model

    # The shared weights: a seeded Mask R-CNN's backbone, RPN and box head.
    torch.manual_seed(0)
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIGS["mask_rcnn"]))
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", str(args.depth), "MODEL.DEVICE", "cpu", *NORM]
                        + (["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"] if args.depth < 50 else []))
    state = {k: v for k, v in build_model(cfg).state_dict().items() if not k.startswith("roi_heads.mask_head")}
    weights = Path("/tmp") / f"bench_speed_shared_R{args.depth}.pth"
    torch.save(state, weights)

    results = {}
    for name in [*CONFIGS, "interleaved"]:
        cmd = [sys.executable, __file__, "--measure", name, "--shared-weights", str(weights)]
        for k in ("depth", "dets", "images", "size", "train_steps", "device", "rounds", "train_iou_threshold"):
            if getattr(args, k) is not None:
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        cmd += ["--levelset-opts", *args.levelset_opts]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[0][len("RESULT "):])
    m, l, both = results["mask_rcnn"], results["levelset_rcnn"], results["interleaved"]
    mem = "CUDA max allocated" if args.device == "cuda" else "CPU max RSS"
    assert m["dets"] == l["dets"], (m["dets"], l["dets"])  # shared weights: the same detections
    print(f"\nR-{args.depth}-FPN, {args.images} COCO val2017 images (short side {args.size}), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, GroupNorm backbone (random weights). Inference: the whole model with the detections of the shared "
          f"(seeded, untrained) backbone/RPN/box weights, {m['dets']} per image for both models; mask branch: "
          f"{args.dets} fixed boxes per image."
          + (f" LevelSet R-CNN with {' '.join(args.levelset_opts)}." if args.levelset_opts else "")
          + (f" Training: MODEL.ROI_HEADS.IOU_THRESHOLDS [{args.train_iou_threshold}]." if args.train_iou_threshold is not None else "")
          + "\n")
    print("| | Mask R-CNN | LevelSet R-CNN | ratio |\n|---|---|---|---|")
    print(f"| inference per image, both models in one process, alternating (ms) | {both['ms']['mask_rcnn']:.0f} "
          f"| {both['ms']['levelset_rcnn']:.0f} | {both['ratio']:.2f}x (rounds: {both['ratio_min']:.2f}-{both['ratio_max']:.2f}x) |")
    print(f"| training step, batch 2, both models in one process, alternating (ms) | {both['step_ms']['mask_rcnn']:.0f} "
          f"| {both['step_ms']['levelset_rcnn']:.0f} | {both['step_ratio']:.2f}x (pairs: "
          f"{both['step_ratio_min']:.2f}-{both['step_ratio_max']:.2f}x) |")
    for key, label, fmt in [("infer_ms", "inference per image, one process per model (ms)", "{:.0f}"),
                            ("per_roi_ms", "mask branch per RoI (ms)", "{:.2f}"),
                            ("step_ms", "training step, batch 2, one process per model (ms)", "{:.0f}"),
                            ("peak_mb", f"peak memory, {mem} (MiB)", "{:.0f}")]:
        print(f"| {label} | {fmt.format(m[key])} | {fmt.format(l[key])} | {l[key] / m[key]:.2f}x |")
    print(f"| TSDF targets, share of the training step | – | {100 * l['target_share']:.1f}% | |")
    print(f"| mask-head RoIs per training step (foreground proposals) | {m['train_rois']:.0f} | {l['train_rois']:.0f} | |")


if __name__ == "__main__":
    main()
