"""The shared evolutions never produce NaN/Inf, nor NaN gradients, on degenerate inputs (issue 6)."""
import itertools

import pytest
import torch

import levelset

SHAPES = {"tiny": (1, 1), "small": (3, 4), "roi": (28, 28), "huge": (128, 160)}


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _phi_cases(h, w):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    disk = (min(h, w) / 3 - torch.sqrt((yy - h / 2) ** 2 + (xx - w / 2) ** 2)) / max(min(h, w) / 3, 1)
    return {
        "flat_zero": torch.zeros(h, w),  # |grad phi| = 0 and phi on the zero level everywhere
        "flat_inside": torch.ones(h, w),  # a full mask
        "flat_outside": -torch.ones(h, w),  # an empty mask
        "disk": disk,
        "huge_values": disk * 1e4,
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_chan_vese_finite_on_degenerate_inputs(shape):
    h, w = SHAPES[shape]
    feature_cases = {"constant": torch.ones(2, 4, h, w), "zero": torch.zeros(2, 4, h, w),
                     "large": torch.randn(2, 4, h, w) * 1e3}
    hyper_cases = [dict(lambda1=0.0, lambda2=0.0, mu=0.0, eps=1e-6, dt=2.0),  # extreme: tiny eps, big step
                   dict(lambda1=2.0, lambda2=2.0, mu=2.0, eps=2.0, dt=2.0),  # the heads' upper bound (2 sigmoid)
                   dict(lambda1=1e-8, lambda2=1e-8, mu=1e-8, eps=1e-8, dt=1e-8)]
    for (pname, phi), (fname, feats), hp in itertools.product(_phi_cases(h, w).items(), feature_cases.items(),
                                                               hyper_cases):
        p = phi.expand(2, 1, h, w).clone().requires_grad_()
        f = feats.clone().requires_grad_()
        out = levelset.chan_vese(p, f, steps=3, **hp)
        out.square().mean().backward()
        assert _finite(out, p.grad, f.grad), (pname, fname, hp)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_delse_finite_on_degenerate_inputs(shape):
    h, w = SHAPES[shape]
    for (pname, phi), eps in itertools.product(_phi_cases(h, w).items(), (None, 1e-6, 1.0)):
        p = (phi * 30).expand(2, 1, h, w).clone().requires_grad_()
        v = torch.zeros(2, 2, h, w, requires_grad=True)
        m = torch.ones(2, 1, h, w, requires_grad=True)
        # lambda * dt = 100 violates the explicit scheme's CFL bound: the clamp to the TSDF's
        # truncation keeps it finite, forward and backward, over many steps.
        out = levelset.delse_evolve(p, v, m, curvature_weight=100.0, dist_reg_weight=1.0, eps=eps, dt=1.0, steps=20,
                                    phi_bound=30.0)
        out.square().mean().backward()
        assert _finite(out, p.grad, v.grad, m.grad), (pname, eps)
        assert out.abs().max() <= 30.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_evolutions_finite_under_half_precision_autocast(dtype):
    torch.manual_seed(0)
    for scale in (3.0, 50.0):  # 50: |F|^2 ~ 2e4, and its square would overflow fp16 (max 65504)
        phi32 = torch.randn(3, 1, 28, 28).tanh().requires_grad_()  # fp32 leaves, as parameters are
        feats32 = (torch.randn(3, 8, 28, 28) * scale).requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            phi, feats = phi32.to(dtype), feats32.to(dtype)  # half activations, as a head under autocast
            out = levelset.chan_vese(phi, feats, lambda1=1.0, lambda2=1.0, mu=0.5, eps=0.1, dt=1.0, steps=3)
            d = levelset.delse_evolve(phi * 30, feats[:, :2], feats[:, 2:3].sigmoid(), curvature_weight=1.0,
                                      dist_reg_weight=0.04, dt=1.0, steps=3)
        assert out.dtype == torch.float32 and d.dtype == torch.float32 and _finite(out, d), scale
        if scale == 3.0:
            # Gradients flowing back into half activations can exceed fp16's range only for huge
            # features; that is what AMP's GradScaler detects. At ordinary scales they are finite.
            (out.sum() + d.sum()).backward()
            assert _finite(phi32.grad, feats32.grad)


def test_tsdf_and_direction_field_on_degenerate_masks():
    for h, w in SHAPES.values():
        for m in (torch.zeros(2, h, w, dtype=torch.bool), torch.ones(2, h, w, dtype=torch.bool)):
            assert _finite(levelset.mask_to_tsdf(m, 5.0), levelset.direction_field(m))
    single = torch.zeros(1, 9, 9, dtype=torch.bool)
    single[0, 4, 4] = True
    t = levelset.mask_to_tsdf(single, 3.0)
    assert t[0, 4, 4] == 0.5 / 3 and t[0, 0, 0] == -1  # one pixel: +0.5 px inside, clamped outside
