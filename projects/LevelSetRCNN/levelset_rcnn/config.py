"""Config keys of LevelSet R-CNN (ECCV 2020, section 4), all under ``cfg.MODEL.LEVELSET``."""
from detectron2.config import CfgNode as CN


def add_levelset_rcnn_config(cfg):
    """
    Declare every key LevelSet R-CNN reads, with the paper's defaults (COCO setting, section 5).
    """
    cfg.MODEL.LEVELSET = CN()
    # N: unrolled Chan-Vese steps (Eq. 7); the paper unrolls 3.
    cfg.MODEL.LEVELSET.NUM_STEPS = 3
    # C: channels of the Chan-Vese feature embedding F(r_m) that replaces image intensities in Eq. 6.
    cfg.MODEL.LEVELSET.EMBED_CHANNELS = 64
    # H = W of F(r_m), of the upsampled phi_0 and of phi_N (112 in the paper).
    cfg.MODEL.LEVELSET.EVOLUTION_RESOLUTION = 112
    # Side of the initial TSDF head's own output before upsampling (28 like Mask R-CNN's masks).
    cfg.MODEL.LEVELSET.TSDF_RESOLUTION = 28
    # TSDF truncation in pixels at EVOLUTION_RESOLUTION; distances are clamped to +-TRUNCATION and
    # divided by it. 10 px at 112 = 2.5 px of the 28x28 head: phi_0 is a learnable ramp a few head
    # pixels wide, and the delta_eps-weighted updates of phi_N act in a band ~9% of the box wide.
    cfg.MODEL.LEVELSET.TRUNCATION = 10.0
    # Weights of l_TSDF on phi_0 and phi_N (COCO 0.2 / 1, Cityscapes 1 / 5).
    cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHI0 = 0.2
    cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHIN = 1.0
    # eps of the soft Heaviside that maps a TSDF to [0, 1] for the BCE term and for pred_masks.
    cfg.MODEL.LEVELSET.LOSS_EPS = 0.1
    # "adaptive": per-RoI hyperparameter head; "global": one learned vector for the dataset (ablation).
    cfg.MODEL.LEVELSET.HYPERPARAM_MODE = "adaptive"
    # Convs (ROI_MASK_HEAD.CONV_DIM wide, the first with stride 2) before the hyperparameter
    # head's average pool.
    cfg.MODEL.LEVELSET.HYPERPARAM_NUM_CONV = 2
    # Width of the first of the two FC layers of the hyperparameter head.
    cfg.MODEL.LEVELSET.HYPERPARAM_FC_DIM = 256
    # Convs (ROI_MASK_HEAD.CONV_DIM wide) of the Chan-Vese features head before its upsampling
    # (the paper leaves the depth to its supplement; one keeps the branch ~1.5x Mask R-CNN's cost).
    cfg.MODEL.LEVELSET.FEATURES_NUM_CONV = 1
    # Units the Chan-Vese steps run in. "pixels": they evolve TRUNCATION * phi_0, a TSDF in pixels
    # of the EVOLUTION_RESOLUTION grid (slope ~1 per pixel), so eps, dt and GRAD_EPS below are in
    # pixels. "normalized": phi_0 in [-1, 1] as predicted (slope ~1/TRUNCATION per pixel), the
    # behaviour before this key existed; with eps = 1 there, delta_eps covers the whole RoI
    # almost uniformly and one step at dt = 1 moves the zero level ~10 px.
    cfg.MODEL.LEVELSET.EVOLUTION_UNITS = "pixels"
    # Starting values of [lambda1, lambda2, mu, eps_n, dt_n] (all N steps start alike). Each is
    # init * (FLOOR + 2 (1 - FLOOR) sigmoid(a)) of a head output a that starts at 0.
    # eps = 2 px: delta_eps acts in a band a few pixels wide around the zero level. dt = 4: a data
    # term of ~2 (two well-separated unit features) moves the zero level by dt * 2 / (pi * eps)
    # ~ 1.3 px per step; raw features (NORMALIZE_FEATURES off) can scale that up as they learn.
    # mu = 0.5: the curvature term's explicit step dt * mu / (pi eps) ~ 0.3 stays below the ~0.5
    # stability limit of the Sobel stencil. Learned on DSB2018: dt 1.6-1.9, eps 3.6 px.
    # The normalized behaviour before this key existed: [1, 1, 1, 1, 1] with FLOOR 0.
    cfg.MODEL.LEVELSET.HYPERPARAM_INIT = [1.0, 1.0, 0.5, 2.0, 4.0]
    # Lower bound of every hyperparameter as a fraction of its start (upper bound: 2 - FLOOR). With
    # 0, i.e. 2 * sigmoid, a step size near zero gets a gradient proportional to itself and stays
    # there (the learned dt collapsed to 0.01-0.02 on DSB2018, BENCHMARKS.md section 2).
    cfg.MODEL.LEVELSET.HYPERPARAM_FLOOR = 0.1
    # Added in quadrature to |grad phi| in the curvature, in the evolution's units per pixel: 10% of
    # a pixel-unit TSDF's slope. The curvature's derivative grows like 1 / GRAD_EPS on phi_0's flat
    # plateaus (beyond the truncation, and everywhere at initialisation); 1e-3 there gave ~100x the
    # in-band gradient. (1e-3 is the normalized behaviour before this key existed.)
    cfg.MODEL.LEVELSET.GRAD_EPS = 0.1
    # Unit L2 norm per pixel for the Chan-Vese features, so |F - c|^2 <= 4 and mu is on the data
    # term's scale. Off: on the diagnostic (tools/diagnose_chan_vese.py, BENCHMARKS.md section 2b)
    # unit features pinned lambda1, lambda2 and dt at their bounds (the capped data term is too weak
    # for the steps the fit asks for); unnormalised features scale the data term freely.
    cfg.MODEL.LEVELSET.NORMALIZE_FEATURES = False
    # Clamp every Chan-Vese iterate to phi_0's range (+-TRUNCATION px), the range of the targets:
    # unbounded, the steepening a step causes away from the zero level is punished by the L1 term
    # even when the mask improves.
    cfg.MODEL.LEVELSET.BOUND_PHI = True
    # Stop the phi_N loss gradient at phi_0 (Table 4 ablation "Detach phi_0").
    cfg.MODEL.LEVELSET.DETACH_PHI0 = False
    # One class-agnostic phi_0 instead of one per class (like ROI_MASK_HEAD.CLS_AGNOSTIC_MASK).
    cfg.MODEL.LEVELSET.CLS_AGNOSTIC = False
    # Which TSDF becomes pred_masks at inference: "final" (phi_N) or "initial" (phi_0; Tables 2, 4).
    cfg.MODEL.LEVELSET.INFERENCE_TSDF = "final"
    # Also output the TSDF (pred_tsdf) so that sub-pixel zero-level polygons can be extracted
    # (marching squares; `postprocessing.add_polygons`) and exported by the COCO evaluator.
    cfg.MODEL.LEVELSET.RETURN_POLYGONS = False
    # Side of the logits of the high-resolution Mask R-CNN head (ablation "112x112 Mask R-CNN").
    cfg.MODEL.LEVELSET.MASK_RCNN_RESOLUTION = 112

    # Raise on a bad sample (unreadable image, unusable annotation) instead of skipping it with a warning.
    cfg.DATALOADER.STRICT = False

    # Add the boundary metrics (AF1, AF2, Boundary AP) beside COCO AP when evaluating.
    cfg.TEST.BOUNDARY_EVAL = True


def get_cfg():
    """
    Detectron2's default config with every key of this repository: LevelSet R-CNN's, its
    backbones' and, where the DELSE project is installed, DELSE's. One helper for train_net.py, demo.py and
    DefaultPredictor users, so that any saved config.yaml merges back.
    """
    from detectron2.config import get_cfg as get_detectron2_cfg

    from .backbone import add_wrn_config

    cfg = get_detectron2_cfg()
    add_levelset_rcnn_config(cfg)
    add_wrn_config(cfg)  # MODEL.WRN: the WideResNet-38 backbone of the Table 1 configs
    try:
        from delse.config import add_delse_config
    except ImportError:
        pass
    else:
        add_delse_config(cfg)
    return cfg


def check_registered_names(cfg):
    """Raise a ValueError naming the config key when a component name is not registered.

    Detectron2's registries fail with a bare ``KeyError`` deep in ``build_model``; this says which
    key to change and lists the names that would work (import ``levelset_rcnn`` / ``delse`` first
    so that their heads are registered).
    """
    from detectron2.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        ROI_HEADS_REGISTRY,
        ROI_MASK_HEAD_REGISTRY,
    )

    checks = [("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, META_ARCH_REGISTRY),
              ("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME, BACKBONE_REGISTRY)]
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        checks.append(("MODEL.ROI_HEADS.NAME", cfg.MODEL.ROI_HEADS.NAME, ROI_HEADS_REGISTRY))
        if cfg.MODEL.MASK_ON:
            checks.append(("MODEL.ROI_MASK_HEAD.NAME", cfg.MODEL.ROI_MASK_HEAD.NAME, ROI_MASK_HEAD_REGISTRY))
    for key, name, registry in checks:
        registered = sorted(n for n, _ in registry)
        if name not in registered:
            raise ValueError(f"{key} = {name!r} is not registered; change {key} to one of: {', '.join(registered)}")
