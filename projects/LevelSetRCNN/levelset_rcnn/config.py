"""Config keys of LevelSet R-CNN (ECCV 2020, section 4), under ``cfg.MODEL.LEVELSET`` (and its
backbone's ``cfg.MODEL.WRN``). Registered with the shared :func:`levelset_d2.get_cfg`."""
from detectron2.config import CfgNode as CN
from levelset_d2.config import register_renamed_key

# The number of evolution steps is EVOLUTION_STEPS everywhere (MODEL.DELSE too); configs saved
# with the old names are read with a warning.
register_renamed_key("MODEL.LEVELSET.NUM_STEPS", "MODEL.LEVELSET.EVOLUTION_STEPS")
register_renamed_key("MODEL.LEVELSET.DELSE_HEAD.STEPS", "MODEL.LEVELSET.DELSE_HEAD.EVOLUTION_STEPS")


def add_levelset_rcnn_config(cfg):
    """
    Declare every key LevelSet R-CNN reads, with the paper's defaults (COCO setting, section 5),
    and its WideResNet backbone's (``MODEL.WRN``). Idempotent: a second call changes nothing.
    """
    if "LEVELSET" in cfg.MODEL:
        return cfg
    cfg.MODEL.LEVELSET = CN()
    # N: unrolled Chan-Vese steps (Eq. 7); the paper unrolls 3.
    cfg.MODEL.LEVELSET.EVOLUTION_STEPS = 3
    # C: channels of the Chan-Vese feature embedding F(r_m) that replaces image intensities in Eq. 6.
    cfg.MODEL.LEVELSET.EMBED_CHANNELS = 64
    # H = W of F(r_m), of the upsampled phi_0 and of phi_N (112 in the paper).
    cfg.MODEL.LEVELSET.EVOLUTION_RESOLUTION = 112
    # Side of the initial TSDF head's own output before upsampling (28 like Mask R-CNN's masks).
    cfg.MODEL.LEVELSET.TSDF_RESOLUTION = 28
    # TSDF truncation in pixels at EVOLUTION_RESOLUTION; distances are clamped to +-TRUNCATION and
    # divided by it. 10 px at 112 = 2.5 px of the 28x28 head: phi_0 is a learnable ramp a few head
    # pixels wide.
    cfg.MODEL.LEVELSET.TRUNCATION = 10.0
    # Weights of l_TSDF on phi_0 and phi_N (COCO 0.2 / 1, Cityscapes 1 / 5).
    # From ImageNet R-50 on coco128-seg, halving both (0.1 / 0.5) brought the mask losses' pull on the
    # backbone to Mask R-CNN's level but did not recover LevelSet R-CNN's box AP (one seed, BENCHMARKS.md).
    cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHI0 = 0.2
    cfg.MODEL.LEVELSET.LOSS_WEIGHT_PHIN = 1.0
    # eps of the soft Heaviside that maps a TSDF to [0, 1] for the BCE term and for pred_masks.
    cfg.MODEL.LEVELSET.LOSS_EPS = 0.1
    # "adaptive": per-RoI hyperparameter head; "global": one learned vector for the dataset (ablation).
    cfg.MODEL.LEVELSET.HYPERPARAM_MODE = "adaptive"
    # Convs (ROI_MASK_HEAD.CONV_DIM wide, the first with stride 2) before the hyperparameter
    # head's average pool; 0: the pool reads the RoI features themselves (saves ~0.07 ms of the
    # head's ~5.6 ms per RoI on 2 CPU threads, BENCHMARKS.md section 5: two convs, as in the paper).
    cfg.MODEL.LEVELSET.HYPERPARAM_NUM_CONV = 2
    # Width of those convs; 0: ROI_MASK_HEAD.CONV_DIM (256). The paper gives no width ("a series
    # of convolutions followed by average pooling"); the head outputs 2N + 3 numbers per RoI. 64 cuts the
    # mask branch from ~1.39x to ~1.33x Mask R-CNN's per RoI on 2 CPU threads, but on COCO-MVal's
    # ground-truth boxes its steps added less (two seeds): not the default (BENCHMARKS.md, ground-truth boxes).
    cfg.MODEL.LEVELSET.HYPERPARAM_CONV_DIM = 0
    # Width of the first of the two FC layers of the hyperparameter head.
    cfg.MODEL.LEVELSET.HYPERPARAM_FC_DIM = 256
    # Convs (ROI_MASK_HEAD.CONV_DIM wide) of the Chan-Vese features head before its upsampling
    # (the paper leaves the depth to its supplement; one keeps the branch's cost moderate: its
    # measured cost is in BENCHMARKS.md).
    cfg.MODEL.LEVELSET.FEATURES_NUM_CONV = 1
    # Width of those convs; 0: ROI_MASK_HEAD.CONV_DIM (256). With FEATURES_POOLER_RESOLUTION 28
    # the convs run on 4x the area: EMBED_CHANNELS (64) wide they cost a quarter of a 256-wide conv
    # at 14 x 14 rather than 4x it. 128 cuts the paper head's mask branch from ~1.40x to ~1.31x Mask
    # R-CNN's per RoI on 2 CPU threads; on COCO-MVal's ground-truth boxes its whole head was as accurate,
    # but its steps added less F@1px than the 256-wide head's on every seed tried: not the default
    # (BENCHMARKS.md section 5 and "Ground-truth boxes").
    cfg.MODEL.LEVELSET.FEATURES_CONV_DIM = 0
    # What the Chan-Vese features head reads. "roi": the pooled RoI features (Fig. 1: three heads
    # on r_m). "tsdf_convs": the output of the initial TSDF head's ROI_MASK_HEAD.NUM_CONV convs,
    # shared, so the embedding is 4 convs deep at the cost of its deconv and 1x1 alone. With
    # FEATURES_NUM_CONV 0 either input drops the features head's own conv, most of the mask
    # branch's extra cost. Not in the paper; accuracy and cost of each choice: BENCHMARKS.md.
    cfg.MODEL.LEVELSET.FEATURES_INPUT = "roi"
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
    # stability limit of the Sobel stencil. The learned values: BENCHMARKS.md.
    # The normalized behaviour before this key existed: [1, 1, 1, 1, 1] with FLOOR 0.
    cfg.MODEL.LEVELSET.HYPERPARAM_INIT = [1.0, 1.0, 0.5, 2.0, 4.0]
    # Lower bound of every hyperparameter as a fraction of its start (upper bound: 2 - FLOOR). With
    # 0, i.e. 2 * sigmoid, a step size near zero gets a gradient proportional to itself and stays
    # there (the learned dt collapsed towards 0 on DSB2018: BENCHMARKS.md).
    cfg.MODEL.LEVELSET.HYPERPARAM_FLOOR = 0.1
    # Added in quadrature to |grad phi| in the curvature, in the evolution's units per pixel: 10% of
    # a pixel-unit TSDF's slope. The curvature's derivative grows like 1 / GRAD_EPS on phi_0's flat
    # plateaus (beyond the truncation, and everywhere at initialisation), where 1e-3 lets it dwarf
    # the in-band gradient. (1e-3 is the normalized behaviour before this key existed.)
    cfg.MODEL.LEVELSET.GRAD_EPS = 0.1
    # Unit L2 norm per pixel for the Chan-Vese features, so |F - c|^2 <= 4 and mu is on the data
    # term's scale. Off: on the diagnostic (tools/analysis/evolution.py frozen-phi0, BENCHMARKS.md) unit
    # features pinned lambda1, lambda2 and dt at their bounds (the capped data term is too weak for
    # the steps the fit asks for); unnormalised features scale the data term freely.
    cfg.MODEL.LEVELSET.NORMALIZE_FEATURES = False
    # Standardise the Chan-Vese embedding F per RoI and channel (zero mean, unit std over the RoI,
    # divided by sqrt(EMBED_CHANNELS) so that |F - c|^2 summed over channels is ~1-4, the scale the
    # HYPERPARAM_INIT starts assume), then scale each channel by a learned gain that starts at 1
    # and never falls below FEATURES_GAIN_FLOOR (unbounded above). Raw F (False, the paper as
    # written) starts at whatever scale the 1x1 conv's initialisation gives and gets a gradient
    # ~ dt * delta_eps / T only in the boundary band, so its data term can stay too weak to move the
    # contour; the floor stops training from switching the data term off by shrinking F. Not with
    # NORMALIZE_FEATURES. Measured effect: BENCHMARKS.md, "Ground-truth boxes" (issue #21 item 4).
    cfg.MODEL.LEVELSET.STANDARDIZE_FEATURES = False
    # Lower bound of that per-channel gain (dimensionless; the data term scales with its square,
    # so 0.25 keeps at least 1/16 of the starting data force).
    cfg.MODEL.LEVELSET.FEATURES_GAIN_FLOOR = 0.25
    # Side (bins) of the Chan-Vese features head's own RoIAlign from FEATURES_IN_FEATURE; 0: it
    # reads the mask pooler's ROI_MASK_HEAD.POOLER_RESOLUTION (14) features, like phi_0 does (the
    # paper's Fig. 1), so F can place no boundary finer than phi_0's. 28 from p2 (stride 4) gives
    # F a 56 x 56 embedding after its deconv, one stride-4 cell per bin for boxes up to ~112 px.
    # Needs MODEL.ROI_HEADS.NAME: LevelSetROIHeads (which pools it). The features head's convs
    # then run at 4x the area: its cost is in BENCHMARKS.md.
    cfg.MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION = 0
    # The FPN level that pooler reads (the finest, stride 4, by default).
    cfg.MODEL.LEVELSET.FEATURES_IN_FEATURE = "p2"
    # Clamp every Chan-Vese iterate to phi_0's range (+-TRUNCATION px), the range of the targets:
    # unbounded, the steepening a step causes away from the zero level is punished by the L1 term
    # even when the mask improves.
    cfg.MODEL.LEVELSET.BOUND_PHI = True
    # Extra Chan-Vese channels beside the embedding (not in the paper). "none": the paper's
    # F(r_m) only, computed from the 14 x 14 pooled features, so the steps see nothing finer than
    # phi_0 does. "raw": also the RoI's crop of the normalised input image at EVOLUTION_RESOLUTION
    # (3 channels, zero mean and unit std per RoI and channel), so the steps can pull the contour to
    # image edges phi_0's 28 x 28 head cannot resolve. Needs MODEL.ROI_HEADS.NAME: LevelSetROIHeads
    # (which pools the crops). Default "none": the paper's model. What it gains on DSB2018 (phi_N
    # over phi_0, and against the paper-feature model) and what it costs: BENCHMARKS.md.
    cfg.MODEL.LEVELSET.IMAGE_FEATURES = "none"
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

    # ---------------------------------------------------------------- DELSEMaskHead (Table 3)
    # The "DELSE" baseline of Table 3: LevelSet R-CNN's TSDF head, targets and l_TSDF (the keys
    # above) with DELSE's eq. 9 evolution (levelset.delse_evolve) instead of Chan-Vese. Evolution
    # units are pixels of the EVOLUTION_RESOLUTION grid (phi = TRUNCATION * TSDF). Defaults are the
    # DELSE paper's (section 5), which Table 3 uses hand-tuned.
    cfg.MODEL.LEVELSET.DELSE_HEAD = CN()
    # T, explicit steps of eq. 9.
    cfg.MODEL.LEVELSET.DELSE_HEAD.EVOLUTION_STEPS = 5
    # Time step (pixels per step for |V| = 1).
    cfg.MODEL.LEVELSET.DELSE_HEAD.DT = 1.0
    # lambda (curvature) and mu (distance regularisation) of eq. 9.
    cfg.MODEL.LEVELSET.DELSE_HEAD.CURVATURE_WEIGHT = 1.0
    cfg.MODEL.LEVELSET.DELSE_HEAD.DIST_REG_WEIGHT = 0.04
    # eps (pixels) of the Dirac localising motion and curvature to the zero level; None = eq. 9 as written.
    cfg.MODEL.LEVELSET.DELSE_HEAD.EPS = None
    # Clamp phi to +-TRUNCATION px after every step (not in the paper).
    cfg.MODEL.LEVELSET.DELSE_HEAD.CLAMP_TO_TRUNCATION = False
    # Predict lambda, mu and dt_1..T per RoI (LevelSet R-CNN's hyperparameter head, 2 sigmoid(.)
    # times the constants above) instead of the constants ("DELSE + HP head").
    cfg.MODEL.LEVELSET.DELSE_HEAD.HYPERPARAMETER_HEAD = False
    # "delse": DELSE's losses (MSE on phi_0 in pixels + EVOLUTION_LOSS_WEIGHT * class-balanced BCE
    # of H(phi_T) + DIRECTION_LOSS_WEIGHT * L_direct); "levelset_rcnn": l_TSDF on phi_0 and phi_T
    # with LOSS_WEIGHT_PHI0/PHIN above, + DIRECTION_LOSS_WEIGHT * L_direct.
    cfg.MODEL.LEVELSET.DELSE_HEAD.LOSS = "delse"
    # alpha (L_T) and beta (L_direct) of DELSE's eq. 10.
    cfg.MODEL.LEVELSET.DELSE_HEAD.EVOLUTION_LOSS_WEIGHT = 100.0
    cfg.MODEL.LEVELSET.DELSE_HEAD.DIRECTION_LOSS_WEIGHT = 1.0
    # eps (pixels) of the Heaviside in L_T (DELSE eq. 14).
    cfg.MODEL.LEVELSET.DELSE_HEAD.HEAVISIDE_EPS = 1.0

    from .backbone import add_wrn_config

    add_wrn_config(cfg)  # MODEL.WRN: the WideResNet-38 backbone of the Table 1 configs
    return cfg


def get_cfg():
    """The shared :func:`levelset_d2.get_cfg` (every installed project's keys); kept here so that
    ``from levelset_rcnn import get_cfg`` reads as in Detectron2's projects."""
    from levelset_d2 import get_cfg as _get_cfg

    return _get_cfg()


