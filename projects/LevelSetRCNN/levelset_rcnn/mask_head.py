"""LevelSet R-CNN mask heads (section 4.1) and their loss (section 4.2).

Heads produce, per RoI, an initial TSDF phi_0, Chan-Vese hyperparameters and a Chan-Vese feature
embedding in ``layers``; the unrolled evolution is ``levelset.chan_vese`` (the shared core), and
targets, loss and inference are the plain functions below.
"""
import math
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

import levelset
from levelset.losses import heaviside_bce
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec, cat, get_norm
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from .roi_heads import LevelSetROIHeads

__all__ = [
    "check_tsdf_config",
    "TSDFMaskRCNNHead",
    "LevelSetMaskHead",
    "HighResMaskRCNNHead",
    "HyperparameterHead",
    "GlobalHyperparameters",
    "ChanVeseFeaturesHead",
    "tsdf_targets",
    "tsdf_loss",
    "select_class",
    "split_hyperparameters",
    "levelset_inference",
]

# Per-RoI standard deviations of an image crop below this (normalised pixel units, ~0.06 grey
# levels at Detectron2's PIXEL_STD) count as this: a flat crop is not amplified into noise.
_CROP_MIN_STD = 1e-3


def tsdf_targets(
    instances: List[Instances], resolution: int, truncation: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Ground-truth masks and TSDFs of positive RoIs, cropped to the proposal boxes exactly as
    Detectron2's ``mask_rcnn_loss`` does (``gt_masks.crop_and_resize``).

    Args:
        instances: per image, with ``proposal_boxes`` and ``gt_masks`` (PolygonMasks or BitMasks).
        resolution: side S of the targets.
        truncation: TSDF truncation in pixels at resolution S.
    Returns:
        gt_masks (R, S, S) bool, gt_tsdf (R, S, S) float32 in [-1, 1], positive inside.
    """
    masks = [
        inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, resolution)
        for inst in instances
        if len(inst) > 0
    ]
    if len(masks) == 0:
        device = instances[0].proposal_boxes.device if len(instances) else "cpu"
        empty = torch.zeros((0, resolution, resolution), device=device)
        return empty.bool(), empty
    masks = cat(masks, dim=0)
    masks = masks if masks.dtype == torch.bool else masks > 0.5
    return masks, levelset.mask_to_tsdf(masks, truncation)


def tsdf_loss(
    phi: torch.Tensor, gt_tsdf: torch.Tensor, gt_masks: torch.Tensor, eps: float
) -> torch.Tensor:
    """
    l_TSDF of section 4.2: ``|phi - phi_GT|_1 + BCE(H_eps(phi), M_GT)``, both averaged over pixels
    and RoIs.

    Args:
        phi: (R, 1, S, S) predicted TSDF; gt_tsdf: (R, S, S); gt_masks: (R, S, S) bool.
    Returns:
        scalar loss.
    """
    return F.l1_loss(phi[:, 0].float(), gt_tsdf.float()) + heaviside_bce(phi, gt_masks, eps)


def _centre(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    (R, C, h, w) -> (x minus its mean per RoI and channel, (R, C, 1, 1) standard deviation with
    Bessel's correction, as ``torch.std``). Two passes over the centred values: on the CPU
    ``torch.std`` over the spatial dims is ~10x slower at the mask head's sizes (BENCHMARKS.md section 5).
    """
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    return centred, ((centred * centred).sum(dim=(2, 3), keepdim=True) / n).sqrt()


def standardize_crops(crops: torch.Tensor) -> torch.Tensor:
    """
    (R, 3, S, S) image crops -> zero mean, unit standard deviation per RoI and channel, so that the
    image's Chan-Vese data term has the same scale whatever the RoI's brightness and contrast.
    """
    centred, std = _centre(crops)
    return centred / std.clamp_min(_CROP_MIN_STD)


def standardize_embedding(x: torch.Tensor, raw_gain: torch.Tensor, floor: float) -> torch.Tensor:
    """
    (R, C, h, w) embedding -> zero mean and standard deviation ``g_c / sqrt(C)`` per RoI and channel,
    ``g_c = floor + (1 - floor) softplus(raw_gain_c) / log 2`` (1 at ``raw_gain = 0``, never below
    ``floor``, unbounded above). The 1 / sqrt(C) keeps ``sum_c (F_c - c)^2`` of two regions a unit
    apart per channel at ~1-4 whatever C, the data-term scale of the HYPERPARAM_INIT starts.

    Args:
        x: (R, C, h, w) embedding; raw_gain: (C,) learned; floor: in (0, 1].
    """
    centred, std = _centre(x)
    gain = floor + (1.0 - floor) * F.softplus(raw_gain) / math.log(2.0)
    return centred / std.clamp_min(_CROP_MIN_STD) * (gain / math.sqrt(x.shape[1])).view(1, -1, 1, 1)


def select_class(predictions: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """
    Pick each RoI's channel of a per-class prediction with index tensors (as ``mask_rcnn_loss``).

    Args:
        predictions: (R, K, S, S), K = #classes or 1 (class-agnostic).
        classes: (R,) int64 class of each RoI.
    Returns:
        (R, 1, S, S)
    """
    if predictions.size(1) == 1:
        return predictions
    indices = torch.arange(predictions.size(0), device=predictions.device)
    return predictions[indices, classes.to(predictions.device)][:, None]


def split_hyperparameters(hyperparameters: torch.Tensor, num_steps: int) -> Dict[str, torch.Tensor]:
    """
    Args:
        hyperparameters: (R, 2N + 3) ordered as lambda1, lambda2, mu, eps_1..N, dt_1..N.
    Returns:
        keyword arguments of ``levelset.chan_vese``: lambda1, lambda2, mu (R,); eps, dt (R, N).
    """
    n = num_steps
    assert hyperparameters.size(1) == 2 * n + 3, hyperparameters.shape
    return {
        "lambda1": hyperparameters[:, 0],
        "lambda2": hyperparameters[:, 1],
        "mu": hyperparameters[:, 2],
        "eps": hyperparameters[:, 3 : 3 + n],
        "dt": hyperparameters[:, 3 + n : 3 + 2 * n],
    }


def levelset_inference(
    phi: torch.Tensor, pred_instances: List[Instances], eps: float, return_tsdf: bool = False
) -> None:
    """
    Attach ``pred_masks = H_eps(phi)`` (R, 1, S, S) to each image's instances. Detectron2 pastes
    them with threshold 0.5, i.e. it cuts the zero level set of phi (H_eps(0) = 0.5).

    Args:
        phi: (R, 1, S, S) TSDF of the predicted class, RoIs of all images concatenated.
        return_tsdf: also attach phi itself as ``pred_tsdf`` (for sub-pixel polygons).
    """
    num_boxes_per_image = [len(i) for i in pred_instances]
    masks = levelset.heaviside(phi.float(), eps).split(num_boxes_per_image, dim=0)
    tsdfs = phi.float().split(num_boxes_per_image, dim=0)
    for mask, tsdf, instances in zip(masks, tsdfs, pred_instances):
        instances.pred_masks = mask
        if return_tsdf:
            instances.pred_tsdf = tsdf


def _conv_stack(
    in_channels: int, conv_dims: List[int], norm: str, first_stride: int = 1
) -> Tuple[nn.Sequential, int]:
    """3x3 conv + norm + ReLU layers, MSRA-initialised as in Detectron2's mask head."""
    layers = []
    for k, dim in enumerate(conv_dims):
        conv = Conv2d(
            in_channels, dim, kernel_size=3, stride=first_stride if k == 0 else 1, padding=1,
            bias=not norm, norm=get_norm(norm, dim), activation=nn.ReLU(),
        )
        weight_init.c2_msra_fill(conv)
        layers.append(conv)
        in_channels = dim
    return nn.Sequential(*layers), in_channels


def bounded_positive(raw: torch.Tensor, start: torch.Tensor, floor: float) -> torch.Tensor:
    """
    ``start * (floor + 2 (1 - floor) * sigmoid(raw))``: equals ``start`` at ``raw = 0`` and stays in
    ``[floor, 2 - floor] * start``. ``floor = 0`` is ``2 * sigmoid`` scaled by ``start``. A floor
    > 0 keeps a hyperparameter (and the gradient through it) from vanishing: near 0, ``2 * sigmoid``
    leaves a gradient proportional to the value itself.

    Args:
        raw: (R, P) head outputs; start: (P,) starting values; floor: in [0, 1).
    """
    return start * (floor + 2.0 * (1.0 - floor) * torch.sigmoid(raw))


def _register_starts(module: nn.Module, start, num_outputs: int, floor: float) -> None:
    """The (num_outputs,) starting values (ones by default) and the floor of :func:`bounded_positive`."""
    start = torch.ones(num_outputs) if start is None else torch.as_tensor(start, dtype=torch.float32)
    module.register_buffer("start", start, persistent=False)
    module.floor = floor


def hyperparameter_starts(init: List[float], num_steps: int) -> torch.Tensor:
    """[lambda1, lambda2, mu, eps, dt] -> (2N + 3,) starting values ordered as split_hyperparameters."""
    if len(init) != 5:
        raise ValueError(f"MODEL.LEVELSET.HYPERPARAM_INIT needs 5 values (lambda1, lambda2, mu, eps, dt), got {list(init)}")
    if min(init) <= 0:
        raise ValueError(f"MODEL.LEVELSET.HYPERPARAM_INIT must be positive, got {list(init)}")
    l1, l2, mu, eps, dt = (float(v) for v in init)
    return torch.tensor([l1, l2, mu] + [eps] * num_steps + [dt] * num_steps)


class HyperparameterHead(nn.Module):
    """
    Adaptive per-RoI hyperparameters (section 4.1): convs -> average pool -> 2 FC -> 2N + 3 values
    -> :func:`bounded_positive` (``2 * sigmoid`` times the starting values, which they take at
    initialisation). The first conv has stride 2: the output is pooled to one vector anyway, and
    this makes the head 4x cheaper.
    """

    def __init__(self, in_channels: int, conv_dims: List[int], fc_dim: int, num_outputs: int,
                 conv_norm: str = "", start=None, floor: float = 0.0):
        super().__init__()
        self.convs, channels = _conv_stack(in_channels, conv_dims, conv_norm, first_stride=2)
        self.fc1 = nn.Linear(channels, fc_dim)
        self.fc2 = nn.Linear(fc_dim, num_outputs)
        weight_init.c2_xavier_fill(self.fc1)
        nn.init.normal_(self.fc2.weight, std=0.001)
        nn.init.constant_(self.fc2.bias, 0.0)
        _register_starts(self, start, num_outputs, floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) RoI features -> (R, 2N + 3)."""
        x = self.convs(x).mean(dim=(2, 3))
        return bounded_positive(self.fc2(F.relu(self.fc1(x))), self.start, self.floor)


class GlobalHyperparameters(nn.Module):
    """Ablation of section 5: one learned hyperparameter vector shared by all RoIs (as the head's)."""

    def __init__(self, num_outputs: int, start=None, floor: float = 0.0):
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(num_outputs))
        _register_starts(self, start, num_outputs, floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, ...) -> (R, 2N + 3)."""
        return bounded_positive(self.raw[None], self.start, self.floor).expand(x.size(0), -1)


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """
    A 1 x 1 ``conv`` (no norm, no activation) as one matrix product per RoI: (R, C_in, h, w) ->
    (R, C_out, h, w), equal to ``conv(x)``. On the CPU mkldnn reorders an NCHW input for a 1 x 1
    conv; the product is ~2x faster at the features head's sizes (BENCHMARKS.md section 5).
    """
    R, _, h, w = x.shape
    c_out = conv.weight.shape[0]
    weight = conv.weight.flatten(1).expand(R, -1, -1)  # (R, C_out, C_in), no copy
    if conv.bias is None:
        return torch.bmm(weight, x.flatten(2)).view(R, c_out, h, w)
    return torch.baddbmm(conv.bias.view(1, -1, 1), weight, x.flatten(2)).view(R, c_out, h, w)


class ChanVeseFeaturesHead(nn.Module):
    """
    Chan-Vese feature embedding F(r_m) (section 4.1): convs on the RoI features, a 2x deconv to C
    channels, a 1x1 conv (so that F can take any sign), then one bilinear upsampling to S x S. All learned layers run at
    RoI resolution (14 -> 28); only the final interpolation touches S x S, which keeps the head
    cheap on CPU.

    With ``upsample=False`` the head returns the embedding before that last, linear interpolation:
    ``levelset.chan_vese`` takes it as is and evolves on its exact bilinear upsampling without ever
    materialising C x S x S (same result, a fraction of the time and memory).

    With ``gain_floor`` set, the embedding is standardised per RoI and channel and scaled by a
    learned per-channel gain (:func:`standardize_embedding`), whose parameters live here.
    """

    def __init__(self, in_channels: int, conv_dims: List[int], embed_channels: int,
                 resolution: int, conv_norm: str = "", upsample: bool = True,
                 deconv_channels: int = 0, gain_floor: Optional[float] = None):
        super().__init__()
        # Raw per-channel gain, 0 at the start (gain 1): see standardize_embedding.
        self.gain = None if gain_floor is None else nn.Parameter(torch.zeros(embed_channels))
        self.gain_floor = gain_floor
        self.convs, channels = _conv_stack(in_channels, conv_dims, conv_norm)
        # By default the deconv already narrows to C channels: 4x cheaper than a C_in-wide one at
        # C = 64. Heads with very few output channels (DELSE's motion: 2, modulation: 1) pass a
        # wider ``deconv_channels``, or the ReLU after the deconv would starve them.
        width = deconv_channels or embed_channels
        self.deconv = ConvTranspose2d(channels, width, kernel_size=2, stride=2)
        self.embedding = Conv2d(width, embed_channels, kernel_size=1)
        self.resolution = resolution
        self.upsample = upsample
        weight_init.c2_msra_fill(self.deconv)
        weight_init.c2_msra_fill(self.embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C_in, h, w) -> (R, C, S, S), or (R, C, 2h, 2w) with ``upsample=False``."""
        x = conv1x1(self.embedding, F.relu(self.deconv(self.convs(x))))
        if self.gain is not None:
            x = standardize_embedding(x, self.gain, self.gain_floor)
        if self.upsample and x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False)
        return x


def check_tsdf_config(ls) -> None:
    """Fail when the head is built, naming the key to change, rather than deep in a forward."""
    ev, ts, trunc = ls.EVOLUTION_RESOLUTION, ls.TSDF_RESOLUTION, ls.TRUNCATION
    if ts < 1:
        raise ValueError(f"MODEL.LEVELSET.TSDF_RESOLUTION must be >= 1, got {ts}")
    if ev < ts or ev % ts != 0:
        raise ValueError(f"MODEL.LEVELSET.EVOLUTION_RESOLUTION ({ev}) must be a multiple of, and at least, "
                         f"MODEL.LEVELSET.TSDF_RESOLUTION ({ts})")
    if not trunc > 0:
        raise ValueError(f"MODEL.LEVELSET.TRUNCATION must be > 0 (pixels at EVOLUTION_RESOLUTION), got {trunc}")


@ROI_MASK_HEAD_REGISTRY.register()
class TSDFMaskRCNNHead(nn.Module):
    """
    The initial TSDF head alone: Mask R-CNN's mask head with a TSDF output (tanh to [-1, 1]) trained
    with l_TSDF. On its own it is the ablation "Mask R-CNN with TSDF targets" (section 5); it is
    also the phi_0 part of :class:`LevelSetMaskHead`.
    """

    # Side of the image crops the ROI heads must pass to forward (0: none; LevelSetROIHeads reads it).
    image_crop_resolution = 0

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: List[int],
        conv_norm: str = "",
        tsdf_resolution: int = 28,
        evolution_resolution: int = 112,
        truncation: float = 10.0,
        loss_weight_phi0: float = 1.0,
        loss_eps: float = 0.1,
        return_tsdf: bool = False,
    ):
        """
        Args:
            input_shape: RoI feature shape.
            num_classes: 1 for a class-agnostic phi_0.
            conv_dims: widths of the conv layers, then of the 2x deconv (Mask R-CNN's convention).
            tsdf_resolution: side of the head's own phi_0 output (28).
            evolution_resolution: S, side phi_0 is upsampled to and targets are computed at.
            truncation: TSDF truncation in pixels at S.
            loss_weight_phi0: weight of l_TSDF(phi_0).
            loss_eps: eps of H_eps in the BCE term and in pred_masks.
            return_tsdf: attach ``pred_tsdf`` at inference (for polygons).
        """
        super().__init__()
        self.initial_tsdf_head = MaskRCNNConvUpsampleHead(
            input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=conv_norm
        )
        self.tsdf_resolution = tsdf_resolution
        self.evolution_resolution = evolution_resolution
        self.truncation = truncation
        self.loss_weight_phi0 = loss_weight_phi0
        self.loss_eps = loss_eps
        self.return_tsdf = return_tsdf

    @classmethod
    def from_config(cls, cfg, input_shape):
        ls = cfg.MODEL.LEVELSET
        check_tsdf_config(ls)
        conv_dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        agnostic = ls.CLS_AGNOSTIC or cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
        return {
            "input_shape": input_shape,
            "num_classes": 1 if agnostic else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dims": [conv_dim] * (cfg.MODEL.ROI_MASK_HEAD.NUM_CONV + 1),
            "conv_norm": cfg.MODEL.ROI_MASK_HEAD.NORM,
            "tsdf_resolution": ls.TSDF_RESOLUTION,
            "evolution_resolution": ls.EVOLUTION_RESOLUTION,
            "truncation": ls.TRUNCATION,
            "loss_weight_phi0": ls.LOSS_WEIGHT_PHI0,
            "loss_eps": ls.LOSS_EPS,
            "return_tsdf": ls.RETURN_POLYGONS,
        }

    def tsdf_convs(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C_in, h, w) RoI features -> (R, CONV_DIM, h, w): the initial TSDF head's conv stack."""
        for conv in self.initial_tsdf_head.conv_norm_relus:
            x = conv(x)
        return x

    def initial_tsdf_logits(self, x: torch.Tensor, convs: torch.Tensor = None) -> torch.Tensor:
        """
        (R, C_in, h, w) RoI features -> (R, K, 2h, 2w) per-class phi_0 before its tanh: Detectron2's
        mask head layers. ``convs``: :meth:`tsdf_convs` of ``x`` if already computed (``x`` is then not read).
        """
        head = self.initial_tsdf_head
        convs = self.tsdf_convs(x) if convs is None else convs
        return head.predictor(head.deconv_relu(head.deconv(convs)))

    def initial_phi(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """
        phi_0 of each RoI's class: (R, K, 2h, 2w) :meth:`initial_tsdf_logits`, (R,) int64 classes ->
        (R, 1, S, S) in [-1, 1]: tanh, resized to T x T (T = 28) if the deconv gives another size,
        then bilinearly upsampled to S. The class is selected first, as Mask R-CNN does before its
        sigmoid: the tanh and the resampling then touch one map per RoI instead of K.
        """
        phi = torch.tanh(select_class(logits, classes))
        if phi.shape[-1] != self.tsdf_resolution:
            phi = F.interpolate(phi, size=self.tsdf_resolution, mode="bilinear", align_corners=False)
        return self.upsample(phi)

    def upsample(self, phi: torch.Tensor) -> torch.Tensor:
        """(R, 1, T, T) -> (R, 1, S, S), bilinear; phi already at S is returned as is."""
        if phi.shape[-1] == self.evolution_resolution:
            return phi
        return F.interpolate(phi, size=self.evolution_resolution, mode="bilinear", align_corners=False)

    def layers(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"initial_tsdf_logits": self.initial_tsdf_logits(x)}

    def evolve(self, phi0: torch.Tensor, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Final TSDF from phi_0 (R, 1, S, S). Without the Chan-Vese module phi_N = phi_0."""
        return phi0

    @staticmethod
    def _classes(instances: List[Instances], training: bool) -> torch.Tensor:
        field = "gt_classes" if training else "pred_classes"
        return cat([getattr(i, field) for i in instances], dim=0).to(torch.int64)

    def forward(self, x: torch.Tensor, instances: List[Instances], **inputs: torch.Tensor):
        """
        Args:
            x: (R, C_in, h, w) RoI features of the foreground proposals (training) or detections.
            inputs: what :class:`LevelSetROIHeads` pools beside ``x`` for heads that ask for it:
                ``image_crops`` (R, 3, S, S), the RoIs' crops of the normalised input image (heads
                with ``image_crop_resolution = S``); ``fine_features`` (R, C_in, P, P), the RoIs
                pooled again at P from a finer FPN level (heads with ``features_pooler_resolution = P``).
        Returns:
            dict of losses in training; else ``instances`` with ``pred_masks`` (and ``pred_tsdf``).
        """
        outputs = self.layers(x, **inputs)
        classes = self._classes(instances, self.training)
        phi0 = self.initial_phi(outputs["initial_tsdf_logits"], classes)
        phi_n = self.evolve(phi0, outputs)
        if self.training:
            return self.losses(outputs, phi0, phi_n, instances)
        levelset_inference(phi_n, instances, self.loss_eps, self.return_tsdf)
        return instances

    def loss_terms(self, phi0: torch.Tensor, phi_n: torch.Tensor) -> Dict[str, Tuple]:
        """Loss name -> (TSDF it supervises, weight)."""
        return {"loss_tsdf_initial": (phi0, self.loss_weight_phi0)}

    def losses(self, outputs, phi0, phi_n, instances) -> Dict[str, torch.Tensor]:
        """Weighted l_TSDF of each supervised TSDF against the targets of the positive RoIs."""
        terms = self.loss_terms(phi0, phi_n)
        gt_masks, gt_tsdf = tsdf_targets(instances, phi0.shape[-1], self.truncation)
        if gt_masks.shape[0] == 0:
            # No foreground RoI: a zero that still touches every head (DDP expects gradients).
            zero = sum(v.sum() for v in outputs.values()) * 0.0
            return {name: zero for name in terms}
        gt_masks, gt_tsdf = gt_masks.to(phi0.device), gt_tsdf.to(phi0.device)
        self._log_accuracy(phi_n, gt_masks)
        return {
            name: weight * tsdf_loss(phi, gt_tsdf, gt_masks, self.loss_eps)
            for name, (phi, weight) in terms.items()
        }

    def _log_accuracy(self, phi: torch.Tensor, gt_masks: torch.Tensor) -> None:
        with torch.no_grad():
            pred = phi[:, 0] > 0
            gt = gt_masks.to(pred.device)
            storage = get_event_storage()
            storage.put_scalar("levelset/accuracy", (pred == gt).float().mean().item())
            iou = (pred & gt).sum((1, 2)).float() / (pred | gt).sum((1, 2)).clamp_min(1).float()
            storage.put_scalar("levelset/mask_iou", iou.mean().item())


@ROI_MASK_HEAD_REGISTRY.register()
class LevelSetMaskHead(TSDFMaskRCNNHead):
    """
    LevelSet R-CNN's mask branch (section 4.1, Fig. 1): initial TSDF head, hyperparameter head and
    Chan-Vese features head, followed by N unrolled Chan-Vese steps (Eqs. 6-9). Trained with
    ``w_0 l_TSDF(phi_0) + w_N l_TSDF(phi_N)`` (section 4.2); pred_masks = H_eps(phi_N).
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_steps: int = 3,
        embed_channels: int = 64,
        hyperparam_mode: str = "adaptive",
        hyperparam_conv_dims: List[int] = (256, 256),
        hyperparam_fc_dim: int = 256,
        features_conv_dims: List[int] = (256,),
        features_input: str = "roi",
        loss_weight_phin: float = 1.0,
        detach_phi0: bool = False,
        inference_tsdf: str = "final",
        evolution_units: str = "pixels",
        hyperparam_init: List[float] = (1.0, 1.0, 0.5, 2.0, 4.0),
        hyperparam_floor: float = 0.1,
        grad_eps: float = 0.1,
        normalize_features: bool = False,
        standardize_features: bool = False,
        features_gain_floor: float = 0.25,
        features_pooler_resolution: int = 0,
        bound_phi: bool = True,
        image_features: str = "none",
        **kwargs,
    ):
        """
        Args:
            num_steps: N unrolled steps.
            embed_channels: C of the Chan-Vese feature embedding.
            hyperparam_mode: "adaptive" (per-RoI head) or "global" (one learned vector).
            hyperparam_conv_dims, hyperparam_fc_dim: hyperparameter head widths.
            features_conv_dims: conv widths of the Chan-Vese features head.
            features_input: what the features head reads: "roi" (the pooled RoI features, the
                paper's Fig. 1) or "tsdf_convs" (the initial TSDF head's conv stack output, shared:
                the features head's own convs, usually none, run on top of it).
            loss_weight_phin: weight of l_TSDF(phi_N).
            detach_phi0: stop the gradient of the phi_N loss at phi_0 (Table 4).
            inference_tsdf: "final" (phi_N) or "initial" (phi_0) becomes pred_masks.
            evolution_units: "pixels" (the steps evolve ``truncation * phi_0``, a TSDF in pixels
                of the S x S grid with slope ~1) or "normalized" (phi_0 in [-1, 1] as predicted).
            hyperparam_init: starting values of lambda1, lambda2, mu, eps, dt (eps in the
                evolution's units; every step starts alike).
            hyperparam_floor: each hyperparameter stays in [floor, 2 - floor] x its start.
            grad_eps: |grad phi| regularisation of the curvature, in the evolution's units per pixel.
            normalize_features: the Chan-Vese features have unit L2 norm per pixel.
            standardize_features, features_gain_floor: the Chan-Vese features are standardised per
                RoI and channel and scaled by a learned gain >= the floor (:func:`standardize_embedding`).
            features_pooler_resolution: P > 0: the Chan-Vese features head reads the RoIs pooled
                again at P x P from a finer FPN level (``fine_features``, passed by
                :class:`LevelSetROIHeads`) instead of ``x``; 0: it reads ``x``.
            bound_phi: clamp every iterate to phi_0's range (+-truncation in pixels, +-1 normalised),
                the range of the targets.
            image_features: "none" (the paper) or "raw": the RoI's image crop at S x S,
                standardised per RoI and channel, joins the embedding as 3 more Chan-Vese channels.
            kwargs: arguments of :class:`TSDFMaskRCNNHead`.
        """
        super().__init__(input_shape, **kwargs)
        # The keys' allowed values, checked once here (a head built from a config or from arguments).
        for key, value, allowed in (("HYPERPARAM_MODE", hyperparam_mode, ("adaptive", "global")),
                                    ("INFERENCE_TSDF", inference_tsdf, ("final", "initial")),
                                    ("EVOLUTION_UNITS", evolution_units, ("pixels", "normalized")),
                                    ("IMAGE_FEATURES", image_features, ("none", "raw")),
                                    ("FEATURES_INPUT", features_input, ("roi", "tsdf_convs"))):
            if value not in allowed:
                raise ValueError(f"MODEL.LEVELSET.{key} must be one of {allowed}, got {value!r}")
        if num_steps < 1:
            raise ValueError(f"MODEL.LEVELSET.EVOLUTION_STEPS must be >= 1 (unrolled Chan-Vese steps), got {num_steps}")
        num_outputs = 2 * num_steps + 3
        if not 0.0 <= hyperparam_floor < 1.0:
            raise ValueError(f"MODEL.LEVELSET.HYPERPARAM_FLOOR must be in [0, 1), got {hyperparam_floor}")
        starts = hyperparameter_starts(list(hyperparam_init), num_steps)
        if hyperparam_mode == "adaptive":
            self.hyperparameter_head = HyperparameterHead(
                input_shape.channels, list(hyperparam_conv_dims), hyperparam_fc_dim, num_outputs,
                kwargs.get("conv_norm", ""), start=starts, floor=hyperparam_floor,
            )
        else:
            self.hyperparameter_head = GlobalHyperparameters(num_outputs, start=starts, floor=hyperparam_floor)
        if normalize_features and standardize_features:
            raise ValueError("MODEL.LEVELSET.NORMALIZE_FEATURES and STANDARDIZE_FEATURES are two ways to scale "
                             "the Chan-Vese features: set at most one")
        if standardize_features and not 0.0 < features_gain_floor <= 1.0:
            raise ValueError(f"MODEL.LEVELSET.FEATURES_GAIN_FLOOR must be in (0, 1], got {features_gain_floor}")
        if features_pooler_resolution < 0 or (features_pooler_resolution and features_input != "roi"):
            raise ValueError("MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION must be 0 or a positive size read with "
                             f"FEATURES_INPUT 'roi', got {features_pooler_resolution} with {features_input!r}")
        self.features_input = features_input
        self.features_pooler_resolution = features_pooler_resolution
        features_in = input_shape.channels if features_input == "roi" else self.initial_tsdf_head.deconv.in_channels
        self.chan_vese_features = ChanVeseFeaturesHead(
            features_in, list(features_conv_dims), embed_channels,
            self.evolution_resolution, kwargs.get("conv_norm", ""), upsample=False,
            gain_floor=features_gain_floor if standardize_features else None,
        )
        self.num_steps = num_steps
        self.loss_weight_phin = loss_weight_phin
        self.detach_phi0 = detach_phi0
        self.inference_tsdf = inference_tsdf
        # phi_0 (in [-1, 1]) times this is what the steps evolve.
        self.evolution_scale = self.truncation if evolution_units == "pixels" else 1.0
        self.grad_eps = grad_eps
        self.normalize_features = normalize_features
        self.bound_phi = bound_phi
        self.image_crop_resolution = self.evolution_resolution if image_features == "raw" else 0

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ls = cfg.MODEL.LEVELSET
        if ls.IMAGE_FEATURES != "none" and not _passes_image_crops(cfg.MODEL.ROI_HEADS.NAME):
            raise ValueError(f"MODEL.LEVELSET.IMAGE_FEATURES {ls.IMAGE_FEATURES!r} needs MODEL.ROI_HEADS.NAME: "
                             f"LevelSetROIHeads (which passes the image crops), got {cfg.MODEL.ROI_HEADS.NAME!r}")
        if ls.FEATURES_POOLER_RESOLUTION and not _passes_image_crops(cfg.MODEL.ROI_HEADS.NAME):
            raise ValueError(f"MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION {ls.FEATURES_POOLER_RESOLUTION} needs "
                             "MODEL.ROI_HEADS.NAME: LevelSetROIHeads (which pools the finer features), got "
                             f"{cfg.MODEL.ROI_HEADS.NAME!r}")
        conv_dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        ret.update(
            num_steps=ls.EVOLUTION_STEPS,
            embed_channels=ls.EMBED_CHANNELS,
            hyperparam_mode=ls.HYPERPARAM_MODE,
            hyperparam_conv_dims=[ls.HYPERPARAM_CONV_DIM or conv_dim] * ls.HYPERPARAM_NUM_CONV,
            hyperparam_fc_dim=ls.HYPERPARAM_FC_DIM,
            features_conv_dims=[ls.FEATURES_CONV_DIM or conv_dim] * ls.FEATURES_NUM_CONV,
            features_input=ls.FEATURES_INPUT,
            loss_weight_phin=ls.LOSS_WEIGHT_PHIN,
            detach_phi0=ls.DETACH_PHI0,
            inference_tsdf=ls.INFERENCE_TSDF,
            evolution_units=ls.EVOLUTION_UNITS,
            hyperparam_init=list(ls.HYPERPARAM_INIT),
            hyperparam_floor=ls.HYPERPARAM_FLOOR,
            grad_eps=ls.GRAD_EPS,
            normalize_features=ls.NORMALIZE_FEATURES,
            standardize_features=ls.STANDARDIZE_FEATURES,
            features_gain_floor=ls.FEATURES_GAIN_FLOOR,
            features_pooler_resolution=ls.FEATURES_POOLER_RESOLUTION,
            bound_phi=ls.BOUND_PHI,
            image_features=ls.IMAGE_FEATURES,
        )
        return ret

    def layers(self, x: torch.Tensor, image_crops: torch.Tensor = None,
               fine_features: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (R, C_in, h, w) pooled RoI features.
            image_crops: (R, 3, S, S) RoI crops of the normalised input, with IMAGE_FEATURES "raw" (ignored otherwise).
            fine_features: (R, C_in, P, P) the RoIs pooled at P = ``features_pooler_resolution``
                from a finer FPN level, read by the Chan-Vese features head when P > 0 (ignored otherwise).
        Returns:
            initial_tsdf_logits: (R, K, 2h, 2w) per-class phi_0 before its tanh (:meth:`initial_phi`),
            hyperparameters: (R, 2N + 3) = lambda1, lambda2, mu, eps_1..N, dt_1..N, all positive,
                eps in the evolution's units (pixels of the S x S grid by default),
            chan_vese_features: (R, C, 2h, 2w) (2P x 2P from fine features), standing for its bilinear upsampling to S x S
                (``levelset.chan_vese`` evolves on that upsampling exactly, without building it);
                unit L2 norm per pixel with ``normalize_features``;
            image_features (with image crops): (R, 3, S, S) standardised crops, further Chan-Vese
                channels on the full S x S grid.
        """
        S = self.image_crop_resolution
        if S and (image_crops is None or image_crops.shape[1:] != (3, S, S)):
            got = None if image_crops is None else tuple(image_crops.shape)
            raise ValueError(f"MODEL.LEVELSET.IMAGE_FEATURES 'raw' needs (R, 3, {S}, {S}) image crops, got {got} "
                             "(MODEL.ROI_HEADS.NAME: LevelSetROIHeads passes them)")
        P = self.features_pooler_resolution
        if P and (fine_features is None or fine_features.shape[1:] != (x.shape[1], P, P)):
            got = None if fine_features is None else tuple(fine_features.shape)
            raise ValueError(f"MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION {P} needs (R, {x.shape[1]}, {P}, {P}) "
                             f"fine features, got {got} (MODEL.ROI_HEADS.NAME: LevelSetROIHeads pools them)")
        convs = self.tsdf_convs(x)
        source = fine_features if P else (convs if self.features_input == "tsdf_convs" else x)
        features = self.chan_vese_features(source)
        if self.normalize_features:
            features = F.normalize(features, dim=1, eps=1e-6)
        outputs = {
            "initial_tsdf_logits": self.initial_tsdf_logits(x, convs),
            "hyperparameters": self.hyperparameter_head(x),
            "chan_vese_features": features,
        }
        if self.image_crop_resolution:
            outputs["image_features"] = standardize_crops(image_crops.float())
        return outputs

    def evolve(self, phi0: torch.Tensor, outputs: Dict[str, torch.Tensor], return_all: bool = False):
        """
        phi_N after N Chan-Vese steps (Eq. 7) from phi_0 (R, 1, S, S), both in [-1, 1] units; the
        steps run on ``evolution_scale * phi_0``. With ``return_all`` the list phi_0..phi_N.
        """
        if (not self.training and self.inference_tsdf == "initial") or phi0.shape[0] == 0:
            return [phi0] * (self.num_steps + 1) if return_all else phi0
        scale = self.evolution_scale
        features = outputs["chan_vese_features"]
        if "image_features" in outputs:  # coarse embedding + full-resolution image, one data term
            features = [features, outputs["image_features"]]
        phis = levelset.chan_vese(
            (phi0.detach() if self.detach_phi0 else phi0) * scale,
            features,
            steps=self.num_steps,
            grad_eps=self.grad_eps,
            phi_bound=scale if self.bound_phi else None,
            return_all=return_all,
            **split_hyperparameters(outputs["hyperparameters"], self.num_steps),
        )
        return [p / scale for p in phis] if return_all else phis / scale

    def loss_terms(self, phi0: torch.Tensor, phi_n: torch.Tensor) -> Dict[str, Tuple]:
        terms = super().loss_terms(phi0, phi_n)
        terms["loss_tsdf_final"] = (phi_n, self.loss_weight_phin)
        return terms


def _passes_image_crops(roi_heads_name: str) -> bool:
    return issubclass(ROI_HEADS_REGISTRY.get(roi_heads_name), LevelSetROIHeads)


@ROI_MASK_HEAD_REGISTRY.register()
class HighResMaskRCNNHead(MaskRCNNConvUpsampleHead):
    """
    Ablation "112x112 Mask R-CNN" (section 5): Mask R-CNN's head and BCE loss with logits at
    ``MASK_RCNN_RESOLUTION``, reached by extra 2x deconvs that halve the width each time.
    Detectron2's ``mask_rcnn_loss`` crops the targets at the logits' resolution.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes, conv_dims, conv_norm="",
                 output_resolution: int = 112, **kwargs):
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims,
                         conv_norm=conv_norm, **kwargs)
        pooler_side = input_shape.height or 14
        predictor = self.predictor
        del self.predictor  # re-added last: nn.Sequential runs children in registration order
        channels, side, k = conv_dims[-1], 2 * pooler_side, 0
        while side < output_resolution:
            k += 1
            deconv = ConvTranspose2d(channels, max(channels // 2, 1), kernel_size=2, stride=2)
            weight_init.c2_msra_fill(deconv)
            self.add_module(f"upsample_deconv{k}", deconv)
            self.add_module(f"upsample_relu{k}", nn.ReLU())
            channels, side = max(channels // 2, 1), side * 2
        if side != output_resolution:
            raise ValueError(f"{output_resolution} is not 2^k x the 2x{pooler_side} mask side")
        self.predictor = Conv2d(channels, predictor.out_channels, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["output_resolution"] = cfg.MODEL.LEVELSET.MASK_RCNN_RESOLUTION
        return ret
