"""Interactive annotation with a trained DELSE model (section 4.4): four extreme clicks give a mask
and a polygon; each drag of a wrong boundary point onto the right one re-predicts them."""
import logging
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from detectron2.modeling import build_model
from levelset.polygons import zero_level_polygons
from levelset_d2.checkpoint import SafeDetectionCheckpointer

from .data import (
    crop_box_around,
    points_box,
    points_heatmap,
    points_to_crop,
    paste_to_image,
    warp_to_crop,
)

__all__ = ["DELSEPredictor", "DELSEResult", "crop_polygons"]

logger = logging.getLogger(__name__)


@dataclass
class DELSEResult:
    """One prediction in image coordinates.

    mask: (H, W) bool. polygon: (K, 2) float (x, y), the longest closed zero-level contour;
    polygons: all of them (one per component / hole). phi: (S, S) final level set on the crop;
    crop_box: (x0, y0, x1, y1) of the crop in the image.
    """

    mask: np.ndarray
    polygon: np.ndarray
    polygons: List[np.ndarray] = field(default_factory=list)
    phi: np.ndarray = None
    crop_box: np.ndarray = None


def crop_polygons(phi, crop_box):
    """Sub-pixel zero level set of a crop's level set as closed polygons in image (x, y).

    Args:
        phi: (S, S) float array, positive inside, on the crop grid of :func:`delse.data.crop_matrix`.
    Returns:
        list of (K, 2) float32 arrays, longest first.
    """
    # crop_matrix puts image pixel centres at integer coordinates, zero_level_polygons at +0.5.
    polys = [(p - 0.5).astype(np.float32) for p in zero_level_polygons(phi, crop_box)]
    return sorted(polys, key=len, reverse=True)


class DELSEPredictor:
    """Like Detectron2's DefaultPredictor, for a DELSE model and an annotator's clicks.

    Example::

        predictor = DELSEPredictor(cfg)
        result = predictor.predict(image_bgr, [(x_left, y), (x_right, y), (x, y_top), (x, y_bottom)])
        result = predictor.correct(from_point=(x0, y0), to_point=(x1, y1))  # as often as needed
        result = predictor.correct(p0, p1, preview=True)  # fast: motion editing + evolution only

    The outputs of the last full pass (encoder, skip features, the three branches) are kept, so
    a preview correction costs only the motion-editing block and the evolution.
    """

    def __init__(self, cfg, model=None):
        self.cfg = cfg.clone()
        if model is None:
            model = build_model(self.cfg)
            if cfg.MODEL.WEIGHTS:
                SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        self.model = model.eval()
        d = cfg.INPUT.DELSE
        self.input_size = d.INPUT_SIZE
        self.crop_margin = d.CROP_MARGIN
        self.crop_mode = d.CROP_MODE
        self.heatmap_sigma = d.HEATMAP_SIGMA
        self.input_format = cfg.INPUT.FORMAT
        self._state = None
        self._warned_preview = False

    @property
    def state(self):
        """The interaction of the last ``predict()`` / ``correct()`` (None before the first): an opaque object
        (its tensors stay on the model's device) to hand to :meth:`restore` later, after other objects."""
        return self._state

    def restore(self, state):
        """Make ``state`` (an earlier :attr:`state`) the current interaction: the next ``correct()`` goes on
        with that object. ``correct()`` updates the state it continues in place."""
        self._state = state

    @property
    def can_preview(self) -> bool:
        """Whether ``correct(preview=True)`` is the editing-block-only pass: the model edits the motion
        field and its motion-editing block was trained. The block's last conv starts at exactly zero
        (the identity), so an untrained block would return the unchanged mask; then a preview runs
        the full pass instead."""
        if not self.model.edits_motion:
            return False
        last = self.model.motion_editing.predictor
        return bool(last.weight.detach().abs().sum() > 0 or last.bias.detach().abs().sum() > 0)

    @staticmethod
    def _clip_points(points, size, what):
        """Clicks outside the image are moved onto its border, with a warning."""
        H, W = size
        clipped = np.clip(points, 0, np.array([W - 1, H - 1], dtype=np.float32))
        if not np.array_equal(clipped, points):
            logger.warning(f"{what} {points.tolist()} outside the {W}x{H} image: clipped to {clipped.tolist()}")
        return clipped

    @torch.no_grad()
    def predict(self, image_bgr, extreme_points):
        """Segment the object given by four extreme clicks (x, y) in image pixels.

        Starts a new annotation: previous corrections are forgotten. Clicks outside the image are
        clipped to it (with a warning). Duplicated or collinear clicks are accepted: their box has
        at least one pixel per side and the crop adds ``INPUT.DELSE.CROP_MARGIN`` around it, so the
        crop is always valid (the mask is then whatever the model makes of a thin object).

        Raises:
            ValueError: the image is not an (H, W, 3) uint8 array, or the clicks are not four
                finite (x, y) pairs.
        """
        if not (isinstance(image_bgr, np.ndarray) and image_bgr.ndim == 3 and image_bgr.shape[2] == 3
                and image_bgr.dtype == np.uint8 and min(image_bgr.shape[:2]) > 0):
            got = (f"{image_bgr.dtype} array of shape {image_bgr.shape}" if isinstance(image_bgr, np.ndarray)
                   else type(image_bgr).__name__)
            raise ValueError(f"image_bgr must be an (H, W, 3) uint8 BGR array (cv2.imread), got {got}")
        points = np.asarray(extreme_points, dtype=np.float32)
        if points.shape != (4, 2) or not np.isfinite(points).all():
            raise ValueError(f"extreme_points must be 4 finite (x, y) clicks (left, right, top, bottom), "
                             f"got {np.asarray(extreme_points).tolist()}")
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        H, W = image.shape[:2]
        points = self._clip_points(points, (H, W), "extreme points")
        S = self.input_size
        crop_box = crop_box_around(points_box(points), self.crop_margin, self.crop_mode)
        crop = warp_to_crop(np.ascontiguousarray(image), crop_box, S)
        crop_points = torch.from_numpy(points_to_crop(points, crop_box, S))
        device = self.model.device
        heatmap = points_heatmap(crop_points, (S, S), self.heatmap_sigma).to(device)
        images = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float()[None].to(device)
        low = self.model.branches(images, heatmap[None, None])
        self._state = {
            "images": images, "crop_box": crop_box, "size": (H, W),
            "interaction": self.model.new_interaction(heatmap), "branches": low,
        }
        return self._finish(self.model.edit_and_upsample(low, (S, S)))

    @torch.no_grad()
    def correct(self, from_point, to_point, preview=False):
        """Drag the wrong boundary point ``from_point`` onto ``to_point`` (image (x, y)) and
        re-predict with all corrections so far (section 4.4).

        The default is the faithful full pass: the drag's target joins the extreme-point channel
        as a click, the whole network re-runs, and the drags re-predict V through the
        motion-editing block before the evolution.

        ``preview=True`` is the motion-editing half of section 4.4 only: the branches' outputs of
        the last full pass are reused, all drags so far re-predict V through the editing block,
        and the level set is re-evolved; the new click is not seen by the encoder until the next
        full pass (a later ``correct()`` without preview, which includes every drag so far). A
        model without motion editing (pixel-wise baseline, CORRECTION_MODE "clicks") has no
        preview: its corrections act only through the click channel, so the full pass runs; so
        does a model whose editing block was never trained (``can_preview`` False, logged once):
        a preview there would return the unchanged mask.
        """
        if self._state is None:
            raise RuntimeError("call predict() before correct()")
        st = self._state
        S = self.input_size
        drag = np.asarray([from_point, to_point], dtype=np.float32)
        if drag.shape != (2, 2) or not np.isfinite(drag).all():
            raise ValueError(f"a drag is two finite (x, y) points, got {from_point!r} -> {to_point!r}")
        drag = self._clip_points(drag, st["size"], "drag")
        if np.array_equal(drag[0], drag[1]):
            logger.warning(f"drag of zero length at {drag[0].tolist()} ignored")
            return st["result"]
        src, dst = points_to_crop(drag, st["crop_box"], S)
        device = self.model.device
        interaction = st["interaction"]
        self.model.add_drag(interaction, (torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device)),
                            torch.from_numpy(st["result"].phi))
        drags = self.model.drag_tensor([interaction], (S, S)) if self.model.edits_motion else None
        if preview and not self.can_preview and not self._warned_preview:
            logger.warning("preview: this model's motion-editing block is untrained (or absent); running the "
                           "full pass instead, so the drag acts through its click")
            self._warned_preview = True
        if not (preview and self.can_preview):
            st["branches"] = self.model.branches(st["images"], interaction["heatmap"][None, None])
        return self._finish(self.model.edit_and_upsample(st["branches"], (S, S), drags))

    def _finish(self, terms):
        st = self._state
        phi = self.model.evolve_corrected(terms, [st["interaction"]])[0, 0]
        phi = phi.float().cpu().numpy()
        H, W = st["size"]
        polys = crop_polygons(phi, st["crop_box"])
        st["result"] = DELSEResult(
            mask=paste_to_image(phi, st["crop_box"], H, W),
            polygon=polys[0] if polys else np.zeros((0, 2), np.float32),
            polygons=polys,
            phi=phi,
            crop_box=st["crop_box"],
        )
        return st["result"]
