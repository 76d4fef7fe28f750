"""DELSE as a Mask R-CNN mask head: the "DELSE" baseline of LevelSet R-CNN's Table 3.

Per RoI: an initial TSDF head, a motion (velocity) head and a modulation head, optionally a
hyperparameter head, then ``levelset.delse_evolve`` (eq. 9). The TSDF head, the targets and the
loss are LevelSet R-CNN's, so the two heads differ only in the evolution; DELSE's losses come from
the core (``levelset.losses``), as the DELSE project's do. Keys: ``MODEL.LEVELSET.DELSE_HEAD``.
"""
from typing import Dict, List

import torch

import levelset
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from detectron2.structures import Instances
from levelset.losses import direction_loss, evolution_loss, level_set_loss

from .mask_head import (
    ChanVeseFeaturesHead,
    HyperparameterHead,
    TSDFMaskRCNNHead,
    levelset_inference,
    tsdf_loss,
    tsdf_targets,
)

__all__ = ["DELSEMaskHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class DELSEMaskHead(TSDFMaskRCNNHead):
    """phi_0 (LevelSet R-CNN's TSDF head, in [-1, 1]) evolved by DELSE's eq. 9 in pixels of the
    S x S evolution grid (phi = TRUNCATION * TSDF), with a predicted motion field and modulation.
    Trained with DELSE's losses or LevelSet R-CNN's (``MODEL.LEVELSET.DELSE_HEAD.LOSS``).

    At inference ``pred_masks = H_eps(phi_T)`` with LevelSet R-CNN's ``LOSS_EPS``, cut at 0.5 by
    Detectron2's paste, i.e. at the zero level of phi_T."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        dense_conv_dims: List[int] = (256, 256),
        hyperparameter_head: bool = False,
        hyperparam_conv_dims: List[int] = (256, 256),
        hyperparam_fc_dim: int = 256,
        steps: int = 5,
        dt: float = 1.0,
        curvature_weight: float = 1.0,
        dist_reg_weight: float = 0.04,
        evolution_eps=None,
        clamp_to_truncation: bool = False,
        loss: str = "delse",
        loss_weight_phin: float = 1.0,
        evolution_loss_weight: float = 100.0,
        direction_loss_weight: float = 1.0,
        heaviside_eps: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            dense_conv_dims: conv widths of the motion and modulation heads (convs, 2x deconv,
                1x1 projection, upsampling to S: LevelSet R-CNN's dense-map head).
            hyperparameter_head: predict lambda, mu, dt_1..T per RoI as ``2 sigmoid(.)`` times
                the constants below (so they start at the constants).
            steps, dt, curvature_weight, dist_reg_weight, evolution_eps: of ``delse_evolve``;
            clamp_to_truncation: clamp phi to the TSDF range after every step (``phi_bound``).
            loss: "delse" (DELSE's eq. 10 losses, weights 1 / alpha / beta) or "levelset_rcnn"
                (l_TSDF on phi_0 and phi_T, weights loss_weight_phi0 / loss_weight_phin, + beta
                L_direct), the two settings of LevelSet R-CNN's Table 3.
            loss_weight_phin: weight of l_TSDF(phi_T); evolution_loss_weight: alpha of L_T;
            direction_loss_weight: beta of L_direct; heaviside_eps: eps of H in L_T (pixels).
            kwargs: arguments of :class:`levelset_rcnn.mask_head.TSDFMaskRCNNHead`.
        """
        super().__init__(input_shape, **kwargs)
        norm = kwargs.get("conv_norm", "")
        S = self.evolution_resolution
        width = dense_conv_dims[-1] if len(dense_conv_dims) else input_shape.channels
        self.motion_head = ChanVeseFeaturesHead(input_shape.channels, list(dense_conv_dims), 2, S, norm,
                                                deconv_channels=width)
        self.modulation_head = ChanVeseFeaturesHead(input_shape.channels, list(dense_conv_dims), 1, S, norm,
                                                    deconv_channels=width)
        self.hyperparameter_head = (
            HyperparameterHead(input_shape.channels, list(hyperparam_conv_dims), hyperparam_fc_dim,
                               steps + 2, norm)
            if hyperparameter_head else None
        )
        self.steps = steps
        self.dt = dt
        self.curvature_weight = curvature_weight
        self.dist_reg_weight = dist_reg_weight
        self.evolution_eps = evolution_eps
        self.clamp_to_truncation = clamp_to_truncation
        if loss not in ("delse", "levelset_rcnn"):
            raise ValueError(f"MODEL.LEVELSET.DELSE_HEAD.LOSS must be 'delse' or 'levelset_rcnn', got {loss!r}")
        self.loss = loss
        self.loss_weight_phin = loss_weight_phin
        self.evolution_loss_weight = evolution_loss_weight
        self.heaviside_eps = heaviside_eps
        self.direction_loss_weight = direction_loss_weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ls = cfg.MODEL.LEVELSET
        d = ls.DELSE_HEAD
        conv_dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        ret.update(
            dense_conv_dims=[conv_dim] * ls.FEATURES_NUM_CONV,
            hyperparameter_head=d.HYPERPARAMETER_HEAD,
            hyperparam_conv_dims=[ls.HYPERPARAM_CONV_DIM or conv_dim] * ls.HYPERPARAM_NUM_CONV,
            hyperparam_fc_dim=ls.HYPERPARAM_FC_DIM,
            steps=d.EVOLUTION_STEPS,
            dt=d.DT,
            curvature_weight=d.CURVATURE_WEIGHT,
            dist_reg_weight=d.DIST_REG_WEIGHT,
            evolution_eps=d.EPS,
            clamp_to_truncation=d.CLAMP_TO_TRUNCATION,
            loss=d.LOSS,
            loss_weight_phin=ls.LOSS_WEIGHT_PHIN,
            evolution_loss_weight=d.EVOLUTION_LOSS_WEIGHT,
            direction_loss_weight=d.DIRECTION_LOSS_WEIGHT,
            heaviside_eps=d.HEAVISIDE_EPS,
        )
        return ret

    def layers(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Returns:
            initial_tsdf_logits: (R, K, T, T) per-class phi_0 before its tanh; motion_field: (R, 2, S, S);
            modulation: (R, 1, S, S) in [0, 1]; hyperparameters: (R, T + 2) when predicted.
        """
        out = {
            "initial_tsdf_logits": self.initial_tsdf_logits(x),
            "motion_field": self.motion_head(x),
            "modulation": torch.sigmoid(self.modulation_head(x)),
        }
        if self.hyperparameter_head is not None:
            out["hyperparameters"] = self.hyperparameter_head(x)
        return out

    def evolve(self, phi0: torch.Tensor, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """phi_T (R, 1, S, S) in [-1, 1] units after T DELSE steps from phi_0 (R, 1, S, S)."""
        if phi0.shape[0] == 0:
            return phi0
        lam, mu, dt = self.curvature_weight, self.dist_reg_weight, self.dt
        if "hyperparameters" in outputs:
            h = outputs["hyperparameters"]
            lam, mu, dt = lam * h[:, 0], mu * h[:, 1], dt * h[:, 2:]
        phi = levelset.delse_evolve(
            phi0 * self.truncation, outputs["motion_field"], outputs["modulation"],
            curvature_weight=lam, dist_reg_weight=mu, eps=self.evolution_eps, dt=dt, steps=self.steps,
            phi_bound=self.truncation if self.clamp_to_truncation else None,
        )
        return phi / self.truncation

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """As :meth:`TSDFMaskRCNNHead.forward`; the loss also needs the motion field."""
        outputs = self.layers(x)
        classes = self._classes(instances, self.training)
        phi0 = self.initial_phi(outputs["initial_tsdf_logits"], classes)
        phi_n = self.evolve(phi0, outputs)
        if self.training:
            return self.delse_losses(outputs, phi0, phi_n, instances)
        levelset_inference(phi_n, instances, self.loss_eps, self.return_tsdf)
        return instances

    def loss_names(self) -> List[str]:
        """The keys of the loss dict of the selected setting (see ``loss``)."""
        names = ["loss_level_set", "loss_evolution"] if self.loss == "delse" else ["loss_tsdf_initial", "loss_tsdf_final"]
        return names + (["loss_direction"] if self.direction_loss_weight > 0 else [])

    def delse_losses(self, outputs, phi0, phi_n, instances) -> Dict[str, torch.Tensor]:
        """Losses of the selected setting (see ``loss``); outputs: of :meth:`layers`; phi_0, phi_T
        (R, 1, S, S) in [-1, 1] units."""
        gt_masks, gt_tsdf = tsdf_targets(instances, phi0.shape[-1], self.truncation)
        if gt_masks.shape[0] == 0:
            # No foreground RoI: the same keys, zeros that still touch every head (DDP expects
            # gradients for every parameter), as LevelSetMaskHead.
            zero = sum(v.sum() for v in outputs.values()) * 0.0
            return {name: zero for name in self.loss_names()}
        motion = outputs["motion_field"]
        gt_masks, gt_tsdf = gt_masks.to(phi0.device), gt_tsdf.to(phi0.device)
        self._log_accuracy(phi_n, gt_masks)
        if self.loss == "delse":
            D = self.truncation
            losses = {
                "loss_level_set": level_set_loss(phi0 * D, gt_tsdf[:, None] * D),
                "loss_evolution": self.evolution_loss_weight
                * evolution_loss(phi_n * D, gt_masks, self.heaviside_eps),
            }
        else:
            losses = {
                "loss_tsdf_initial": self.loss_weight_phi0 * tsdf_loss(phi0, gt_tsdf, gt_masks, self.loss_eps),
                "loss_tsdf_final": self.loss_weight_phin * tsdf_loss(phi_n, gt_tsdf, gt_masks, self.loss_eps),
            }
        if self.direction_loss_weight > 0:
            losses["loss_direction"] = self.direction_loss_weight * direction_loss(
                motion, levelset.direction_field(gt_masks))
        return losses
