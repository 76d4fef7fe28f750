"""Sub-pixel boundaries: the zero level set of a level set sampled on a box, as closed polygons
(marching squares; LevelSet R-CNN section 5, DELSE's interactive polygons). Needs scikit-image,
so it is imported on demand (``from levelset.polygons import zero_level_polygons``)."""
from typing import List

import numpy as np
from skimage import measure

__all__ = ["zero_level_polygons"]


def zero_level_polygons(phi, box) -> List[np.ndarray]:
    """Closed contours of ``{phi = 0}`` in the coordinates of ``box``.

    Args:
        phi: (S_y, S_x) array, positive inside, sampled on a regular grid over ``box``: sample
            (i, j) sits at ``(x0 + (j + 0.5) (x1 - x0) / S_x, y0 + (i + 0.5) (y1 - y0) / S_y)``,
            the convention of RoIAlign and of Detectron2's mask pasting.
        box: (x0, y0, x1, y1).
    Returns:
        a list of float64 (K, 2) arrays of (x, y) in ``find_contours`` order; outer boundaries and
        holes are wound opposite ways (``positive_orientation="high"``). The grid is padded with a
        value below every sample, so contours that reach the border are closed along it.
    """
    phi = np.asarray(phi, dtype=np.float64)
    side_y, side_x = phi.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    padded = np.pad(phi, 1, constant_values=min(float(phi.min()), 0.0) - 1.0)
    contours = []
    for rc in measure.find_contours(padded, 0.0, positive_orientation="high"):
        rc = rc - 1.0  # undo the padding
        x = x0 + (rc[:, 1] + 0.5) * (x1 - x0) / side_x
        y = y0 + (rc[:, 0] + 0.5) * (y1 - y0) / side_y
        contours.append(np.stack([x, y], axis=1))
    return contours
