"""Config keys of DELSE (Wang et al., "Object Instance Annotation with Deep Extreme Level Set
Evolution", CVPR 2019). Defaults are the paper's (section 5) unless a comment says otherwise."""
from detectron2.config import CfgNode as CN


def add_delse_config(cfg):
    """Declare every DELSE key with its default. Idempotent: a second call changes nothing."""
    if "DELSE" in cfg.MODEL:
        return cfg

    # ---------------------------------------------------------------- input: one crop per instance
    cfg.INPUT.DELSE = CN()
    # Pixels added on each side of the instance box before cropping (50 PASCAL/DAVIS, 10 Cityscapes).
    cfg.INPUT.DELSE.CROP_MARGIN = 50
    # Side of the square network input; the crop is resized to it (512 PASCAL/DAVIS, 224 Cityscapes).
    cfg.INPUT.DELSE.INPUT_SIZE = 512
    # "stretch": resize the margin-expanded box to the square input (DEXTR, Cityscapes-Stretching);
    # "square": square crop centred on the box, aspect kept, may show other objects (Cityscapes-Hard).
    cfg.INPUT.DELSE.CROP_MODE = "stretch"
    # Extreme points may be moved up to this many pixels inwards (DEXTR's `pert`; 0 at test time).
    cfg.INPUT.DELSE.EXTREME_POINT_JITTER = 5
    # Test time only (Table 7's "lazy annotator"): each click moves by U[-n, n] x the box side
    # (x by its width, y by its height); the crop then follows the noisy clicks' box.
    cfg.INPUT.DELSE.EXTREME_POINT_NOISE = 0.0
    # Std (input pixels) of the Gaussian placed at each extreme point in the 4th input channel.
    cfg.INPUT.DELSE.HEATMAP_SIGMA = 10.0
    # Instances with a mask smaller than this many pixels (in the image) are not used.
    cfg.INPUT.DELSE.MIN_AREA = 50
    # Random horizontal flip of the crop during training.
    cfg.INPUT.DELSE.RANDOM_FLIP = True
    # DEXTR's ScaleNRotate (its training used 20 degrees and (0.75, 1.25)): during training the image
    # and the mask are rotated by U[-n, n] degrees and scaled by U[min, max] about the object's
    # centre, before the crop. Off by default (0 and (1, 1)): the paper does not list it, and on the R-50
    # annotator recipe it gave +1.0 mIoU@4 at 400 iterations, +0.2 (n.s.) at 1000 (BENCHMARKS.md section 10).
    cfg.INPUT.DELSE.RANDOM_ROTATION = 0.0
    cfg.INPUT.DELSE.RANDOM_SCALE = (1.0, 1.0)

    # ---------------------------------------------------------------- model
    cfg.MODEL.DELSE = CN()
    # Feed the extreme-point heatmap as 4th channel; False is the paper's DELSE* (box only).
    cfg.MODEL.DELSE.USE_EXTREME_POINTS = True
    # Encoder: Detectron2's ResNet built from cfg.MODEL.RESNETS with a 4-channel stem. The paper
    # uses ResNet-101 (DEPTH 101); tiny configs use R-18. This key picks the stages it reads.
    cfg.MODEL.DELSE.ENCODER_FEATURES = ["res2", "res3", "res4", "res5"]
    # Skip features (PolygonRNN++): every stage -> 3x3 conv+norm+ReLU, resized to res2, concatenated.
    cfg.MODEL.DELSE.SKIP_FEATURES = True
    # Channels of each skip projection (and of the encoder output when skip features are off).
    cfg.MODEL.DELSE.SKIP_CHANNELS = 64
    # Channels inside each branch's PSP module.
    cfg.MODEL.DELSE.PSP_CHANNELS = 64
    # Bin sizes of the PSP pyramid pooling (PSPNet).
    cfg.MODEL.DELSE.PSP_BINS = [1, 2, 3, 6]
    # Width of each pooled bin's 1x1 conv: "psp_channels" (PSP_CHANNELS per bin, the layout of the
    # existing checkpoints) or "pspnet" (in_channels / len(PSP_BINS) per bin, as PSPNet: the 3x3
    # fusion conv then reads 2 x in_channels instead of in + 4 x PSP_CHANNELS; at R-101/512 the
    # three branches are ~72 % of the FLOPs with the former, see tools/benchmarks/bench_delse_latency.py).
    cfg.MODEL.DELSE.PSP_BIN_WIDTH = "psp_channels"
    # Norm of the heads' convs ("BN", "GN", "SyncBN", "" ...); the encoder uses MODEL.RESNETS.NORM.
    cfg.MODEL.DELSE.NORM = "BN"
    # Evolution terms (ablations, Table 6): without modulation m = 1 (plain curvature); both off
    # is the paper's "Level Set Regression" (phi_T = phi_0, no evolution).
    cfg.MODEL.DELSE.USE_MOTION = True
    cfg.MODEL.DELSE.USE_MODULATION = True
    # DEXTR-style pixel-wise baseline on the same encoder: the Level Set Branch predicts mask
    # logits (class-balanced BCE, no level set, no evolution); USE_MOTION/MODULATION are ignored.
    cfg.MODEL.DELSE.PIXEL_WISE = False

    # ---------------------------------------------------------------- level set (eq. 9)
    # TSDF truncation D in pixels of the network input (section 4.1).
    cfg.MODEL.DELSE.TSDF_TRUNCATION = 30.0
    # Evolution steps T, for training and inference.
    cfg.MODEL.DELSE.EVOLUTION_STEPS = 5
    # Time step of each explicit update (eq. 4), in input pixels per step for |V| = 1.
    cfg.MODEL.DELSE.EVOLUTION_DT = 1.0
    # Curvature weight lambda and distance-regularisation weight mu of eq. 9.
    cfg.MODEL.DELSE.CURVATURE_WEIGHT = 1.0
    cfg.MODEL.DELSE.DIST_REG_WEIGHT = 0.04
    # eps of the Dirac that localises motion and curvature to the zero level (DRLSE style);
    # None is the paper's eq. 9 as written (no localisation).
    cfg.MODEL.DELSE.EVOLUTION_EPS = None
    # Clamp phi to [-D, D] after every step (not in the paper): values beyond the truncation carry
    # no information, and the clamp keeps an explicit step that violates the CFL condition finite.
    cfg.MODEL.DELSE.CLAMP_TO_TRUNCATION = False
    # epsilon of the approximated Heaviside of eq. 14.
    cfg.MODEL.DELSE.HEAVISIDE_EPS = 1.0

    # ---------------------------------------------------------------- training (Algorithm 1)
    # "pretrain": multi-task loss of eq. 10 on the shifted GT LSF; "joint": L_T on evolve(phi0).
    cfg.MODEL.DELSE.PHASE = "pretrain"
    # With PHASE "pretrain", switch to "joint" at this iteration of the same run (0: never switch).
    cfg.MODEL.DELSE.PRETRAIN_ITERS = 0
    # Weights alpha (L_T) and beta (L_direct) of eq. 10. alpha also scales L_T in joint training
    # (Algorithm 1 writes L_T alone there), so the L_T gradients keep their size across the switch.
    cfg.MODEL.DELSE.EVOLUTION_LOSS_WEIGHT = 100.0
    cfg.MODEL.DELSE.DIRECTION_LOSS_WEIGHT = 1.0
    # Range of the shift Delta-h (input pixels) of the simulated initial LSF of eq. 12.
    cfg.MODEL.DELSE.SHIFT_RANGE = 5.0

    # ---------------------------------------------------------------- interactive (section 4.4)
    # Most simulated drag-and-drop corrections per sample during joint training (0: none). The
    # paper evaluates up to 3 (Table 8); training with the same maximum shows the network the
    # channels of several drags summed.
    cfg.MODEL.DELSE.NUM_CORRECTIONS = 0
    # How many of them a sample gets: "uniform" (an integer drawn per sample and iteration from
    # U{0..NUM_CORRECTIONS}, so rounds 0..N are all trained and the first ones most often, as at
    # test time every object sees them) or "fixed" (always NUM_CORRECTIONS, until the annotator
    # finds the mask within 1 px). The paper does not say; "uniform" is our choice.
    cfg.MODEL.DELSE.CORRECTION_SAMPLING = "uniform"
    # What a correction feeds the network (Table 8's two rows): "motion_editing" (the drag's target
    # joins the extreme-point channel as a click and the drag, encoded in two channels, re-predicts
    # V through the motion-editing block) or "clicks" (the target joins the point channel only, as
    # DEXTR's boundary clicks; the editing block is not used and gets no gradient).
    cfg.MODEL.DELSE.CORRECTION_MODE = "motion_editing"
    # Simulated corrections at test time; the evaluator reports IoU after 0..N of them.
    cfg.MODEL.DELSE.TEST_NUM_CORRECTIONS = 2
    # Not in the paper: each drag also enforced on the level set itself (levelset.enforce_drag: the
    # object grows by, or loses, a capsule from the dragged point whose rim passes the drop point),
    # on phi_0 before the evolution ("phi0"), on phi_T after it ("result"), on both, or not ("none",
    # the paper: a drag acts only through the network's inputs). Training-free; with motion editing
    # and clicks alike (not the pixel-wise baseline). Measured in BENCHMARKS.md (DELSE corrections).
    cfg.MODEL.DELSE.DRAG_EDIT = "none"
    # Capsule radius: this fraction of the drag's length (0.5: the capsule is as wide as the drag is long),
    # at least DRAG_EDIT_MIN_RADIUS input pixels (2: a short drag still moves a visible strip).
    cfg.MODEL.DELSE.DRAG_EDIT_RADIUS = 0.5
    cfg.MODEL.DELSE.DRAG_EDIT_MIN_RADIUS = 2.0
    # Motion-editing block: residual 3x3 convs of this width, then a 2-channel conv.
    cfg.MODEL.DELSE.EDIT_NUM_CONVS = 6
    cfg.MODEL.DELSE.EDIT_CHANNELS = 128
    # Not in the paper (issue #22 item 3). The drag channels carry |dx| / |d| and |dy| / |d| (the
    # paper's encoding: an inward and an outward drag look alike); True: dx / |d| and dy / |d|, signed.
    cfg.MODEL.DELSE.EDIT_SIGNED_DRAGS = False
    # The block also reads phi_0 / TSDF_TRUNCATION (one more input channel, at the branches'
    # resolution), so it can tell inside from outside where the drag starts. False: the paper's
    # (V, drags) input; checkpoints trained with one setting do not load with the other.
    cfg.MODEL.DELSE.EDIT_READS_PHI0 = False
    # Not in the paper (issue #22): the interactive fine-tuning (PHASE "joint", NUM_CORRECTIONS > 0, motion
    # editing) trains the motion-editing block alone; every other part keeps its weights and its batch-norm
    # statistics (eval mode), so the prediction from the extreme points stays exactly the base model's
    # (fine-tuning the whole network cost 1.3 mIoU@4, BENCHMARKS.md section 7d) while the block learns the
    # drags that a preview applies. False: the whole network fine-tunes (the paper).
    cfg.MODEL.DELSE.TRAIN_EDITING_ONLY = False

    # ---------------------------------------------------------------- evaluation
    cfg.TEST.DELSE = CN()
    # Pixel tolerances of the boundary F-measure curve (DAVIS multi-scale evaluation, Fig. 5).
    cfg.TEST.DELSE.BOUNDARY_TOLERANCES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    # Test-time mirroring (not in the paper): the branches' outputs (phi_0, V with its x component
    # negated, m; the baseline's logits) averaged over the crop and its left-right mirror, then one
    # evolution. Costs a second encoder pass per prediction and per full correction (a preview
    # reuses the averaged outputs). Measured in BENCHMARKS.md section 6.
    cfg.TEST.DELSE.FLIP = False
    # Also report the mIoU at the mask threshold that maximises it on the evaluated set (the
    # paper's protocol for DEXTR and DELSE alike, after DEXTR; optimistic: tuned on the test data),
    # beside the default threshold's mIoU. On for every model so the comparison stays symmetric.
    cfg.TEST.DELSE.THRESHOLD_SEARCH = True
    # Thresholds searched on phi_T (crop pixels; the default mask is phi_T > 0) ...
    cfg.TEST.DELSE.PHI_THRESHOLDS = [x / 2.0 for x in range(-20, 21)]
    # ... and on the pixel-wise baseline's probability (default mask: p > 0.5).
    cfg.TEST.DELSE.PROB_THRESHOLDS = [x / 20.0 for x in range(1, 20)]
    return cfg
