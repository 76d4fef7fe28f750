"""The DELSE network (Fig. 2): encoder with skip features, three PSP branches predicting the
initial level set phi0, the motion field V and the modulation m, the level-set evolution of eq. 9
(``levelset.delse_evolve``), and the motion-editing block of section 4.4."""
import logging

import torch
import torch.nn.functional as F
from torch import nn

import levelset
from levelset.losses import direction_loss, evolution_loss, level_set_loss, pixel_wise_loss
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone
from detectron2.utils.events import get_event_storage

from .data import paste_to_image, points_heatmap
from .interactive import CORRECTION_MODES, DRAG_EDITS, drag_channels, sample_num_corrections, simulate_correction

logger = logging.getLogger(__name__)

__all__ = [
    "DELSE",
    "build_delse_encoder",
    "PSPModule",
    "SkipFeatures",
    "MotionEditingBlock",
    "copy_rgb_stem",
]


# ------------------------------------------------------------------------------- modules
def build_delse_encoder(cfg, in_channels):
    """Detectron2's ResNet from ``cfg.MODEL.RESNETS`` with an ``in_channels`` stem (4: RGB + the
    extreme-point heatmap). R-18/34 may also be narrower than 64 (RES2_OUT_CHANNELS), which
    ``build_resnet_backbone`` refuses; the tiny CPU configs use that."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in (18, 34) or r.RES2_OUT_CHANNELS == 64:
        return build_resnet_backbone(cfg, ShapeSpec(channels=in_channels))
    stem = BasicStem(in_channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[r.DEPTH]
    stages, c_in, c_out = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for i, n in enumerate(blocks):
        stages.append(ResNet.make_stage(BasicBlock, n, stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                                        in_channels=c_in, out_channels=c_out, norm=r.NORM))
        c_in, c_out = c_out, c_out * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def copy_rgb_stem(stem_conv, state_dict):
    """DEXTR's initialisation of the 4-channel stem from a 3-channel (ImageNet) checkpoint: the
    RGB filters are copied, the extreme-point plane starts at zero.

    The checkpoint's stem is found by shape, not by name (Detectron2 "stem.conv1.weight", Caffe2
    "conv1_w", torchvision "conv1.weight"): the one (C, 3, k, k) tensor whose C and k are the
    stem's. Returns whether a filter was copied (False: no 3-channel stem in ``state_dict``)."""
    w = stem_conv.weight
    want = (w.shape[0], 3) + tuple(w.shape[2:])
    found = [v for v in state_dict.values() if hasattr(v, "shape") and tuple(v.shape) == want]
    if w.shape[1] != 4 or len(found) != 1:
        return False
    with torch.no_grad():
        w[:, :3].copy_(torch.as_tensor(found[0], dtype=w.dtype))
        w[:, 3:].zero_()
    return True


def _init_stem_from_weights(encoder, weights):
    """Before the checkpointer loads ``MODEL.WEIGHTS`` (which skips the 4-channel stem as a shape
    mismatch), copy the RGB filters of a 3-channel model-zoo ``.pkl`` into the stem. DELSE's own
    ``.pth`` checkpoints hold the 4-channel stem and are left to the checkpointer."""
    if not weights or not weights.endswith(".pkl"):
        return
    from detectron2.utils.file_io import PathManager
    from levelset_d2.checkpoint import read_pkl_checkpoint

    try:
        local = PathManager.get_local_path(weights)  # downloads a URL once (cached)
    except OSError as e:  # offline: the checkpointer's own load reports it when it runs
        logger.warning(f"DELSE: cannot read {weights} to initialise the stem ({e}); it starts random")
        return
    with open(local, "rb") as f:
        loaded = read_pkl_checkpoint(f, weights)
    if copy_rgb_stem(encoder.stem.conv1, loaded.get("model", loaded)):
        logger.info(f"DELSE: stem RGB filters copied from {weights}, extreme-point plane set to zero "
                    "(DEXTR); the checkpointer then skips the 3-channel stem")


class PSPModule(nn.Module):
    """Pyramid pooling (PSPNet) followed by a 3x3 fusion conv and a 1x1 predictor.

    ``bin_channels``: width of each pooled bin (default ``channels``; PSPNet: in_channels / bins)."""

    def __init__(self, in_channels, channels, out_channels, bins=(1, 2, 3, 6), norm="BN", bin_channels=None):
        super().__init__()
        self.bins = tuple(bins)
        bin_channels = channels if bin_channels is None else int(bin_channels)
        # No norm on the pooled maps: a 1x1 bin has one value per channel (GN and BN in batch 1
        # cannot normalise it).
        self.stages = nn.ModuleList(
            Conv2d(in_channels, bin_channels, 1, activation=F.relu) for _ in self.bins
        )
        self.fuse = Conv2d(in_channels + bin_channels * len(self.bins), channels, 3, padding=1,
                           bias=not norm, norm=get_norm(norm, channels), activation=F.relu)
        self.predictor = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x):
        size = x.shape[-2:]
        pyramid = [x]
        for bin_size, stage in zip(self.bins, self.stages):
            y = stage(F.adaptive_avg_pool2d(x, bin_size))
            pyramid.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.predictor(self.fuse(torch.cat(pyramid, dim=1)))


class SkipFeatures(nn.Module):
    """Skip features (PolygonRNN++): each encoder stage -> 3x3 conv + norm + ReLU, resized to
    the finest stage and concatenated. With ``enabled=False`` only the last stage is used."""

    def __init__(self, input_shapes, channels, norm="BN", enabled=True):
        super().__init__()
        names = list(input_shapes) if enabled else [list(input_shapes)[-1]]
        self.in_features = names
        self.projections = nn.ModuleDict(
            {
                n: Conv2d(input_shapes[n].channels, channels, 3, padding=1, bias=not norm,
                          norm=get_norm(norm, channels), activation=F.relu)
                for n in names
            }
        )
        self.out_channels = channels * len(names)
        self.stride = min(input_shapes[n].stride for n in names)

    def forward(self, features):
        outs = [self.projections[n](features[n]) for n in self.in_features]
        size = max((o.shape[-2:] for o in outs), key=lambda s: s[0])  # the finest stage
        outs = [o if o.shape[-2:] == size else
                F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs]
        return torch.cat(outs, dim=1)


class MotionEditingBlock(nn.Module):
    """Re-predicts the motion field from (V, two drag channels) (section 4.4): an input conv,
    ``num_convs`` residual 3x3 convs of ``channels`` channels, and a 2-channel conv. With
    ``extra_inputs`` > 0 the input conv also reads that many more channels (phi_0, not in the paper).

    The output is added to V, and the last conv starts at zero, so before it is trained the
    block leaves V unchanged and a correction acts only through the extreme-point channel."""

    def __init__(self, num_convs=6, channels=128, norm="BN", extra_inputs=0):
        super().__init__()
        self.stem = Conv2d(4 + extra_inputs, channels, 3, padding=1, activation=F.relu)
        self.residuals = nn.ModuleList(
            Conv2d(channels, channels, 3, padding=1, bias=not norm, norm=get_norm(norm, channels))
            for _ in range(num_convs)
        )
        self.predictor = nn.Conv2d(channels, 2, 3, padding=1)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, motion, drags, extra=None):
        """motion (N, 2, h, w), drags (N, 2, h, w), extra (N, extra_inputs, h, w) or None -> (N, 2, h, w)."""
        x = self.stem(torch.cat([motion, drags] + ([] if extra is None else [extra]), dim=1))
        for conv in self.residuals:
            x = F.relu(x + conv(x))
        return motion + self.predictor(x)


# ------------------------------------------------------------------------------- meta-arch
def _log_single_loss(losses):
    """Detectron2's trainer logs a loss dict of one term only as ``total_loss``: log that term under
    its own name too, or the printed value would be stale (the pretraining phase's last one)."""
    if len(losses) == 1:
        ((name, value),) = losses.items()
        try:
            get_event_storage().put_scalar(name, float(value.detach()))
        except AssertionError:  # no trainer running
            pass
    return losses


@META_ARCH_REGISTRY.register()
class DELSE(nn.Module):
    """Deep Extreme Level Set Evolution.

    Input: a list of samples from :class:`delse.data.DELSEDatasetMapper` (``image``,
    ``extreme_heatmap``, targets when training). Training returns the loss dict of Algorithm 1
    for the current phase; inference returns per sample ``phi0``, ``motion``, ``modulation``,
    ``phi`` (phi_T), ``crop_mask``, ``mask`` (image coordinates, when ``crop_box`` and image size
    are given) and, when GT is given and ``test_num_corrections > 0``, ``corrections``: the
    results after each simulated drag.

    With ``pixel_wise`` it is the DEXTR-style baseline on the same encoder and data: the Level
    Set Branch predicts mask logits, returned as ``phi0`` = ``phi`` (zero level: p = 0.5), with
    ``prob`` = sigmoid(logits); V = 0 and m = 1 are returned for the absent terms. Drags act only
    through the extreme-point channel (DEXTR's extra clicks).
    """

    @configurable
    def __init__(
        self,
        *,
        encoder,
        skip_features,
        initial_level_set_branch,
        motion_branch,
        modulation_branch,
        motion_editing,
        pixel_mean,
        pixel_std,
        use_extreme_points=True,
        use_motion=True,
        use_modulation=True,
        pixel_wise=False,
        tsdf_truncation=30.0,
        evolution_steps=5,
        evolution_dt=1.0,
        curvature_weight=1.0,
        dist_reg_weight=0.04,
        evolution_eps=None,
        clamp_to_truncation=False,
        heaviside_eps=1.0,
        phase="pretrain",
        pretrain_iters=0,
        evolution_loss_weight=100.0,
        direction_loss_weight=1.0,
        shift_range=5.0,
        num_corrections=0,
        correction_sampling="uniform",
        correction_mode="motion_editing",
        test_num_corrections=0,
        drag_edit="none",
        drag_edit_radius=0.5,
        drag_edit_min_radius=2.0,
        heatmap_sigma=10.0,
        edit_signed_drags=False,
        edit_reads_phi0=False,
        train_editing_only=False,
        test_flip=False,
    ):
        super().__init__()
        self.encoder = encoder
        self.skip_features = skip_features
        self.initial_level_set_branch = initial_level_set_branch
        self.motion_branch = motion_branch
        self.modulation_branch = modulation_branch
        self.motion_editing = motion_editing
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.use_extreme_points = use_extreme_points
        self.pixel_wise = bool(pixel_wise)
        self.use_motion = use_motion and not self.pixel_wise
        self.use_modulation = use_modulation and not self.pixel_wise
        self.tsdf_truncation = float(tsdf_truncation)
        self.evolution_steps = int(evolution_steps)
        self.evolution_dt = evolution_dt
        self.curvature_weight = curvature_weight
        self.dist_reg_weight = dist_reg_weight
        self.evolution_eps = evolution_eps
        self.clamp_to_truncation = bool(clamp_to_truncation)
        self.heaviside_eps = float(heaviside_eps)
        if phase not in ("pretrain", "joint"):
            raise ValueError(f"MODEL.DELSE.PHASE must be 'pretrain' or 'joint', got {phase!r}")
        self.phase = phase
        self.pretrain_iters = int(pretrain_iters)
        self.evolution_loss_weight = float(evolution_loss_weight)
        self.direction_loss_weight = float(direction_loss_weight)
        self.shift_range = float(shift_range)
        self.num_corrections = int(num_corrections)
        if correction_sampling not in ("uniform", "fixed"):
            raise ValueError(f"MODEL.DELSE.CORRECTION_SAMPLING must be 'uniform' or 'fixed', got {correction_sampling!r}")
        if correction_mode not in CORRECTION_MODES:
            raise ValueError(f"MODEL.DELSE.CORRECTION_MODE must be one of {CORRECTION_MODES}, got {correction_mode!r}")
        self.correction_sampling = correction_sampling
        self.correction_mode = correction_mode
        self.test_num_corrections = int(test_num_corrections)
        if drag_edit not in DRAG_EDITS:
            raise ValueError(f"MODEL.DELSE.DRAG_EDIT must be one of {DRAG_EDITS}, got {drag_edit!r}")
        if drag_edit != "none" and (drag_edit_radius < 0 or drag_edit_min_radius <= 0):
            raise ValueError("MODEL.DELSE.DRAG_EDIT_RADIUS must be >= 0 and DRAG_EDIT_MIN_RADIUS > 0, got "
                             f"{drag_edit_radius} and {drag_edit_min_radius}")
        self.drag_edit = drag_edit
        self.drag_edit_radius = float(drag_edit_radius)
        self.drag_edit_min_radius = float(drag_edit_min_radius)
        self.heatmap_sigma = float(heatmap_sigma)
        self.edit_signed_drags = bool(edit_signed_drags)
        self.edit_reads_phi0 = bool(edit_reads_phi0)
        self.test_flip = bool(test_flip)
        # Parts that this configuration never trains get no gradients (and DDP no unused
        # parameters): the editing block without simulated corrections, and switched-off branches.
        # An untrained editing block is the identity (its last conv starts at zero).
        for part, used in [(motion_editing, self.num_corrections > 0 and self.edits_motion),
                           (motion_branch, self.use_motion), (modulation_branch, self.use_modulation)]:
            if not used:
                part.requires_grad_(False)
        # TRAIN_EDITING_ONLY: the block alone learns; the rest keeps its weights and (see train()) its
        # batch-norm statistics. Only the simulated drags of the joint phase reach the block.
        self.train_editing_only = bool(train_editing_only)
        if self.train_editing_only:
            if not (self.num_corrections > 0 and self.edits_motion and phase == "joint"):
                raise ValueError("MODEL.DELSE.TRAIN_EDITING_ONLY trains the motion-editing block from simulated drags: it "
                                 "needs NUM_CORRECTIONS > 0, CORRECTION_MODE 'motion_editing', PHASE 'joint' and not "
                                 f"PIXEL_WISE; got {self.num_corrections}, {correction_mode!r}, {phase!r}, {self.pixel_wise}")
            for part in self._frozen_parts():
                part.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DELSE
        use_points = d.USE_EXTREME_POINTS
        encoder = build_delse_encoder(cfg, 4 if use_points else 3)
        if use_points:
            _init_stem_from_weights(encoder, cfg.MODEL.WEIGHTS)
        shapes = encoder.output_shape()
        skip = SkipFeatures({n: shapes[n] for n in d.ENCODER_FEATURES}, d.SKIP_CHANNELS, d.NORM,
                            d.SKIP_FEATURES)

        if d.PSP_BIN_WIDTH not in ("psp_channels", "pspnet"):
            raise ValueError(f"MODEL.DELSE.PSP_BIN_WIDTH must be 'psp_channels' or 'pspnet', got {d.PSP_BIN_WIDTH!r}")
        bin_channels = d.PSP_CHANNELS if d.PSP_BIN_WIDTH == "psp_channels" else skip.out_channels // len(d.PSP_BINS)

        def branch(out_channels):
            return PSPModule(skip.out_channels, d.PSP_CHANNELS, out_channels, d.PSP_BINS, d.NORM, bin_channels)

        return {
            "encoder": encoder,
            "skip_features": skip,
            "initial_level_set_branch": branch(1),
            "motion_branch": branch(2),
            "modulation_branch": branch(1),
            "motion_editing": MotionEditingBlock(d.EDIT_NUM_CONVS, d.EDIT_CHANNELS, d.NORM,
                                                 extra_inputs=1 if d.EDIT_READS_PHI0 else 0),
            "edit_signed_drags": d.EDIT_SIGNED_DRAGS,
            "edit_reads_phi0": d.EDIT_READS_PHI0,
            "train_editing_only": d.TRAIN_EDITING_ONLY,
            "test_flip": cfg.TEST.DELSE.FLIP,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "use_extreme_points": use_points,
            "use_motion": d.USE_MOTION,
            "use_modulation": d.USE_MODULATION,
            "pixel_wise": d.PIXEL_WISE,
            "tsdf_truncation": d.TSDF_TRUNCATION,
            "evolution_steps": d.EVOLUTION_STEPS,
            "evolution_dt": d.EVOLUTION_DT,
            "curvature_weight": d.CURVATURE_WEIGHT,
            "dist_reg_weight": d.DIST_REG_WEIGHT,
            "evolution_eps": d.EVOLUTION_EPS,
            "clamp_to_truncation": d.CLAMP_TO_TRUNCATION,
            "heaviside_eps": d.HEAVISIDE_EPS,
            "phase": d.PHASE,
            "pretrain_iters": d.PRETRAIN_ITERS,
            "evolution_loss_weight": d.EVOLUTION_LOSS_WEIGHT,
            "direction_loss_weight": d.DIRECTION_LOSS_WEIGHT,
            "shift_range": d.SHIFT_RANGE,
            "num_corrections": d.NUM_CORRECTIONS,
            "correction_sampling": d.CORRECTION_SAMPLING,
            "correction_mode": d.CORRECTION_MODE,
            "test_num_corrections": d.TEST_NUM_CORRECTIONS,
            "drag_edit": d.DRAG_EDIT,
            "drag_edit_radius": d.DRAG_EDIT_RADIUS,
            "drag_edit_min_radius": d.DRAG_EDIT_MIN_RADIUS,
            "heatmap_sigma": cfg.INPUT.DELSE.HEATMAP_SIGMA,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def train(self, mode=True):
        """nn.Module.train; with TRAIN_EDITING_ONLY every part but the motion-editing block stays in eval
        mode, so its batch-norm layers normalise with, and do not update, their running statistics."""
        super().train(mode)
        for part in self._frozen_parts():
            part.train(False)
        return self

    def _frozen_parts(self):
        """The children TRAIN_EDITING_ONLY freezes: all but the motion-editing block (none without it)."""
        return [c for c in self.children() if c is not self.motion_editing] if self.train_editing_only else []

    @property
    def edits_motion(self):
        """Whether a correction re-predicts V through the motion-editing block (section 4.4); else a
        drag acts only as a click in the extreme-point channel (pixel-wise baseline, "clicks")."""
        return not self.pixel_wise and self.correction_mode == "motion_editing"

    @property
    def evolves(self):
        """False for the paper's "Level Set Regression" baseline (no motion, no modulation)."""
        return self.use_motion or self.use_modulation

    # ------------------------------------------------------------------ network
    def layers(self, images, heatmaps, drags=None):
        """The network of Fig. 2: :meth:`branches`, then :meth:`edit_and_upsample`.

        Args:
            images: (N, 3, S, S) raw crops (0-255, cfg.INPUT.FORMAT); heatmaps: (N, 1, S, S) in
            [0, 1]; drags: optional (N, 2, S, S) motion-editing channels.
        Returns:
            dict of (N, C, S, S) tensors: ``phi0`` (pixels), ``motion`` (vx, vy), ``modulation``.
        """
        return self.edit_and_upsample(self.branches(images, heatmaps), images.shape[-2:], drags)

    def branches(self, images, heatmaps):
        """Encoder, skip features and the three branches, at the branches' resolution (stride of
        the finest encoder stage): ``phi0`` (pixels), ``motion`` (V before any editing) and
        ``modulation`` (after its sigmoid), each (N, C, h, w); the pixel-wise baseline: ``logits``.

        With ``test_flip`` (TEST.DELSE.FLIP) and in eval mode, the mean of the outputs on the crop
        and on its mirror image (heatmap mirrored too), mirrored back; V's x component changes sign."""
        out = self._branches(images, heatmaps)
        if not (self.test_flip and not self.training):
            return out
        mirrored = self._branches(images.flip(-1), heatmaps.flip(-1))
        for k, v in mirrored.items():
            v = v.flip(-1)
            if k == "motion":
                v = torch.cat([-v[:, :1], v[:, 1:]], dim=1)
            out[k] = (out[k] + v) / 2
        return out

    def _branches(self, images, heatmaps):
        x = (images - self.pixel_mean) / self.pixel_std
        if self.use_extreme_points:
            # Bring the heatmap to the range of the normalised colour channels.
            x = torch.cat([x, heatmaps * (255.0 / self.pixel_std.mean())], dim=1)
        feats = self.skip_features(self.encoder(x))
        if self.pixel_wise:
            return {"logits": self.initial_level_set_branch(feats)}
        # The branch regresses TSDF / D, an O(1) target; phi0 itself is in pixels.
        return {"phi0": self.initial_level_set_branch(feats) * self.tsdf_truncation,
                "motion": self.motion_branch(feats),
                "modulation": torch.sigmoid(self.modulation_branch(feats))}

    def edit_and_upsample(self, low, size, drags=None):
        """Motion-field editing (section 4.4) of the branches' outputs ``low`` with the (N, 2, S, S)
        ``drags`` channels, if any, then everything upsampled to ``size``: the terms of eq. 9."""

        def up(t):
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

        if self.pixel_wise:
            logits = up(low["logits"])
            n, _, h, w = logits.shape
            return {"phi0": logits, "prob": torch.sigmoid(logits),
                    "motion": logits.new_zeros(n, 2, h, w), "modulation": logits.new_ones(n, 1, h, w)}
        motion = low["motion"]
        if drags is not None and self.edits_motion:
            # The block runs at the branches' resolution; samples without drags keep their V.
            pooled = F.adaptive_avg_pool2d(drags, motion.shape[-2:])
            extra = low["phi0"] / self.tsdf_truncation if self.edit_reads_phi0 else None
            edited = self.motion_editing(motion, pooled, extra)
            has_drag = drags.flatten(1).abs().sum(1).gt(0).view(-1, 1, 1, 1)
            motion = torch.where(has_drag, edited, motion)
        return {"phi0": up(low["phi0"]), "motion": up(motion), "modulation": up(low["modulation"])}

    def evolve(self, phi0, motion, modulation):
        """phi_T of eq. 9 with the terms switched on in the config; returns (N, 1, S, S)."""
        if not self.evolves:
            return phi0
        if not self.use_motion:
            motion = torch.zeros_like(motion)
        if not self.use_modulation:
            modulation = torch.ones_like(modulation)
        return levelset.delse_evolve(
            phi0, motion, modulation,
            curvature_weight=self.curvature_weight, dist_reg_weight=self.dist_reg_weight,
            eps=self.evolution_eps, dt=self.evolution_dt, steps=self.evolution_steps,
            phi_bound=self.tsdf_truncation if self.clamp_to_truncation else None,
        )

    # ------------------------------------------------------------------ forward
    def current_phase(self):
        """PHASE, switched from "pretrain" to "joint" at PRETRAIN_ITERS of the running trainer."""
        if self.phase == "pretrain" and self.pretrain_iters > 0:
            try:
                it = get_event_storage().iter
            except AssertionError:  # no trainer running
                return self.phase
            if it >= self.pretrain_iters:
                if not getattr(self, "_joint_logged", False):
                    self._joint_logged = True
                    logger.info(f"DELSE: joint training from iteration {it} on: loss_level_set and "
                                "loss_direction are no longer computed (the printer keeps their last values)")
                return "joint"
        return self.phase

    def _stack(self, batched_inputs, key):
        return torch.stack([x[key] for x in batched_inputs]).to(self.device)

    def forward(self, batched_inputs):
        images = self._stack(batched_inputs, "image").float()
        heatmaps = self._stack(batched_inputs, "extreme_heatmap").float()
        if not self.training:
            return self.inference(batched_inputs, images, heatmaps)
        gt_mask = self._stack(batched_inputs, "gt_mask")
        out = self.layers(images, heatmaps)
        if self.pixel_wise:  # one loss throughout, with the simulated corrections if any
            losses = {"loss_mask": self.final_mask_loss(out, gt_mask, images, heatmaps)}
        elif self.current_phase() == "pretrain":
            losses = self.pretrain_losses(out, gt_mask, batched_inputs)
        else:
            losses = self.joint_losses(out, gt_mask, images, heatmaps)
        return _log_single_loss(losses)

    def pretrain_losses(self, out, gt_mask, batched_inputs):
        """Eq. 10: L0 + alpha L_T(evolve(phi_gt + dh)) + beta L_direct, dh ~ U[-5, 5] per sample."""
        gt_tsdf = self._stack(batched_inputs, "gt_tsdf")
        losses = {"loss_level_set": level_set_loss(out["phi0"], gt_tsdf)}
        if self.evolves:
            shift = (torch.rand(len(gt_tsdf), 1, 1, 1, device=self.device) * 2 - 1) * self.shift_range
            phi_t = self.evolve(gt_tsdf + shift, out["motion"], out["modulation"])
            losses["loss_evolution"] = self.evolution_loss_weight * evolution_loss(
                phi_t, gt_mask, self.heaviside_eps)
        if self.use_motion:
            gt_direction = self._stack(batched_inputs, "gt_direction")
            losses["loss_direction"] = self.direction_loss_weight * direction_loss(
                out["motion"], gt_direction)
        return losses

    def joint_losses(self, out, gt_mask, images, heatmaps):
        """L_T on evolve(phi0) (Algorithm 1, joint loop), plus L_T after each simulated drag,
        averaged, times alpha (see MODEL.DELSE.EVOLUTION_LOSS_WEIGHT)."""
        return {"loss_evolution": self.evolution_loss_weight * self.final_mask_loss(out, gt_mask, images, heatmaps)}

    def mask_loss(self, phi, gt_mask):
        """L_T (eq. 15) of a final level set; the pixel-wise baseline's BCE of its logits."""
        if self.pixel_wise:
            return pixel_wise_loss(phi, gt_mask)
        return evolution_loss(phi, gt_mask, self.heaviside_eps)

    def final_mask_loss(self, out, gt_mask, images, heatmaps):
        """mask_loss of the final prediction and of the prediction after each simulated drag.

        Each sample gets its own number of drags (MODEL.DELSE.CORRECTION_SAMPLING, at most
        NUM_CORRECTIONS) and none once the annotator finds its mask within 1 px; every round
        re-runs the network on the samples dragged in it. The loss is the mean over all
        (sample, round) predictions, round 0 included."""
        phi_t = self.evolve(out["phi0"], out["motion"], out["modulation"])
        loss = self.mask_loss(phi_t, gt_mask)
        if self.num_corrections == 0:
            return loss
        n = len(gt_mask)
        counts = sample_num_corrections(n, self.num_corrections, self.correction_sampling)
        state = [self.new_interaction(h[0]) for h in heatmaps]
        phi_last = phi_t.detach()[:, 0].clone()
        total, weight = loss * n, n
        active = list(range(n))
        for r in range(1, max(counts) + 1):
            dragged = []
            for i in active:
                if counts[i] < r:
                    continue
                drag = simulate_correction(phi_last[i], gt_mask[i])
                if drag is not None:
                    self.add_drag(state[i], drag, phi_last[i])
                    dragged.append(i)
            active = dragged
            if not active:
                break
            idx = torch.tensor(active, device=images.device)
            corrected = self.corrected_terms(images[idx], [state[i] for i in active])
            phi_r = self.evolve(corrected["phi0"], corrected["motion"], corrected["modulation"])
            total = total + self.mask_loss(phi_r, gt_mask[idx]) * len(active)
            weight += len(active)
            phi_last[idx] = phi_r.detach()[:, 0]
        if weight == n and self.edits_motion:
            # No drag in this batch: keep the editing block in the graph (DDP expects every
            # trainable parameter to get a gradient, here zero).
            total = total + sum(p.sum() for p in self.motion_editing.parameters()) * 0.0
        return total / weight

    # ------------------------------------------------------------------ corrections
    def new_interaction(self, heatmap):
        """Interaction state of one sample: its extreme-point heatmap and the drags so far."""
        return {"heatmap": heatmap, "drags": []}

    def add_drag(self, state, drag, phi=None):
        """Record a drag: its target joins the extreme-point channel (as DEXTR's extra clicks);
        with motion editing the drag itself also enters the two drag channels. ``phi``: the (S, S)
        level set the annotator corrected; whether the drag grows the object (its target outside
        phi) is kept for MODEL.DELSE.DRAG_EDIT (decided then, not on a later, edited phi)."""
        if drag is None:
            return
        state["drags"].append(drag)
        grows = None
        if phi is not None:
            S = phi.shape[-1]
            x, y = (min(max(int(round(float(v))), 0), S - 1) for v in drag[1])
            grows = bool(phi[..., y, x].flatten()[0] <= 0)
        state.setdefault("grows", []).append(grows)
        S = state["heatmap"].shape[-2:]
        click = points_heatmap(drag[1][None], S, self.heatmap_sigma).to(state["heatmap"])
        state["heatmap"] = torch.maximum(state["heatmap"], click)

    def drag_tensor(self, states, size):
        """(N, 2, S, S) motion-editing channels of every sample's drags so far."""
        return torch.stack([drag_channels(s["drags"], size, self.device, self.edit_signed_drags) for s in states])

    def enforce_drags(self, phi, states):
        """(N, 1, S, S) level sets (pixels) with each sample's drags so far enforced in turn
        (``levelset.enforce_drag``; capsule radius DRAG_EDIT_RADIUS x the drag's length, at least
        DRAG_EDIT_MIN_RADIUS px)."""
        out = []
        for p, s in zip(phi, states):
            for (src, dst), grows in zip(s["drags"], s.get("grows", [None] * len(s["drags"]))):
                length = float((torch.as_tensor(dst) - torch.as_tensor(src)).float().norm())
                p = levelset.enforce_drag(p, src, dst, max(self.drag_edit_min_radius, self.drag_edit_radius * length),
                                          grow=grows)
            out.append(p)
        return torch.stack(out) if out else phi

    def evolve_corrected(self, terms, states):
        """phi_T after the corrections in ``states``: the evolution of the (edited) terms, with the
        drags enforced on phi_0 and / or on phi_T as MODEL.DELSE.DRAG_EDIT says (not in the paper)."""
        phi0 = terms["phi0"]
        editing = self.drag_edit != "none" and not self.pixel_wise
        if editing and self.drag_edit in ("phi0", "both"):
            phi0 = self.enforce_drags(phi0, states)
        phi = self.evolve(phi0, terms["motion"], terms["modulation"])
        if editing and self.drag_edit in ("result", "both"):
            phi = self.enforce_drags(phi, states)
        return phi

    def corrected_terms(self, images, states):
        """Re-run the network with every sample's corrections (heatmap, and the drag channels with
        motion editing): the full pass of section 4.4."""
        S = images.shape[-2:]
        heatmaps = torch.stack([s["heatmap"] for s in states])[:, None]
        if not self.edits_motion:
            return self.layers(images, heatmaps)
        return self.layers(images, heatmaps, self.drag_tensor(states, S))

    # ------------------------------------------------------------------ inference
    def _result(self, terms, i, phi, x):
        r = {k: v[i] for k, v in terms.items()}
        r["phi"] = phi[i]
        r["crop_mask"] = phi[i, 0] > 0
        if "crop_box" in x and "height" in x:
            r["mask"] = torch.from_numpy(paste_to_image(phi[i, 0], x["crop_box"], x["height"], x["width"]))
        return r

    def inference(self, batched_inputs, images, heatmaps):
        terms = self.layers(images, heatmaps)
        phi = self.evolve(terms["phi0"], terms["motion"], terms["modulation"])
        results = [self._result(terms, i, phi, x) for i, x in enumerate(batched_inputs)]
        have_gt = all("gt_mask" in x for x in batched_inputs)
        if self.test_num_corrections > 0 and have_gt:
            gt_mask = self._stack(batched_inputs, "gt_mask")
            states = [self.new_interaction(h[0]) for h in heatmaps]
            for r in results:
                r["corrections"] = []
            for _ in range(self.test_num_corrections):
                for s, p, gt in zip(states, phi[:, 0], gt_mask):
                    drag = simulate_correction(p, gt)
                    self.add_drag(s, drag, p)
                    s["last_drag"] = drag
                terms = self.corrected_terms(images, states)
                phi = self.evolve_corrected(terms, states)
                for i, (x, s) in enumerate(zip(batched_inputs, states)):
                    r = self._result(terms, i, phi, x)
                    r["drag"] = s["last_drag"]
                    results[i]["corrections"].append(r)
        return results
