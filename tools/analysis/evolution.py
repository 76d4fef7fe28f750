"""What LevelSet R-CNN's Chan-Vese evolution does, and whether it can do better: one tool, two questions.

``detections``: on a trained model's own detections over a dataset. For each detection matched to a
GT instance (box IoU >= 0.5, score >= --score), the mask IoU of phi_0 and of phi_N against that
instance (both pasted into the image as Detectron2 does), how often the N steps help or hurt and by
how much, the share of the 112 x 112 grid whose sign they flip, and the learned per-instance
hyperparameters. It answers "is the evolution doing anything, and is it the right thing?" when
LevelSet R-CNN and its own phi_0 row score alike::

    .venv/bin/python tools/analysis/evolution.py detections \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_18_FPN_GN_dsb2018.yaml \\
        --weights output/bench_dsb2018/levelset_r-cnn/model_final.pth --dataset dsb2018_dev

``frozen-phi0``: can the Chan-Vese module improve a fixed phi_0? Minutes per variant on 2 cores. From a
trained model (LevelSet R-CNN, or any model with its TSDF head), cache for the detections matched to
a GT instance (box IoU >= 0.5) of the first --images images: the pooled RoI features (R, 256, 14, 14),
phi_0 and the GT mask cropped to the detection box at S x S. Images alternate between a fitting half
and a held-out half. Then, per variant (a set of config overrides, VARIANTS below), freeze phi_0,
train only the Chan-Vese branch from a fixed initialisation (the hyperparameter head and the
Chan-Vese features head, with the config's optimiser settings: SGD, BASE_LR, momentum, weight decay,
gradient clipping) on l_TSDF(phi_N) at LOSS_WEIGHT_PHIN, and report on the held-out RoIs: mean IoU
change phi_0 -> phi_N (on the S x S grid), the shares of RoIs helped / hurt (|change| >= 0.01), the
shares of pixels whose sign the steps flip (whole grid, and the boundary band within 2 px of phi_0's
zero level), l_TSDF of phi_0 and of phi_N, and the learned hyperparameters (eps in the evolution's
units; dt per step)::

    .venv/bin/python tools/analysis/evolution.py frozen-phi0 \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_18_FPN_GN_dsb2018.yaml \\
        --weights output/bench_dsb2018/levelset_r-cnn/model_final.pth [--variants before 'new (']

"before" is the parametrisation before EVOLUTION_UNITS and its companion keys existed; the other
variants add the new keys one at a time up to the defaults ("new").

Both run the images at the model's test size (``levelset_rcnn.analysis.trace_evolution``, as
``DefaultPredictor``) and print Markdown; ``detections --json`` writes the per-detection numbers,
``frozen-phi0 --out`` the table.

``figure``: the RoI crop of one detection with the zero levels of phi_0 ... phi_N and its learned
hyperparameters (lambda1, lambda2, mu, eps_n, dt_n) printed on it::

    .venv/bin/python tools/analysis/evolution.py figure --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --image datasets/synthetic/val/000000.png --out evolution.png
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

import levelset  # noqa: E402
import levelset_rcnn  # noqa: E402
from levelset.metrics import to_rle  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping  # noqa: E402
from detectron2.structures import BitMasks  # noqa: E402
from levelset_d2.checkpoint import SafeDetectionCheckpointer  # noqa: E402
from levelset_rcnn.analysis import match_to_ground_truth, trace_evolution  # noqa: E402
from levelset_rcnn.mask_head import LevelSetMaskHead, standardize_crops, tsdf_loss  # noqa: E402

BAND_PX = 2.0  # the boundary band of the flip statistics: pixels of the S x S grid within this of phi_0's zero level
CHANGE = 0.01  # an IoU change of at least this much counts as "helped" (or "hurt")


def load_model(cfg, weights):
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(weights)
    return model.eval()


# ---------------------------------------------------------------- detections: the trained model as it runs

def _rles(masks):
    """(R, H, W) bool tensor -> list of RLEs."""
    return mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


def analyse_image(cfg, model, record, score_thresh, match_iou=0.5):
    """Per-detection records of one image: matched GT, IoU of phi_0 / phi_N, flipped share, hyperparameters."""
    image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    h, w = image.shape[:2]
    if not any(not a.get("iscrowd", 0) for a in record.get("annotations", [])):
        return []
    trace = trace_evolution(cfg, model, image, score_thresh)
    # Detections whose box is empty at the image's size are dropped, as detector_postprocess drops them.
    clipped = trace.boxes_in_image()
    clipped.clip((h, w))
    keep = clipped.nonempty()
    det, phis = trace.instances[keep], [p[keep] for p in trace.phis]
    hyper = {k: v[keep] for k, v in trace.hyperparameters.items()}
    if len(det) == 0:
        return []
    phi0, phin = phis[0], phis[-1]
    head = model.roi_heads.mask_head
    pasted = {}
    for name, phi in (("phi0", phi0), ("phiN", phin)):
        inst = det[:]
        inst.pred_boxes = det.pred_boxes.clone()  # detector_postprocess scales the boxes in place
        inst.pred_masks = levelset.heaviside(phi.float(), head.loss_eps)  # as levelset_inference
        pasted[name] = _rles(detector_postprocess(inst, h, w).pred_masks.cpu())
    matched, best, _, gt = match_to_ground_truth(trace.boxes_in_image()[keep], record["annotations"], match_iou)
    gt_rles = [to_rle(a["segmentation"], h, w) for a in gt]
    flipped, flipped_band = levelset.sign_flips(phi0, phin, band=BAND_PX, pixels_per_unit=head.truncation)
    rows = []
    for i in torch.nonzero(matched).flatten().tolist():
        g = gt_rles[int(best[i])]
        rows.append({
            "image_id": record.get("image_id"),
            "detection": i,
            "gt_index": int(best[i]),
            "score": float(det.scores[i]),
            "iou_phi0": float(mask_util.iou([pasted["phi0"][i]], [g], [0])[0, 0]),
            "iou_phiN": float(mask_util.iou([pasted["phiN"][i]], [g], [0])[0, 0]),
            "flipped": float(flipped[i]),
            "flipped_band": float(flipped_band[i]),
            "gt_area": float(mask_util.area(g)),
            **{k: v[i].cpu().tolist() for k, v in hyper.items()},
        })
    return rows


def summarise(rows):
    """Markdown lines summarising per-detection rows."""
    if not rows:
        return ["no matched detections"]
    d = {k: np.array([r[k] for r in rows]) for k in ("iou_phi0", "iou_phiN", "flipped", "flipped_band", "gt_area")}
    delta = d["iou_phiN"] - d["iou_phi0"]
    lines = [f"{len(rows)} matched detections.", "",
             "| | mean | median |", "|---|---|---|",
             f"| mask IoU of phi_0 | {d['iou_phi0'].mean():.4f} | {np.median(d['iou_phi0']):.4f} |",
             f"| mask IoU of phi_N | {d['iou_phiN'].mean():.4f} | {np.median(d['iou_phiN']):.4f} |",
             f"| IoU change phi_0 -> phi_N | {delta.mean():+.4f} | {np.median(delta):+.4f} |",
             f"| share of the grid whose sign the steps flip | {d['flipped'].mean():.4f} | {np.median(d['flipped']):.4f} |",
             f"| share of the boundary band (±{BAND_PX:g} px of phi_0's zero level) flipped | "
             f"{d['flipped_band'].mean():.4f} | {np.median(d['flipped_band']):.4f} |",
             "", f"Evolution helps (IoU +{CHANGE:g} or more) {100 * (delta >= CHANGE).mean():.1f}% of detections, "
             f"hurts (-{CHANGE:g} or more) {100 * (delta <= -CHANGE).mean():.1f}%, leaves within {CHANGE:g} the rest."]
    order = np.argsort(d["gt_area"], kind="stable")
    small, large = order[: len(order) // 2], order[len(order) // 2:]
    if len(small):
        lines.append(f"IoU change on the smaller half of the objects (area <= {d['gt_area'][small].max():.0f} px): "
                     f"{delta[small].mean():+.4f}; larger half: {delta[large].mean():+.4f}.")
    hyper = ["lambda1", "lambda2", "mu", "eps", "dt"]
    lines += ["", "Learned hyperparameters (mean ± std over detections; eps and dt per step):", ""]
    for k in hyper:
        if k in rows[0]:
            v = np.array([r[k] for r in rows], dtype=np.float64)
            mean, std = v.mean(0), v.std(0)
            fmt = (lambda a, b: f"{a:.3f} ± {b:.3f}")
            lines.append(f"- {k}: " + (", ".join(fmt(a, b) for a, b in zip(np.atleast_1d(mean), np.atleast_1d(std)))))
    return lines


# ---------------------------------------------------------------- frozen-phi0: the Chan-Vese branch retrained on a fixed phi_0

@torch.no_grad()
def cache_image(cfg, model, record, max_rois, rng):
    """Pooled features (R, C, 14, 14), phi_0 (R, 1, S, S), cropped GT masks (R, S, S) and image crops
    (R, 3, S, S) of up to max_rois of one image's matched detections (None if there are none)."""
    image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    h, w = image.shape[:2]
    trace = trace_evolution(cfg, model, image)
    boxes = trace.boxes_in_image()
    matched, best, _, gt = match_to_ground_truth(boxes, record.get("annotations", []))
    keep = torch.nonzero(matched).flatten().tolist()
    rng.shuffle(keep)
    keep = torch.tensor(sorted(keep[:max_rois]), dtype=torch.long)
    if len(keep) == 0:
        return None
    S = model.roi_heads.mask_head.evolution_resolution
    masks = BitMasks(torch.from_numpy(np.stack(
        [mask_util.decode(to_rle(gt[int(b)]["segmentation"], h, w)).astype(bool) for b in best[keep]])))
    return {"x": trace.pooled[keep], "phi0": trace.phis[0][keep],
            "gt": masks.crop_and_resize(boxes.tensor[keep], S).bool(), "img": trace.image_crops[keep]}


def build_cache(cfg, weights, dataset, num_images, max_rois, seed):
    model = load_model(cfg, weights)
    rng = random.Random(seed)
    records = DatasetCatalog.get(dataset)[:num_images]
    parts = {"fit": [], "held_out": []}
    for i, rec in enumerate(records):
        c = cache_image(cfg, model, rec, max_rois, rng)
        if c is not None:
            parts["fit" if i % 2 == 0 else "held_out"].append(c)
    head = model.roi_heads.mask_head
    data = {k: {f: torch.cat([c[f] for c in v]) for f in ("x", "phi0", "gt", "img")} for k, v in parts.items()}
    # The trained TSDF head, frozen: with FEATURES_INPUT "tsdf_convs" the features head reads its convs.
    data["tsdf_head"] = head.initial_tsdf_head.state_dict()
    return data, head.upsample, head.truncation


# The parametrisation before EVOLUTION_UNITS & co. (session 3): normalised units, 2 * sigmoid
# hyperparameters all starting at 1, GRAD_EPS 1e-3, raw features, unbounded phi_N.
BEFORE = {"EVOLUTION_UNITS": "normalized", "HYPERPARAM_INIT": [1.0, 1.0, 1.0, 1.0, 1.0], "HYPERPARAM_FLOOR": 0.0,
          "GRAD_EPS": 1e-3, "NORMALIZE_FEATURES": False, "BOUND_PHI": False}
# name -> (MODEL.LEVELSET overrides, other overrides, targets): each row adds one change to the one above.
VARIANTS = {
    "before": (BEFORE, {}, "centres"),
    "+ half-pixel targets": (BEFORE, {}, "half_pixel"),
    "+ pixel units (eps 2 px, dt 4, mu 0.5)": (dict(BEFORE, EVOLUTION_UNITS="pixels", HYPERPARAM_INIT=[1.0, 1.0, 0.5, 2.0, 4.0]), {}, "half_pixel"),
    "+ floor 0.1": (dict(BEFORE, EVOLUTION_UNITS="pixels", HYPERPARAM_INIT=[1.0, 1.0, 0.5, 2.0, 4.0], HYPERPARAM_FLOOR=0.1), {}, "half_pixel"),
    "+ grad_eps 0.1": (dict(BEFORE, EVOLUTION_UNITS="pixels", HYPERPARAM_INIT=[1.0, 1.0, 0.5, 2.0, 4.0], HYPERPARAM_FLOOR=0.1, GRAD_EPS=0.1), {}, "half_pixel"),
    "+ unit features": (dict(BOUND_PHI=False, NORMALIZE_FEATURES=True), {}, "half_pixel"),
    "+ bounded phi": (dict(NORMALIZE_FEATURES=True), {}, "half_pixel"),
    "+ bounded phi, no gradient clipping": (dict(NORMALIZE_FEATURES=True), {"SOLVER.CLIP_GRADIENTS.ENABLED": False}, "half_pixel"),
    # Unit features pin lambda1, lambda2 and dt at their bounds (the data term is capped at 4):
    # the defaults leave them out.
    "new (defaults: + grad_eps 0.1 + bounded phi)": ({}, {}, "half_pixel"),
    "new, no gradient clipping": ({}, {"SOLVER.CLIP_GRADIENTS.ENABLED": False}, "half_pixel"),
    # Not in the paper: does full-resolution image evidence let the steps fix what a 28 x 28 phi_0
    # cannot? The Chan-Vese features get the RoI's image crop at S x S (RoIAlign of the normalised
    # input, standardised per RoI and channel) beside the head's embedding (upsampled from 14 x 14).
    "new + image crop (raw)": ({"IMAGE_FEATURES": "raw"}, {"MODEL.ROI_HEADS.NAME": "LevelSetROIHeads"}, "half_pixel"),
    "new + image crop (3x3 conv, 16 ch)": ({}, {}, "half_pixel"),
    # Issue #21 item 4: the paper's embedding standardised per RoI and channel, learned floored gain.
    "new + standardised F": ({"STANDARDIZE_FEATURES": True}, {}, "half_pixel"),
}
# The raw crop is the head's own MODEL.LEVELSET.IMAGE_FEATURES "raw"; the conv variant exists only here:
# a trainable 3x3 conv of the standardised crop (16 channels) concatenated to the upsampled embedding.
CONV_IMAGE_FEATURES = {"new + image crop (3x3 conv, 16 ch)"}


def targets(gt, truncation, kind):
    """(R, S, S) bool -> TSDF targets in [-1, 1]: 'half_pixel' (mask_to_tsdf) or 'centres' (the old ones)."""
    if kind == "half_pixel":
        return levelset.mask_to_tsdf(gt, truncation)
    return levelset.signed_distance(gt, truncation) / truncation


def variant_cfg(base_cfg, levelset_opts, other_opts):
    cfg = base_cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_MASK_HEAD.NAME = "LevelSetMaskHead"
    cfg.merge_from_list([x for k, v in levelset_opts.items() for x in (f"MODEL.LEVELSET.{k}", v)]
                        + [x for kv in other_opts.items() for x in kv])
    return cfg


def iou(a, b):
    """(R, S, S) bool pairs -> (R,) IoU."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


class ConvImageFeatures(torch.nn.Module):
    """Chan-Vese features = the head's embedding (R, C, S, S) and a trainable 3x3 conv (16 channels,
    ReLU) of the RoI's standardised image crop (R, 3, S, S)."""

    def __init__(self, enabled):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1) if enabled else None

    def forward(self, outputs, img):
        if self.conv is None:
            return outputs
        extra = torch.relu(self.conv(standardize_crops(img)))
        # The head's embedding is coarser (the core reads it as its bilinear upsampling): upsample it.
        feats = torch.nn.functional.interpolate(outputs["chan_vese_features"], size=img.shape[-2:],
                                                mode="bilinear", align_corners=False)
        return dict(outputs, chan_vese_features=torch.cat([feats, extra], dim=1))


def run_variant(name, cfg, data, upsample, truncation, target_kind, iters, batch, seed):
    torch.manual_seed(seed)
    head = LevelSetMaskHead(cfg, ShapeSpec(channels=data["fit"]["x"].shape[1], height=14, width=14))
    if head.features_input == "tsdf_convs":  # the features head reads the source model's (frozen) conv stack
        head.initial_tsdf_head.load_state_dict(data["tsdf_head"])
    image_features = ConvImageFeatures(name in CONV_IMAGE_FEATURES)
    trainable = torch.nn.ModuleList([head.hyperparameter_head, head.chan_vese_features, image_features])
    params = list(trainable.parameters())
    optim_cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    optimizer = optim_cls(get_default_optimizer_params(trainable, base_lr=cfg.SOLVER.BASE_LR,
                                                       weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM),
                          lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    fit = data["fit"]
    fit_tsdf = targets(fit["gt"], truncation, target_kind)
    g = torch.Generator().manual_seed(seed)
    head.train()
    t0 = time.perf_counter()
    losses, nonfinite = [], 0
    for it in range(iters):
        idx = torch.randint(len(fit["x"]), (batch,), generator=g)
        out = image_features(head.layers(fit["x"][idx], fit["img"][idx]), fit["img"][idx])
        phi0 = upsample(fit["phi0"][idx])
        phin = head.evolve(phi0, out)
        loss = cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHIN * tsdf_loss(phin, fit_tsdf[idx], fit["gt"][idx], head.loss_eps)
        optimizer.zero_grad()
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            nonfinite += 1
            continue
        optimizer.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    return evaluate(name, head, image_features, data["held_out"], upsample, truncation, target_kind) | {
        "train_s": train_s, "nonfinite_steps": nonfinite, "fit_loss_first": float(np.mean(losses[:10])) if losses else float("nan"),
        "fit_loss_last": float(np.mean(losses[-10:])) if losses else float("nan")}


@torch.no_grad()
def evaluate(name, head, image_features, held, upsample, truncation, target_kind, chunk=64):
    head.eval()
    rows = {k: [] for k in ("d_iou", "iou0", "iouN", "flip", "flip_band", "l0", "lN")}
    hyper = []
    gt_tsdf = targets(held["gt"], truncation, target_kind)
    for s in range(0, len(held["x"]), chunk):
        sl = slice(s, s + chunk)
        out = image_features(head.layers(held["x"][sl], held["img"][sl]), held["img"][sl])
        phi0 = upsample(held["phi0"][sl])
        phin = head.evolve(phi0, out)
        gt = held["gt"][sl]
        i0, iN = iou(phi0[:, 0] > 0, gt), iou(phin[:, 0] > 0, gt)
        flipped, flipped_band = levelset.sign_flips(phi0, phin, band=BAND_PX, pixels_per_unit=truncation)
        rows["iou0"].append(i0)
        rows["iouN"].append(iN)
        rows["d_iou"].append(iN - i0)
        rows["flip"].append(flipped)
        rows["flip_band"].append(flipped_band)
        for k, phi in (("l0", phi0), ("lN", phin)):
            rows[k].append(torch.stack([tsdf_loss(phi[j:j + 1], gt_tsdf[sl][j:j + 1], gt[j:j + 1], head.loss_eps)
                                        for j in range(len(gt))]))
        hyper.append(out["hyperparameters"])
    r = {k: torch.cat(v) for k, v in rows.items()}
    h = torch.cat(hyper).mean(0)
    n = head.num_steps
    return {"name": name, "rois": len(r["d_iou"]), "iou0": r["iou0"].mean().item(), "iouN": r["iouN"].mean().item(),
            "d_iou": r["d_iou"].mean().item(), "helped": (r["d_iou"] >= CHANGE).float().mean().item(),
            "hurt": (r["d_iou"] <= -CHANGE).float().mean().item(), "flip": r["flip"].mean().item(),
            "flip_band": r["flip_band"].mean().item(), "l0": r["l0"].mean().item(), "lN": r["lN"].mean().item(),
            "lambda1": h[0].item(), "lambda2": h[1].item(), "mu": h[2].item(),
            "eps": h[3:3 + n].tolist(), "dt": h[3 + n:].tolist()}


def table(results):
    lines = ["| variant | ΔIoU φ0→φN | helped | hurt | flipped (grid) | flipped (band ±2 px) | l_TSDF φ0 → φN | λ1, λ2, μ | ε_n | Δt_n | non-finite steps | fit time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['d_iou']:+.4f} ({r['iou0']:.3f} → {r['iouN']:.3f}) | {100 * r['helped']:.1f}% | "
            f"{100 * r['hurt']:.1f}% | {100 * r['flip']:.2f}% | {100 * r['flip_band']:.1f}% | {r['l0']:.3f} → {r['lN']:.3f} | "
            f"{r['lambda1']:.2f}, {r['lambda2']:.2f}, {r['mu']:.2f} | {', '.join(f'{v:.2f}' for v in r['eps'])} | "
            f"{', '.join(f'{v:.2f}' for v in r['dt'])} | {r['nonfinite_steps']} | {r['train_s']:.0f} s |")
    return "\n".join(lines)


# ---------------------------------------------------------------- figure: one instance's evolution

def levelset_rcnn_iterates(cfg, model, image_bgr, instance=0):
    """phi_0..phi_N (list of (S, S) arrays), hyperparameters and the box (image XYXY) of one detection."""
    trace = trace_evolution(cfg, model, image_bgr)
    if len(trace.instances) <= instance:
        raise ValueError(f"only {len(trace.instances)} detections; cannot show instance {instance}")
    box = trace.boxes_in_image().tensor[instance].numpy()  # the figure crops the original image
    return ([p[instance, 0].cpu().numpy() for p in trace.phis],
            {k: v[instance].cpu().numpy() for k, v in trace.hyperparameters.items()}, box)


def plot_levelset_rcnn(image_bgr, phis, hyper, box, out):
    """Crop of ``box`` resized to the evolution grid with the zero level set of every iterate."""
    S = phis[0].shape[0]
    x0, y0, x1, y1 = box
    src = np.float32([[x0, y0], [x1, y0], [x0, y1]])
    dst = np.float32([[0, 0], [S, 0], [0, S]])
    crop = cv2.warpAffine(image_bgr, cv2.getAffineTransform(src, dst), (S, S), flags=cv2.INTER_LINEAR)
    fig, ax = plt.subplots(figsize=(5, 5.6))
    ax.imshow(crop[:, :, ::-1])
    colors = plt.cm.autumn(np.linspace(0, 1, len(phis)))
    for n, (phi, c) in enumerate(zip(phis, colors)):
        if phi.min() < 0 < phi.max():
            ax.contour(phi, levels=[0.0], colors=[c], linewidths=2 if n in (0, len(phis) - 1) else 1)
        ax.plot([], [], color=c, label=f"zero level of φ{n}")
    eps = ", ".join(f"{e:.2f}" for e in np.atleast_1d(hyper["eps"]))
    dts = ", ".join(f"{d:.2f}" for d in np.atleast_1d(hyper["dt"]))
    ax.set_title(f"λ1={float(hyper['lambda1']):.2f}  λ2={float(hyper['lambda2']):.2f}  μ={float(hyper['mu']):.2f}\n"
                 f"ε_n=({eps})  Δt_n=({dts})", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def run_detections(cfg, args):
    model = load_model(cfg, args.weights)
    records = DatasetCatalog.get(args.dataset)
    records = records[: args.images] if args.images else records
    rows = []
    for k, record in enumerate(records):
        rows += analyse_image(cfg, model, record, args.score)
        print(f"[{k + 1}/{len(records)}] {len(rows)} matched detections", flush=True)
    print("\n".join(summarise(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


def run_frozen_phi0(cfg, args):
    names = list(VARIANTS)
    if args.variants:
        names = []
        for w in args.variants:
            hits = [n for n in VARIANTS if n == w] or [n for n in VARIANTS if n.startswith(w)]
            if len(hits) != 1:
                raise SystemExit(f"--variants: {w!r} matches {hits or 'nothing'}; names: {list(VARIANTS)}")
            names.append(hits[0])
    t0 = time.perf_counter()
    data, upsample, truncation = build_cache(cfg, args.weights, args.dataset, args.images, args.rois_per_image, args.seed)
    print(f"cached {len(data['fit']['x'])} fitting / {len(data['held_out']['x'])} held-out RoIs from "
          f"{args.images} images of {args.dataset} in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for name in names:
        ls_opts, other, kind = VARIANTS[name]
        r = run_variant(name, variant_cfg(cfg, ls_opts, other), data, upsample, truncation, kind,
                        args.iters, args.batch, args.seed)
        print(f"{name}: ΔIoU {r['d_iou']:+.4f}, helped {100 * r['helped']:.1f}%, hurt {100 * r['hurt']:.1f}%, "
              f"band flipped {100 * r['flip_band']:.1f}%, dt {['%.2f' % v for v in r['dt']]}, "
              f"fit loss {r['fit_loss_first']:.3f} -> {r['fit_loss_last']:.3f} ({r['train_s']:.0f} s)", flush=True)
        results.append(r)
    md = table(results)
    print("\n" + md)
    if args.out:
        Path(args.out).write_text(md + "\n")


def run_figure(cfg, args):
    image = cv2.imread(args.image)
    if image is None:
        raise SystemExit(f"cannot read image {args.image}")
    model = load_model(cfg, args.weights)
    plot_levelset_rcnn(image, *levelset_rcnn_iterates(cfg, model, image, args.instance), args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    det = sub.add_parser("detections", help="what the steps do on a trained model's detections")
    det.add_argument("--dataset", required=True)
    det.add_argument("--images", type=int, default=0, help="first N images (0: all)")
    det.add_argument("--score", type=float, default=0.5, help="score threshold of the analysed detections")
    det.add_argument("--json", help="write the per-detection numbers here")
    frz = sub.add_parser("frozen-phi0", help="retrain only the Chan-Vese branch on a trained model's frozen phi_0")
    frz.add_argument("--dataset", default="dsb2018_train", help="its images alternate between fitting and held out")
    frz.add_argument("--images", type=int, default=60)
    frz.add_argument("--rois-per-image", type=int, default=24)
    frz.add_argument("--iters", type=int, default=200)
    frz.add_argument("--batch", type=int, default=32)
    frz.add_argument("--seed", type=int, default=0)
    frz.add_argument("--variants", nargs="*", default=[], help="names or unique prefixes (default: all)")
    frz.add_argument("--out", help="also write the table here")
    fig = sub.add_parser("figure", help="one detection's phi_0 ... phi_N zero levels and hyperparameters, drawn")
    fig.add_argument("--image", required=True)
    fig.add_argument("--instance", type=int, default=0, help="which detection (by score)")
    fig.add_argument("--out", default="evolution.png")
    for p in (det, frz, fig):
        p.add_argument("--config-file", required=True)
        p.add_argument("--weights", required=True)
        p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of the model (KEY VALUE ...)")
    args = ap.parse_args(argv)
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    {"detections": run_detections, "frozen-phi0": run_frozen_phi0, "figure": run_figure}[args.command](cfg, args)


if __name__ == "__main__":
    sys.exit(main())
