"""Can LevelSet R-CNN's Chan-Vese module improve a fixed phi_0? Minutes per variant on 2 cores.

From a trained model (LevelSet R-CNN, or any model with its TSDF head), cache for the detections
matched to a GT instance (box IoU >= 0.5) of the first --images training images: the pooled RoI
features (R, 256, 14, 14), phi_0 and the GT mask cropped to the detection box at S x S. Images
alternate between a fitting half and a held-out half. Then, per variant (a set of config
overrides), freeze phi_0, train only the Chan-Vese branch from a fixed initialisation (the
hyperparameter head and the Chan-Vese features head, with the config's optimiser settings:
SGD, BASE_LR, momentum, weight decay, gradient clipping) on l_TSDF(phi_N) at LOSS_WEIGHT_PHIN, and
report on the held-out RoIs: mean IoU change phi_0 -> phi_N (on the S x S grid), the shares of RoIs
helped / hurt (|change| >= 0.01), the shares of pixels whose sign the steps flip (whole grid, and
the boundary band within 2 px of phi_0's zero level), l_TSDF of phi_0 and of phi_N, and the learned
hyperparameters (eps in the evolution's units; dt per step).

    .venv/bin/python tools/analysis/diagnose_chan_vese.py \\
        --config-file configs/LevelSetRCNN/levelset_rcnn_R_18_FPN_GN_dsb2018.yaml \\
        --weights output/bench_dsb2018/levelset_r-cnn/model_final.pth [--variants before 'new (']

The variants are in VARIANTS below; "before" is the parametrisation before EVOLUTION_UNITS and
its companion keys existed, the others add the new keys one at a time up to the defaults ("new").
Prints a Markdown table; --out writes it to a file too.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util

import levelset
import levelset_rcnn
from levelset.metrics import to_rle
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, pairwise_iou
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from levelset_d2.checkpoint import SafeDetectionCheckpointer
from levelset_d2.inference import test_time_input
from levelset_rcnn.mask_head import LevelSetMaskHead, select_class, standardize_crops, tsdf_loss
from levelset_rcnn.roi_heads import pool_image_crops

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
BAND_PX = 2.0  # boundary band: pixels within this distance (px of the S x S grid) of phi_0's zero level


def _gt_masks(record, h, w):
    anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                         dtype=torch.float32).reshape(-1, 4)
    masks = [mask_util.decode(to_rle(a["segmentation"], h, w)).astype(bool) for a in anns]
    return boxes, masks


@torch.no_grad()
def cache_image(cfg, model, record, max_rois, rng):
    """Pooled features, phi_0 (R, 1, T, T) and cropped GT masks (R, S, S) of one image's matched detections."""
    image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    h, w = image.shape[:2]
    gt_boxes, gt_masks = _gt_masks(record, h, w)
    if len(gt_masks) == 0:
        return None
    images = model.preprocess_image([test_time_input(cfg, image)[0]])  # at the test size, as DefaultPredictor
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    heads = model.roi_heads
    det = heads._forward_box(features, proposals)[0]  # boxes only, no mask branch
    if len(det) == 0:
        return None
    scale = torch.tensor([w / images.image_sizes[0][1], h / images.image_sizes[0][0]] * 2)
    iou, best = pairwise_iou(Boxes(det.pred_boxes.tensor * scale), Boxes(gt_boxes)).max(dim=1)
    keep = torch.nonzero(iou >= 0.5).flatten().tolist()
    rng.shuffle(keep)
    keep = torch.tensor(sorted(keep[:max_rois]), dtype=torch.long)
    if len(keep) == 0:
        return None
    det = det[keep]
    head = heads.mask_head
    x = heads.mask_pooler([features[f] for f in heads.mask_in_features], [det.pred_boxes])
    phi0 = select_class(head.initial_tsdf(x), det.pred_classes)
    S = head.evolution_resolution
    gt = BitMasks(torch.from_numpy(np.stack([gt_masks[int(b)] for b in best[keep]])))
    crops = gt.crop_and_resize(det.pred_boxes.tensor * scale, S)
    # The box's crop of the normalised input at S x S, as LevelSetROIHeads pools it.
    img = pool_image_crops(images.tensor, [det.pred_boxes], S)
    return {"x": x, "phi0": phi0, "gt": crops.bool(), "img": img}


def build_cache(cfg, weights, dataset, num_images, max_rois, seed):
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(weights)
    model.eval()
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


def targets(gt, truncation, kind):
    """(R, S, S) bool -> TSDF targets in [-1, 1]: 'half_pixel' (mask_to_tsdf) or 'centres' (the old ones)."""
    if kind == "half_pixel":
        return levelset.mask_to_tsdf(gt, truncation)
    return levelset.signed_distance(gt, truncation) / truncation


def variant_cfg(base_cfg, levelset_opts, other_opts):
    cfg = base_cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_MASK_HEAD.NAME = "LevelSetMaskHead"
    for k, v in levelset_opts.items():
        cfg.MODEL.LEVELSET[k] = v
    for k, v in other_opts.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
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
            "d_iou": r["d_iou"].mean().item(), "helped": (r["d_iou"] >= 0.01).float().mean().item(),
            "hurt": (r["d_iou"] <= -0.01).float().mean().item(), "flip": r["flip"].mean().item(),
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--dataset", default="dsb2018_train", help="its images alternate between fitting and held out")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--rois-per-image", type=int, default=24)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=[], help="names or unique prefixes (default: all)")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of the source model (KEY VALUE ...)")
    args = ap.parse_args()

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
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


if __name__ == "__main__":
    sys.exit(main())
