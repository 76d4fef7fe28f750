"""levelset.enforce_drag and MODEL.DELSE.DRAG_EDIT: a drag enforced on the level set itself (not in the
paper). Expected values are the geometry of a disc and a capsule worked out by hand."""
from pathlib import Path

import pytest
import torch

import levelset


def _disc(size, cx, cy, r):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return r - ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()  # signed distance, positive inside


def test_an_outward_drag_grows_a_capsule_whose_rim_passes_the_drop_point():
    phi = _disc(64, 32, 32, 10)
    src, dst, radius = (42.0, 32.0), (50.0, 32.0), 3.0
    out = levelset.enforce_drag(phi, src, dst, radius)
    assert out[32, 50] == 0  # the drop point is on the new zero level
    assert out[32, 49] > 0 and out[32, 51] < 0
    # Within the capsule (segment from (42, 32) to (47, 32), radius 3): inside.
    assert out[30, 45] > 0 and out[34, 46] > 0 and out[35, 45] == 0
    # Farther than the radius from the segment: the same side of the zero level; inside, the same values.
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    t = ((xs - 42) / 5).clamp(0, 1)
    d = ((xs - (42 + 5 * t)) ** 2 + (ys - 32) ** 2).sqrt()
    far = d > radius
    assert torch.equal(out[far] > 0, phi[far] > 0)
    assert torch.equal(out[far & (phi > 0)], phi[far & (phi > 0)])
    assert (out >= phi).all()  # growing never removes


def test_an_inward_drag_cuts_a_capsule_ending_at_the_drop_point():
    phi = _disc(64, 32, 32, 10)
    out = levelset.enforce_drag(phi, (42.0, 32.0), (34.0, 32.0), 2.0)
    assert out[32, 34] == 0
    assert out[32, 36] < 0 and out[32, 40] < 0  # the cut
    assert out[32, 33] > 0 and out[32, 30] > 0  # beyond the drop point: still inside
    assert out[26, 36] == phi[26, 36] > 0  # 6 px off the segment: untouched
    assert (out <= phi).all()  # cutting never adds


def test_zero_length_drag_is_a_no_op_and_radius_must_be_positive():
    phi = _disc(32, 16, 16, 5)
    assert torch.equal(levelset.enforce_drag(phi, (21.0, 16.0), (21.0, 16.0), 2.0), phi)
    with pytest.raises(ValueError, match="radius"):
        levelset.enforce_drag(phi, (21.0, 16.0), (25.0, 16.0), 0.0)


@pytest.mark.parametrize("mode", ["none", "phi0", "result", "both"])
def test_delse_drag_edit_modes(mode):
    """DELSE's evolve_corrected: 'none' is the plain evolution; 'result' puts the drop point on the
    final zero level; 'phi0' edits the evolution's start."""
    import delse
    from detectron2.modeling import build_model

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs/DELSE/demo_delse_synthetic.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DELSE.DRAG_EDIT = mode
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    S = 64
    phi0 = _disc(S, 32, 32, 10)[None, None]
    terms = {"phi0": phi0, "motion": torch.zeros(1, 2, S, S), "modulation": torch.ones(1, 1, S, S)}
    state = model.new_interaction(torch.zeros(S, S))
    model.add_drag(state, (torch.tensor([42.0, 32.0]), torch.tensor([52.0, 32.0])))
    plain = model.evolve(phi0, terms["motion"], terms["modulation"])
    out = model.evolve_corrected(terms, [state])
    if mode == "none":
        assert torch.equal(out, plain)
    elif mode == "result":
        assert out[0, 0, 32, 52] == 0 and out[0, 0, 32, 50] > 0 > plain[0, 0, 32, 50]
    else:  # the evolution starts from the grown phi_0: the capsule's tip region is inside afterwards
        assert out[0, 0, 32, 48] > 0 > plain[0, 0, 32, 48]
