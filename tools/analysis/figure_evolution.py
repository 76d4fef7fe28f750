"""Figures of the level-set evolution of one instance (issue 5, "Pictures").

LevelSet R-CNN: the RoI crop with the zero level sets of phi_0 ... phi_N and the instance's
learned hyperparameters (lambda1, lambda2, mu, eps_n, dt_n) printed on it::

    .venv/bin/python tools/analysis/figure_evolution.py levelset --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --image datasets/synthetic/val/000000.png --out evolution.png

DELSE (like the paper's Fig. 7): crop, initial level set, motion field, modulation map, result::

    .venv/bin/python tools/analysis/figure_evolution.py delse --config-file <delse cfg> --weights <model.pth> \\
        --image photo.jpg --points "x,y x,y x,y x,y" --out delse.png

Both use the models' own layers and ``levelset``'s evolutions; nothing is recomputed here.
"""
import argparse

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import levelset  # noqa: E402
from levelset_d2.inference import test_time_input  # noqa: E402


@torch.no_grad()
def levelset_rcnn_detections(cfg, model, image, score_thresh=0.0):
    """Run a LevelSet R-CNN on one image and keep every iterate of its detections' evolution.

    Args:
        cfg: the model's config: the image is resized to its test size as DefaultPredictor does.
        image: (H, W, 3) uint8 in the model's input format (cfg.INPUT.FORMAT).
        score_thresh: detections below it are dropped before the mask branch.
    Returns:
        (det, phis, hyper, scale): the detections (Instances, boxes in the resized input),
        phi_0..phi_N as (R, 1, S, S) tensors, the hyperparameters ({name: (R,) or (R, N)}) and the
        (4,) factors taking XYXY boxes from the resized input to the image.
    """
    from levelset_rcnn.mask_head import select_class, split_hyperparameters
    from levelset_rcnn.roi_heads import pool_image_crops

    model.eval()
    h, w = image.shape[:2]
    images = model.preprocess_image([test_time_input(cfg, image)[0]])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    det = model.roi_heads(images, features, proposals, None)[0][0]
    det = det[det.scores >= score_thresh]
    heads = model.roi_heads
    head = heads.mask_head
    x = heads.mask_pooler([features[f] for f in heads.mask_in_features], [det.pred_boxes])
    # IMAGE_FEATURES "raw": the crops LevelSetROIHeads would pass (None otherwise).
    crops = pool_image_crops(images.tensor, [det.pred_boxes], head.image_crop_resolution) if head.image_crop_resolution else None
    out = head.layers(x, crops)
    phi0 = head.upsample(select_class(out["initial_tsdf"], det.pred_classes))
    hyper = split_hyperparameters(out["hyperparameters"], head.num_steps)
    phis = head.evolve(phi0, out, return_all=True)
    scale = np.array([w / images.image_sizes[0][1], h / images.image_sizes[0][0]] * 2, dtype=np.float32)
    return det, phis, hyper, scale


def levelset_rcnn_iterates(cfg, model, image_bgr, instance=0):
    """phi_0..phi_N (list of (S, S) arrays), hyperparameters and the box (image XYXY) of one detection."""
    det, phis, hyper, scale = levelset_rcnn_detections(cfg, model, image_bgr)
    if len(det) <= instance:
        raise ValueError(f"only {len(det)} detections; cannot show instance {instance}")
    box = det.pred_boxes.tensor[instance].cpu().numpy() * scale  # the figure crops the original image
    return ([p[instance, 0].cpu().numpy() for p in phis], {k: v[instance].cpu().numpy() for k, v in hyper.items()},
            box)


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


@torch.no_grad()
def delse_maps(predictor, image_bgr, points):
    """Crop, phi_0, motion field, modulation and phi_T of one object given four clicks."""
    result = predictor.predict(image_bgr, points)
    st = predictor._state
    terms = predictor.model.corrected_terms(st["images"], [st["interaction"]])
    crop = st["images"][0].permute(1, 2, 0).cpu().numpy()
    if predictor.input_format == "BGR":
        crop = crop[:, :, ::-1]
    return {
        "crop": np.clip(crop, 0, 255).astype(np.uint8),
        "phi0": terms["phi0"][0, 0].float().cpu().numpy(),
        "motion": terms["motion"][0].float().cpu().numpy(),
        "modulation": terms["modulation"][0, 0].float().cpu().numpy(),
        "phiT": result.phi,
    }


def plot_delse(maps, out, arrows=24):
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    titles = ["crop, φ0 (red) and φT (yellow)", "initial level set φ0", "motion field V", "modulation m"]
    axes[0].imshow(maps["crop"])
    for key, c in (("phi0", "red"), ("phiT", "yellow")):
        if maps[key].min() < 0 < maps[key].max():
            axes[0].contour(maps[key], levels=[0.0], colors=[c], linewidths=1.5)
    axes[1].imshow(maps["phi0"], cmap="RdBu_r")
    S = maps["motion"].shape[-1]
    step = max(S // arrows, 1)
    yy, xx = np.mgrid[0:S:step, 0:S:step]
    axes[2].imshow(maps["crop"], alpha=0.4)
    axes[2].quiver(xx, yy, maps["motion"][0, ::step, ::step], maps["motion"][1, ::step, ::step], color="blue",
                   angles="xy", scale_units="xy")
    im = axes[3].imshow(maps["modulation"], vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["levelset", "delse"])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", default="")
    ap.add_argument("--image", required=True)
    ap.add_argument("--instance", type=int, default=0, help="which detection (levelset)")
    ap.add_argument("--points", help='four clicks "x,y x,y x,y x,y" (delse)')
    ap.add_argument("--out", default="evolution.png")
    args = ap.parse_args()

    import levelset_rcnn

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.MODEL.WEIGHTS = args.weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    image = cv2.imread(args.image)
    if image is None:
        raise SystemExit(f"cannot read image {args.image}")
    if args.model == "levelset":
        from detectron2.engine import DefaultPredictor

        model = DefaultPredictor(cfg).model
        plot_levelset_rcnn(image, *levelset_rcnn_iterates(cfg, model, image, args.instance), args.out)
    else:
        import delse

        if not args.points:
            raise SystemExit("--points is required for delse")
        points = [tuple(float(v) for v in p.split(",")) for p in args.points.split()]
        plot_delse(delse_maps(delse.DELSEPredictor(cfg), image, points), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
