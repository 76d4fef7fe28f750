"""Training losses of level sets, pure PyTorch: DELSE's (Wang et al., CVPR 2019, eq. 10-16) and the
BCE of LevelSet R-CNN's l_TSDF (section 4.2), both on the smooth Heaviside H_eps(phi).

Used by the DELSE meta-architecture and by LevelSet R-CNN's heads (its DELSE mask head is the
Table 3 baseline). Level sets are ``(N, 1, S, S)``, positive inside; masks ``(N, S, S)`` bool.
"""
import torch
import torch.nn.functional as F

from .functional import heaviside

__all__ = ["level_set_loss", "heaviside_log_probs", "heaviside_bce", "class_balanced_bce", "evolution_loss",
           "pixel_wise_loss", "direction_loss"]

# Probabilities are clamped to [MIN_PROB, 1] inside the logs of the BCEs.
MIN_PROB = 1e-6


def level_set_loss(phi0, gt_tsdf):
    """L_0 of eq. 11: mean squared error between phi0 and the GT TSDF, both (N, 1, S, S) pixels."""
    return F.mse_loss(phi0, gt_tsdf)


def heaviside_log_probs(phi, eps):
    """``(log H_eps(phi), log(1 - H_eps(phi)))`` in float32, each clamped at ``log(MIN_PROB)``.

    ``1 - H_eps(z) = H_eps(-z)`` exactly, so both are taken of a probability computed without
    cancellation.
    """
    phi = phi.float()
    return heaviside(phi, eps).clamp_min(MIN_PROB).log(), heaviside(-phi, eps).clamp_min(MIN_PROB).log()


def heaviside_bce(phi, gt_mask, eps):
    """Mean BCE(H_eps(phi), M) over pixels and samples (LevelSet R-CNN's l_TSDF, section 4.2).

    Args:
        phi: (N, 1, S, S) level set; gt_mask: (N, S, S) bool; eps: float.
    """
    log_p, log_not_p = heaviside_log_probs(phi, eps)
    m = gt_mask[:, None].float()
    return -(m * log_p + (1 - m) * log_not_p).mean()


def class_balanced_bce(log_fg, log_bg, gt_mask):
    """DEXTR's class-balanced BCE: foreground pixels weighted by the fraction of background
    pixels of their sample and vice versa, so the rare class is not drowned.

    Args:
        log_fg, log_bg: (N, 1, S, S) log-probabilities of foreground / background;
        gt_mask: (N, S, S) bool.
    Returns:
        scalar, mean over pixels and samples.
    """
    target = gt_mask[:, None].float()
    pos = target.flatten(1).mean(1).view(-1, 1, 1, 1)
    wp, wn = 1.0 - pos, pos
    return -(wp * target * log_fg + wn * (1 - target) * log_bg).mean()


def evolution_loss(phi, gt_mask, eps):
    """L_T of eq. 15: class-balanced BCE of the smooth Heaviside H_eps(phi_T) (eq. 14).

    Args:
        phi: (N, 1, S, S) level set; gt_mask: (N, S, S) bool; eps: float.
    Returns:
        scalar, mean over pixels and samples.
    """
    return class_balanced_bce(*heaviside_log_probs(phi, eps), gt_mask)


def pixel_wise_loss(logits, gt_mask):
    """The pixel-wise baseline's loss (DEXTR): class-balanced BCE of sigmoid(logits).

    Args:
        logits: (N, 1, S, S); gt_mask: (N, S, S) bool.
    """
    logits = logits.float()
    return class_balanced_bce(F.logsigmoid(logits), F.logsigmoid(-logits), gt_mask)


def direction_loss(motion, gt_direction):
    """L_direct of eq. 16: mean squared angle (radians) between V and the GT direction.

    Pixels where the GT direction is undefined (zero vector) are ignored; the cosine is clamped
    away from +-1, where the derivative of acos is infinite.

    Args:
        motion: (N, 2, S, S); gt_direction: (N, 2, S, S) unit or zero vectors.
    """
    valid = gt_direction.norm(dim=1) > 0.5
    cos = F.cosine_similarity(motion.float(), gt_direction, dim=1, eps=1e-6)
    angle = torch.acos(cos.clamp(-1 + 1e-4, 1 - 1e-4))
    return (angle[valid] ** 2).sum() / valid.sum().clamp_min(1)
