"""The simulated annotator of DELSE section 4.4 on geometries whose answer is known by hand."""
import numpy as np
import torch
from scipy import ndimage

from delse.interactive import simulate_correction


def _box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _phi(mask):
    return mask.float() * 2 - 1  # positive inside


def test_a_perfect_mask_needs_no_correction():
    gt = _box(40, 50, 10, 30, 12, 38)
    assert simulate_correction(_phi(gt), gt) is None
    # One pixel too large all round is within the default 1 px as well.
    assert simulate_correction(_phi(_box(40, 50, 9, 31, 11, 39)), gt) is None


def test_a_box_too_wide_on_the_right_is_dragged_left_onto_the_gt_edge():
    gt = _box(40, 60, 10, 30, 10, 30)
    pred = _box(40, 60, 10, 30, 10, 42)  # 12 px too far right
    src, dst = simulate_correction(_phi(pred), gt)
    # The worst predicted boundary points are on the right edge, column 41 (11.5 px from the GT
    # boundary between columns 29 and 30); the nearest GT boundary pixel is on column 29, same row.
    assert src[0] == 41 and 10 <= src[1] <= 29
    assert dst[0] == 29 and dst[1] == src[1]


def test_a_mask_too_short_at_the_bottom_is_dragged_down():
    gt = _box(50, 30, 5, 41, 0, 30)  # full width: its only boundaries are rows 5 and 40
    pred = _box(50, 30, 5, 28, 0, 30)  # misses rows 28..40
    src, dst = simulate_correction(_phi(pred), gt)
    # The predicted bottom row 27 lies inside the GT, 13.5 px from its lower boundary (between rows
    # 40 and 41): the first such pixel is (0, 27), and the nearest GT boundary pixel is (0, 40).
    assert src.tolist() == [0.0, 27.0]
    assert dst.tolist() == [0.0, 40.0]


def test_min_error_is_in_pixels_from_the_gt_boundary():
    gt = _box(40, 60, 10, 30, 10, 30)
    pred = _box(40, 60, 10, 30, 10, 33)  # 3 px too far right: 2.5 px from the GT boundary
    assert simulate_correction(_phi(pred), gt, min_error=3.0) is None
    assert simulate_correction(_phi(pred), gt, min_error=2.0) is not None


def test_boundary_pixels_are_the_metrics_8_neighbour_boundary():
    from delse.interactive import boundary_pixels
    from levelset.metrics import mask_to_boundary

    # A diagonal staircase: its 8- and 4-neighbour boundaries differ (the inner corner pixels).
    mask = torch.tensor([[r + c <= 9 or (4 <= r <= 8 and 3 <= c <= 9) for c in range(12)] for r in range(12)])
    ours = boundary_pixels(mask).numpy()
    np.testing.assert_array_equal(ours, mask_to_boundary(mask.numpy(), border_is_boundary=False))
    # The 4-neighbour boundary would miss a pixel whose only outside neighbour is diagonal.
    four = mask.numpy() & ~ndimage.binary_erosion(mask.numpy(), border_value=1)
    assert (ours & ~four).any()
