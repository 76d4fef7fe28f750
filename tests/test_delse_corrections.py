"""DELSE's trained corrections (section 4.4, Table 8): sampled drag counts, the clicks-only mode,
and, with an editing block trained here on known geometry, that an outward drag grows the mask, an
inward one shrinks it, and the fast preview changes the mask where the full correction does.

The geometry: a GT disc and a prediction that has a bite out of it (too small there) or a bump on
it (too large there); the branches' outputs are set by hand to that prediction's TSDF and to the
GT direction field (what a trained motion branch predicts, eq. 5), so the expected direction of
each change follows from the GT alone, whatever the code path."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import levelset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/DELSE/tiny_delse_coco_sample.yaml"
S = 64


def _cfg(*opts):
    import delse

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.DELSE.PHASE", "joint", "MODEL.DELSE.PRETRAIN_ITERS", "0",
                         *opts])
    return cfg


def _build(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(cfg)


def _disc(center, radius):
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    return (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= radius ** 2


def _geometry(kind, angle, center=(32.0, 32.0), radius=18.0, blob=11.0):
    """(gt, pred) masks: pred is the GT disc with a disc of radius ``blob`` on its boundary at
    ``angle`` removed ("bite": too small there) or added ("bump": too large there)."""
    gt = _disc(center, radius)
    c = (center[0] + radius * np.cos(angle), center[1] + radius * np.sin(angle))
    pred = gt & ~_disc(c, blob) if kind == "bite" else gt | _disc(c, blob)
    return gt, pred


def _low_terms(gt, pred, stride=4):
    """The branches' outputs at their resolution: phi0 = TSDF of ``pred`` (pixels); V = the GT
    direction field where the prediction is wrong (within 4 px of it), zero elsewhere (a motion
    branch that has nothing to say where the boundary is right); m = 0.5."""
    tsdf = levelset.mask_to_tsdf(pred[None], 10.0) * 10.0
    wrong = F.max_pool2d((pred ^ gt).float()[None, None], 9, stride=1, padding=4)[0]
    direction = levelset.direction_field(gt[None])[0] * wrong
    pool = lambda t: F.avg_pool2d(t[None].float(), stride)
    phi0 = pool(tsdf)
    return {"phi0": phi0, "motion": pool(direction), "modulation": torch.full_like(phi0, 0.5)}


def _batch_terms(items):
    return {k: torch.cat([t[k] for t in items]) for k in items[0]}


def _evolve_with(model, low, drags=None):
    terms = model.edit_and_upsample(low, (S, S), drags)
    return model.evolve(terms["phi0"], terms["motion"], terms["modulation"])


def _drags_of(model, phis, gts):
    from delse.interactive import simulate_correction

    drags = [simulate_correction(p[0], g) for p, g in zip(phis, gts)]
    assert all(d is not None for d in drags)
    return drags, model.drag_tensor([{"drags": [d]} for d in drags], (S, S))


@pytest.fixture(scope="module")
def trained_block():
    """The tiny model with its motion-editing block trained (Adam, 40 iterations of 8 random
    bites/bumps) to minimise L_T after one simulated drag; everything else is as built."""
    from levelset.losses import evolution_loss

    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "1"))
    model.eval()  # GroupNorm only; eval() keeps the annotator's inputs deterministic
    opt = torch.optim.Adam(model.motion_editing.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        geos = [_geometry(rng.choice(["bite", "bump"]), rng.uniform(0, 2 * np.pi),
                          center=tuple(32 + rng.uniform(-3, 3, 2))) for _ in range(8)]
        gts = torch.stack([g for g, _ in geos])
        low = _batch_terms([_low_terms(g, p) for g, p in geos])
        with torch.no_grad():
            phi_before = _evolve_with(model, low)
        _, drags = _drags_of(model, phi_before, gts)
        loss = evolution_loss(_evolve_with(model, low, drags), gts, model.heaviside_eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _distance_to_segment(src, dst):
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    p = torch.stack([xs, ys], -1)
    d = dst - src
    t = (((p - src) * d).sum(-1) / d.dot(d).clamp_min(1e-6)).clamp(0, 1)
    return (p - (src + t[..., None] * d)).norm(dim=-1)


def _assert_change_is_local(before, after, near):
    """The boundary moves by several pixels near the drag and by at most ~1 px elsewhere (the
    trained block also shifts the whole contour slightly: a global sub-pixel bias)."""
    changed = torch.as_tensor(after ^ before)
    depth = levelset.signed_distance(torch.as_tensor(before)[None], half_pixel=True)[0].abs()
    assert depth[changed & near].max() >= 3.0
    if (changed & ~near).any():
        assert depth[changed & ~near].max() <= 2.0


# ------------------------------------------------------------------------------- drag counts
def test_sampled_drag_counts_cover_0_to_n():
    from delse.interactive import sample_num_corrections

    g = torch.Generator().manual_seed(0)
    counts = np.array(sample_num_corrections(2000, 3, "uniform", generator=g))
    assert set(counts.tolist()) == {0, 1, 2, 3}
    shares = np.bincount(counts) / len(counts)
    assert np.all(np.abs(shares - 0.25) < 0.04), shares  # U{0..3}
    assert sample_num_corrections(5, 3, "fixed") == [3] * 5
    with pytest.raises(ValueError):
        sample_num_corrections(5, 3, "poisson")


def _synthetic_batch(n):
    """DELSE training samples of bright discs on a dark crop (the mapper's keys)."""
    rng = np.random.default_rng(1)
    batch = []
    for _ in range(n):
        gt = _disc(tuple(32 + rng.uniform(-4, 4, 2)), rng.uniform(10, 20))
        image = gt.float()[None].repeat(3, 1, 1) * 200 + 20
        ys, xs = gt.nonzero(as_tuple=True)
        pts = torch.tensor([[xs.min(), ys[xs.argmin()]], [xs.max(), ys[xs.argmax()]],
                            [xs[ys.argmin()], ys.min()], [xs[ys.argmax()], ys.max()]], dtype=torch.float32)
        from delse.data import points_heatmap

        batch.append({"image": image, "extreme_heatmap": points_heatmap(pts, (S, S), 4.0)[None], "gt_mask": gt,
                      "gt_tsdf": levelset.mask_to_tsdf(gt[None], 8.0) * 8.0,
                      "gt_direction": levelset.direction_field(gt[None])[0]})
    return batch


def test_training_gives_each_sample_its_own_number_of_drags(monkeypatch):
    import delse.modeling as modeling

    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "3"))
    monkeypatch.setattr(modeling, "sample_num_corrections", lambda n, m, s: [0, 3, 1, 2])
    rerun = []
    original = model.corrected_terms
    model.corrected_terms = lambda images, states: (rerun.append(len(states)), original(images, states))[1]
    model.train()
    sum(model(_synthetic_batch(4)).values()).backward()
    # Round 1 re-runs the samples allowed >= 1 drag, round 2 those allowed >= 2, round 3 one
    # (an untrained model's masks are far from perfect, so the annotator always drags).
    assert rerun == [3, 2, 1]


def test_clicks_only_mode_leaves_the_editing_block_unused():
    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_MODE", "clicks",
                        "MODEL.DELSE.CORRECTION_SAMPLING", "fixed"))
    calls = []
    model.motion_editing.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    sum(model(_synthetic_batch(2)).values()).backward()
    assert calls == []
    assert all(p.grad is None for p in model.motion_editing.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())

    # The same training with motion editing runs the block and trains its output conv.
    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_SAMPLING", "fixed"))
    model.train()
    sum(model(_synthetic_batch(2)).values()).backward()
    assert model.motion_editing.predictor.weight.grad.abs().sum() > 0


def test_unknown_correction_mode_is_refused():
    with pytest.raises(ValueError, match="CORRECTION_MODE"):
        _build(_cfg("MODEL.DELSE.CORRECTION_MODE", "scribbles"))


def _train_steps(model, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        sum(model(_synthetic_batch(2)).values()).backward()
        opt.step()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_the_editing_block_only_keeps_the_rest_and_the_extreme_point_prediction():
    """MODEL.DELSE.TRAIN_EDITING_ONLY: after training steps every weight and batch-norm statistic outside the
    motion-editing block is bit for bit the base model's (so is the prediction from the extreme points),
    while the block's weights moved; the same steps without it move the rest (the control)."""
    opts = ("MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_SAMPLING", "fixed",
            "MODEL.DELSE.NORM", "BN")  # the heads with batch norm (the tiny config's GroupNorm keeps no statistics)
    model = _build(_cfg(*opts, "MODEL.DELSE.TRAIN_EDITING_ONLY", "True"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.skip_features.modules())  # statistics at stake
    before = _state(model)
    batch = _synthetic_batch(2)
    model.eval()
    with torch.no_grad():
        phi0_before = [r["phi0"] for r in model(batch)]
    _train_steps(model)
    after = _state(model)
    editing = {k for k in before if k.startswith("motion_editing.")}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in editing)
    assert any(not torch.equal(before[k], after[k]) for k in editing)
    model.eval()
    with torch.no_grad():
        phi0_after = [r["phi0"] for r in model(batch)]
    assert all(torch.equal(a, b) for a, b in zip(phi0_before, phi0_after))

    control = _build(_cfg(*opts))
    _train_steps(control)
    moved = _state(control)
    assert any(not torch.equal(before[k], moved[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], moved[k]) for k in before if k.endswith("running_mean"))


@pytest.mark.parametrize("opts", [("MODEL.DELSE.NUM_CORRECTIONS", "0"),
                                  ("MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.CORRECTION_MODE", "clicks"),
                                  ("MODEL.DELSE.NUM_CORRECTIONS", "3", "MODEL.DELSE.PHASE", "pretrain")])
def test_training_the_editing_block_only_without_drags_through_it_is_refused(opts):
    with pytest.raises(ValueError, match="TRAIN_EDITING_ONLY"):
        _build(_cfg("MODEL.DELSE.TRAIN_EDITING_ONLY", "True", *opts))


# ------------------------------------------------------------------------------- trained block
@pytest.mark.parametrize("kind", ["bite", "bump"])
def test_a_drag_moves_the_boundary_towards_the_gt_near_the_drag(trained_block, kind):
    """Outward drag (bite: the mask is too small there) grows the mask, inward (bump) shrinks it;
    the changed pixels lie near the drag, and the IoU improves."""
    model = trained_block
    gt, pred = _geometry(kind, angle=1.0)
    low = _low_terms(gt, pred)
    with torch.no_grad():
        before = _evolve_with(model, low)
        (drag,), drags = _drags_of(model, before, gt[None])
        after = _evolve_with(model, low, drags)
    before, after = before[0, 0] > 0, after[0, 0] > 0
    src, dst = drag
    # The annotator's drag goes the way the GT says: out of a bite, into a bump.
    center = torch.tensor([32.0, 32.0])
    outward = (dst - center).norm() > (src - center).norm()
    assert outward == (kind == "bite")
    near = _distance_to_segment(src, dst) <= (dst - src).norm() + 6
    grown, shrunk = (after & ~before & near).sum().item(), (before & ~after & near).sum().item()
    if kind == "bite":
        assert grown >= 30 and shrunk <= 5, (grown, shrunk)
    else:
        assert shrunk >= 30 and grown <= 5, (grown, shrunk)
    _assert_change_is_local(before, after, near)
    iou = lambda m: ((m & gt).sum() / (m | gt).sum()).item()
    assert iou(after) > iou(before) + 0.01


def test_preview_and_full_correction_change_the_mask_in_the_same_place(trained_block, monkeypatch):
    """The predictor with the trained block and hand-set branches whose phi0 also responds to the
    click channel (a click raises phi near it, as a trained network does): the full pass changes
    the mask through both the click and the editing block, the preview through the editing block
    only; both change it near the drag, in the same place."""
    from delse import DELSEPredictor
    from delse.interactive import simulate_correction

    model = trained_block
    gt, pred = _geometry("bite", angle=2.0)
    base = _low_terms(gt, pred)
    encoder_calls = []

    def branches(images, heatmaps):
        encoder_calls.append(1)
        low = {k: v.clone() for k, v in base.items()}
        low["phi0"] = low["phi0"] + 6.0 * F.avg_pool2d(heatmaps, 4)
        return low

    monkeypatch.setattr(model, "branches", branches)
    predictor = DELSEPredictor(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "1"), model=model)
    predictor.crop_margin = 14  # crop = the 64 x 64 image: crop and image coordinates coincide
    image = np.zeros((S, S, 3), np.uint8)
    points = [(14, 32), (49, 32), (32, 14), (32, 49)]  # the GT disc's extremes; box + 14 = the image
    first = predictor.predict(image, points)
    assert np.allclose(first.crop_box, [0, 0, S, S])
    src, dst = simulate_correction(torch.from_numpy(first.phi), gt)
    changes = {}
    for preview in (False, True):
        predictor.predict(image, points)
        n = len(encoder_calls)
        result = predictor.correct(tuple(src.tolist()), tuple(dst.tolist()), preview=preview)
        assert len(encoder_calls) == n + (0 if preview else 1)  # the preview reuses the branches
        changes[preview] = result.mask
    near = (_distance_to_segment(src, dst) <= (dst - src).norm() + 6).numpy()
    grown = {}
    for preview, mask in changes.items():
        grown[preview] = mask & ~first.mask & near
        assert grown[preview].sum() >= 30, preview  # out of the bite, towards the GT
        assert (first.mask & ~mask & near).sum() <= grown[preview].sum() / 4, preview
        _assert_change_is_local(first.mask, mask, near)
    # Where the preview grows the mask near the drag, the full correction does too.
    assert (grown[True] & grown[False]).sum() >= 0.7 * grown[True].sum()


def test_preview_of_a_model_without_motion_editing_is_the_full_pass(monkeypatch):
    from delse import DELSEPredictor

    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "1", "MODEL.DELSE.CORRECTION_MODE", "clicks"))
    predictor = DELSEPredictor(_cfg(), model=model)
    image = (np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)
    points = [(20, 40), (70, 42), (45, 15), (44, 66)]
    predictor.predict(image, points)
    full = predictor.correct((22, 40), (16, 40))
    predictor.predict(image, points)
    preview = predictor.correct((22, 40), (16, 40), preview=True)
    np.testing.assert_allclose(preview.phi, full.phi, atol=1e-5)


def test_preview_with_an_untrained_editing_block_is_the_full_pass():
    """An untrained editing block is the identity (last conv exactly zero): a preview would return the
    mask of before the drag. It runs the full pass instead, and says whether it can preview."""
    from delse import DELSEPredictor

    model = _build(_cfg("MODEL.DELSE.NUM_CORRECTIONS", "1", "MODEL.DELSE.CORRECTION_MODE", "motion_editing"))
    predictor = DELSEPredictor(_cfg(), model=model)
    assert not predictor.can_preview
    image = (np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)
    points = [(20, 40), (70, 42), (45, 15), (44, 66)]
    before = predictor.predict(image, points)
    full = predictor.correct((22, 40), (16, 40))
    predictor.predict(image, points)
    preview = predictor.correct((22, 40), (16, 40), preview=True)
    assert np.abs(full.phi - before.phi).max() > 1e-3  # the drag's click changes the prediction
    np.testing.assert_allclose(preview.phi, full.phi, atol=1e-5)
    with torch.no_grad():
        model.motion_editing.predictor.bias.fill_(0.1)  # a block that edits: the preview is its own pass
    assert predictor.can_preview


def test_interactive_split_is_by_image_deterministic_and_6_of_16():
    from delse.datasets import interactive_split

    records = [{"file_name": f"/x/img{i:03d}.png", "annotations": []} for i in range(160)]
    base, held = interactive_split(records, "base"), interactive_split(records, "interactive")
    assert len(held) == 60 and len(base) == 100
    assert {r["file_name"] for r in base}.isdisjoint(r["file_name"] for r in held)
    # Independent of the records' order.
    assert {r["file_name"] for r in interactive_split(records[::-1], "interactive")} == {r["file_name"] for r in held}


def test_pspnet_bin_width_is_in_over_bins():
    model = _build(_cfg("MODEL.DELSE.PSP_BIN_WIDTH", "pspnet"))
    psp = model.motion_branch
    in_channels = psp.stages[0].in_channels
    assert all(s.out_channels == in_channels // len(psp.bins) for s in psp.stages)
    assert psp.fuse.in_channels == 2 * in_channels
    default = _build(_cfg()).motion_branch
    assert all(s.out_channels == default.fuse.out_channels for s in default.stages)  # PSP_CHANNELS per bin


def test_signed_drag_channels_keep_the_direction_the_paper_encoding_drops():
    """A drag from (10, 10) to (4, 18): d = (-6, 8), |d| = 10; at its source pixel the Gaussian is 1, so
    the channels read (0.6, 0.8) in the paper's |dx|, |dy| encoding and (-0.6, 0.8) signed; the
    reverse drag's signed channels are the opposite, its unsigned ones the same."""
    from delse.interactive import drag_channels

    drag = [(torch.tensor([10.0, 10.0]), torch.tensor([4.0, 18.0]))]
    back = [(torch.tensor([10.0, 10.0]), torch.tensor([16.0, 2.0]))]
    assert drag_channels(drag, (32, 32))[:, 10, 10].tolist() == pytest.approx([0.6, 0.8])
    assert drag_channels(drag, (32, 32), signed=True)[:, 10, 10].tolist() == pytest.approx([-0.6, 0.8])
    assert drag_channels(back, (32, 32), signed=True)[:, 10, 10].tolist() == pytest.approx([0.6, -0.8])
    assert torch.equal(drag_channels(back, (32, 32)), drag_channels(drag, (32, 32)))
    model = _build(_cfg("MODEL.DELSE.EDIT_SIGNED_DRAGS", "True"))
    assert model.drag_tensor([{"drags": drag}], (32, 32))[0, 0, 10, 10] == pytest.approx(-0.6)


@pytest.mark.parametrize("reads_phi0", [False, True])
def test_the_editing_block_reads_phi0_only_when_configured(reads_phi0):
    """MODEL.DELSE.EDIT_READS_PHI0: the same drag on two different phi_0 edits V differently only
    when the block reads phi_0 (its last conv set non-zero, as after training)."""
    model = _build(_cfg("MODEL.DELSE.EDIT_READS_PHI0", str(reads_phi0))).eval()
    assert model.motion_editing.stem.in_channels == (5 if reads_phi0 else 4)
    torch.nn.init.normal_(model.motion_editing.predictor.weight, std=0.1)
    gt, pred = _geometry("bite", 0.0)
    low = _low_terms(gt, pred)
    other = dict(low, phi0=-low["phi0"])
    drags = model.drag_tensor([{"drags": [(torch.tensor([30.0, 32.0]), torch.tensor([50.0, 32.0]))]}], (S, S))
    with torch.no_grad():
        a = model.edit_and_upsample(low, (S, S), drags)["motion"]
        b = model.edit_and_upsample(other, (S, S), drags)["motion"]
        plain = model.edit_and_upsample(low, (S, S))["motion"]
    assert not torch.equal(a, plain)  # the drag edits V
    assert torch.equal(a, b) != reads_phi0
