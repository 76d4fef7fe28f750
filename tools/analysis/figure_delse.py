"""DELSE's maps for one object, like the paper's Fig. 7: crop, initial level set, motion field,
modulation map and result, from the model's own layers (nothing is recomputed here)::

    .venv/bin/python tools/analysis/figure_delse.py --config-file <delse cfg> --weights <model.pth> \\
        --image photo.jpg --points "x,y x,y x,y x,y" --out delse.png

LevelSet R-CNN's evolution pictures: ``tools/analysis/evolution.py figure``.
"""
import argparse

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import delse  # noqa: E402
from levelset_d2 import get_cfg  # noqa: E402


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
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", default="")
    ap.add_argument("--image", required=True)
    ap.add_argument("--points", required=True, help='four clicks "x,y x,y x,y x,y"')
    ap.add_argument("--out", default="delse.png")
    args = ap.parse_args()
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.MODEL.WEIGHTS = args.weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    image = cv2.imread(args.image)
    if image is None:
        raise SystemExit(f"cannot read image {args.image}")
    points = [tuple(float(v) for v in p.split(",")) for p in args.points.split()]
    plot_delse(delse_maps(delse.DELSEPredictor(cfg), image, points), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
