"""Benchmarks of the shared level-set core. Prints Markdown tables for BENCHMARKS.md.

    .venv/bin/python tools/benchmarks/bench_core.py [--device cpu|cuda] [--skip-skimage] [--only bandwidth ...] [--compile]

1. ``mask_to_tsdf`` cost for R RoIs at 112x112 (the LevelSet R-CNN target size), vs SciPy in a loop.
2. One Chan-Vese step on 50 RoIs x 64 x 112 x 112: a naive ``(F - c)^2`` implementation vs
   ``levelset.chan_vese`` (which expands the data term), forward and forward+backward.
3. The 3-step Chan-Vese forward against the memory-bandwidth bound of the device: the time to read
   phi_0 and the features and write phi_N once at the measured copy bandwidth (what a kernel fusing
   all steps could reach), and the evolution's cost in elementwise passes over phi. With ``--compile``
   also the same forward through ``torch.compile`` (Inductor fuses elementwise ops; needs a C++
   compiler on CPU), its first-call compile time and its largest difference from the eager result.
4. Classic Chan-Vese on real photographs (scikit-image's test images) against
   ``skimage.segmentation.chan_vese``: energy ratio and partition IoU.
5. ``levelset.synthetic.generate_coco_dataset``: time to write the built-in synthetic set (it is made
   on first use by the demo and the tests; was a wall-clock test, now measured here).
"""
import argparse
import time

import numpy as np
import torch

import levelset
from levelset.functional import curvature, dirac, heaviside


def timeit(fn, repeat=5, device="cpu"):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def naive_chan_vese(phi, feats, lambda1, lambda2, mu, eps, dt, steps):
    """The textbook implementation: materialise (F - c1)^2 and (F - c2)^2 at every step."""
    for _ in range(steps):
        h = heaviside(phi, eps)
        c1 = (feats * h).sum((2, 3), keepdim=True) / h.sum((2, 3), keepdim=True).clamp_min(1e-4)
        c2 = (feats * (1 - h)).sum((2, 3), keepdim=True) / (1 - h).sum((2, 3), keepdim=True).clamp_min(1e-4)
        data = -lambda1 * ((feats - c1) ** 2).sum(1, keepdim=True) + lambda2 * ((feats - c2) ** 2).sum(1, keepdim=True)
        phi = phi + dt * dirac(phi, eps) * (mu * curvature(phi, "sobel") + data)
    return phi


def bench_tsdf(device):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    rows = []
    for R in (64, 256, 512):
        masks = np.stack([ndimage.gaussian_filter(rng.standard_normal((112, 112)), 8) > 0 for _ in range(R)])
        t = torch.from_numpy(masks).to(device)
        ours = timeit(lambda: levelset.mask_to_tsdf(t, 10.0), device=device)
        ref = timeit(lambda: [ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m) for m in masks],
                     repeat=3)
        rows.append(f"| {R} | {ours:.1f} | {ref:.1f} |")
    print("\n### mask_to_tsdf, 112x112 masks, truncation 10 px\n")
    print("| RoIs | levelset.mask_to_tsdf (ms) | SciPy EDT loop, unclamped (ms) |\n|---|---|---|")
    print("\n".join(rows))


def random_hyperparameters(R, steps, device):
    """Per-RoI Chan-Vese hyperparameters in the ranges the hyperparameter head produces."""
    return dict(lambda1=torch.rand(R, device=device) + 0.5, lambda2=torch.rand(R, device=device) + 0.5,
                mu=torch.rand(R, device=device), eps=torch.rand(R, steps, device=device) + 0.1,
                dt=torch.rand(R, steps, device=device))


def bench_chan_vese(device, R=50, C=64, S=112, steps=3):
    torch.manual_seed(0)
    phi = torch.randn(R, 1, S, S, device=device).tanh()
    feats = torch.randn(R, C, S, S, device=device)
    kw = random_hyperparameters(R, steps, device)

    def ours_fwd():
        with torch.no_grad():
            levelset.chan_vese(phi, feats, steps=steps, **kw)

    def naive_fwd():
        with torch.no_grad():
            for n in range(1):  # the naive version takes scalar-per-step hyperparameters
                naive_chan_vese(phi, feats, kw["lambda1"].view(R, 1, 1, 1), kw["lambda2"].view(R, 1, 1, 1),
                                kw["mu"].view(R, 1, 1, 1), kw["eps"][:, 0].view(R, 1, 1, 1),
                                kw["dt"][:, 0].view(R, 1, 1, 1), steps)

    def ours_bwd():
        p, f = phi.clone().requires_grad_(), feats.clone().requires_grad_()
        levelset.chan_vese(p, f, steps=steps, **kw).sum().backward()

    def naive_bwd():
        p, f = phi.clone().requires_grad_(), feats.clone().requires_grad_()
        naive_chan_vese(p, f, kw["lambda1"].view(R, 1, 1, 1), kw["lambda2"].view(R, 1, 1, 1), kw["mu"].view(R, 1, 1, 1),
                        kw["eps"][:, 0].view(R, 1, 1, 1), kw["dt"][:, 0].view(R, 1, 1, 1), steps).sum().backward()

    coarse = torch.randn(R, C, S // 4, S // 4, device=device)  # what LevelSetMaskHead hands over

    def coarse_fwd():
        with torch.no_grad():
            levelset.chan_vese(phi, coarse, steps=steps, **kw)

    def coarse_bwd():
        p, f = phi.clone().requires_grad_(), coarse.clone().requires_grad_()
        levelset.chan_vese(p, f, steps=steps, **kw).sum().backward()

    a, b, e = timeit(naive_fwd, device=device), timeit(ours_fwd, device=device), timeit(coarse_fwd, device=device)
    c, d, g = timeit(naive_bwd, 3, device=device), timeit(ours_bwd, 3, device=device), timeit(coarse_bwd, 3, device=device)
    print(f"\n### Chan-Vese, {R} RoIs x {C} channels x {S}x{S}, {steps} steps ({device})\n")
    print(f"| | naive (F - c)^2 on {S}x{S} (ms) | levelset.chan_vese, {S}x{S} features (ms) "
          f"| levelset.chan_vese, {S // 4}x{S // 4} features = their exact bilinear upsampling (ms) |\n|---|---|---|---|")
    print(f"| forward | {a:.0f} | {b:.0f} ({a / b:.1f}x faster) | {e:.0f} ({a / e:.1f}x faster) |")
    print(f"| forward + backward | {c:.0f} | {d:.0f} ({c / d:.1f}x faster) | {g:.0f} ({c / g:.1f}x faster) |")


def bench_bandwidth(device, R=50, C=64, S=112, h=28, steps=3, compile=False):
    """Chan-Vese forward (coarse features, as LevelSetMaskHead runs it) vs the memory-bandwidth bound."""
    torch.manual_seed(0)
    big = torch.empty(64 * 2**20, device=device).uniform_()  # 256 MiB, beyond any cache
    out = torch.empty_like(big)
    copy_ms = timeit(lambda: out.copy_(big), device=device)
    bandwidth = 2 * big.numel() * 4 / (copy_ms / 1000)  # bytes read + written per second
    phi = torch.randn(R, 1, S, S, device=device).tanh()
    feats = torch.randn(R, C, h, h, device=device)
    kw = random_hyperparameters(R, steps, device)
    evolve = lambda: levelset.chan_vese(phi, feats, steps=steps, **kw)
    with torch.no_grad():
        evolve_ms = timeit(evolve, device=device)
        pass_ms = timeit(lambda: torch.mul(phi, 2.0), device=device)  # one elementwise pass: read + write phi
    min_bytes = 4 * (2 * phi.numel() + feats.numel() + R * (2 * steps + 3))  # phi_0, F, hyperparameters in; phi_N out
    bound_ms = 1000 * min_bytes / bandwidth
    print(f"\n### Chan-Vese forward vs the memory-bandwidth bound, {R} RoIs, {C} x {h}x{h} features, "
          f"{S}x{S}, {steps} steps ({device})\n")
    print("| copy bandwidth (GB/s) | evolution (ms) | bound: read inputs + write phi_N once (ms) "
          "| bound / evolution | evolution in elementwise passes over phi |\n|---|---|---|---|---|")
    print(f"| {bandwidth / 1e9:.1f} | {evolve_ms:.2f} | {bound_ms:.3f} | {bound_ms / evolve_ms:.1%} "
          f"| {evolve_ms / pass_ms:.0f} |")
    if compile:
        compiled = torch.compile(evolve)
        with torch.no_grad():
            t0 = time.perf_counter()
            diff = float((compiled() - evolve()).abs().max())  # the first call compiles
            compile_s = time.perf_counter() - t0
            compiled_ms = timeit(compiled, device=device)
        print(f"\n| torch.compile: first call (s) | compiled forward (ms) | eager / compiled | max |compiled - eager| |"
              f"\n|---|---|---|---|\n| {compile_s:.1f} | {compiled_ms:.2f} | {evolve_ms / compiled_ms:.2f}x | {diff:.1e} |")


def bench_skimage():
    from skimage import color, data, transform
    from skimage.segmentation import chan_vese as sk_cv

    print("\n### Classic Chan-Vese vs skimage.segmentation.chan_vese (128x128, checkerboard init, mu=0.25)\n")
    print("| image | energy ours / skimage | partition IoU (label swap allowed) |\n|---|---|---|")
    for name in ("camera", "page", "coins", "astronaut", "text", "moon"):
        img = getattr(data, name)()
        img = color.rgb2gray(img) if img.ndim == 3 else img
        img = transform.resize(img.astype(float), (128, 128), anti_aliasing=True)
        img = (img - img.min()) / (img.max() - img.min())
        yy, xx = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
        phi0 = np.sin(np.pi / 5 * yy) * np.sin(np.pi / 5 * xx)
        sk = sk_cv(img, mu=0.25, tol=0, max_num_iter=600, dt=0.5, init_level_set=phi0, extended_output=True)[1]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]
        ours = levelset.chan_vese(t(phi0), t(img), lambda1=1.0, lambda2=1.0, mu=0.25, eps=1.0, dt=0.25, steps=1200)
        ours = ours[0, 0].numpy()
        e = lambda p: float(levelset.chan_vese_energy(t(p), t(img), lambda1=1.0, lambda2=1.0, mu=0.25, eps=1.0))
        a, b = ours > 0, sk > 0
        iou = max((a & b).sum() / (a | b).sum(), (a & ~b).sum() / (a | ~b).sum())
        print(f"| {name} | {e(ours) / e(sk):.3f} | {iou:.3f} |")


def bench_synthetic():
    import tempfile

    from levelset.synthetic import generate_coco_dataset

    print("\n### Synthetic shapes dataset (levelset.synthetic.generate_coco_dataset), 128x128 images\n")
    print("| images | time (s) |\n|---|---|")
    for n in (50, 200):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            generate_coco_dataset(root, num_images=n, image_size=128)
            print(f"| {n} | {time.perf_counter() - t0:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-skimage", action="store_true")
    ap.add_argument("--compile", action="store_true", help="bandwidth section: also time torch.compile's evolution")
    ap.add_argument("--only", nargs="+", choices=["tsdf", "chan_vese", "bandwidth", "skimage", "synthetic"],
                    help="run only these sections")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    sections = {"tsdf": lambda: bench_tsdf(args.device), "chan_vese": lambda: bench_chan_vese(args.device),
                "bandwidth": lambda: bench_bandwidth(args.device, compile=args.compile), "skimage": bench_skimage,
                "synthetic": bench_synthetic}
    for name, run in sections.items():
        if (args.only and name not in args.only) or (name == "skimage" and args.skip_skimage):
            continue
        run()


if __name__ == "__main__":
    main()
