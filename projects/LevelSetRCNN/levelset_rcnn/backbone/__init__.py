"""
Backbones of LevelSet R-CNN's strongest Cityscapes setting (paper Table 1: "WideResNet-38 backbone
with deformable convolutions and PANet modifications"). Importing this package registers, in
Detectron2's BACKBONE_REGISTRY:

- ``build_wide_resnet38_backbone``, ``build_wide_resnet38_fpn_backbone``,
  ``build_wide_resnet38_panet_backbone``: WideResNet-38 (cfg.MODEL.WRN) alone / + FPN / + PANet;
- ``build_resnet_tv_deform_backbone``, ``build_resnet_tv_deform_fpn_backbone``,
  ``build_resnet_panet_backbone``: Detectron2's ResNet whose MODEL.RESNETS.DEFORM_ON_PER_STAGE
  bottlenecks use torchvision's deformable conv (no compiled ``_C`` needed) alone / + FPN / + PANet.
"""
from detectron2.config import CfgNode as CN

from .deform_conv import (
    DeformConv2dPack,
    build_resnet_tv_deform_backbone,
    build_resnet_tv_deform_fpn_backbone,
    replace_resnet_conv2_by_deform_conv,
)
from .panet import PANetFPN, build_resnet_panet_backbone, build_wide_resnet38_panet_backbone
from .wide_resnet import (
    WideResNet38,
    build_wide_resnet38_backbone,
    build_wide_resnet38_fpn_backbone,
    convert_mapillary_checkpoint,
)

__all__ = [
    "add_wrn_config",
    "DeformConv2dPack",
    "PANetFPN",
    "WideResNet38",
    "build_resnet_panet_backbone",
    "build_resnet_tv_deform_backbone",
    "build_resnet_tv_deform_fpn_backbone",
    "build_wide_resnet38_backbone",
    "build_wide_resnet38_fpn_backbone",
    "build_wide_resnet38_panet_backbone",
    "convert_mapillary_checkpoint",
    "replace_resnet_conv2_by_deform_conv",
]


def add_wrn_config(cfg):
    """Declare the WideResNet-38 keys, cfg.MODEL.WRN, with the defaults of the paper's model."""
    cfg.MODEL.WRN = CN()
    # Residual units in mod2..mod7 (B2..B7 of Wu et al.); [3, 3, 6, 3, 1, 1] is WRN-38.
    cfg.MODEL.WRN.STRUCTURE = [3, 3, 6, 3, 1, 1]
    # Divide every channel number by this (1 = WRN-38; tests use 16 for a tiny model).
    cfg.MODEL.WRN.WIDTH_DIVISOR = 1
    # Norm of every unit and output (detectron2.layers.get_norm: "BN", "SyncBN", "GN", "FrozenBN").
    cfg.MODEL.WRN.NORM = "SyncBN"
    # "leaky_relu" (slope 0.01, what Mapillary's ImageNet weights were trained with) or "relu".
    cfg.MODEL.WRN.ACTIVATION = "leaky_relu"
    # Segmentation layout (mod5 dilation 2, mod6-7 dilation 4, output stride 8); False for FPN.
    cfg.MODEL.WRN.DILATED = False
    # Dropout2d probability in the units of mod6 and mod7 (Mapillary: 0.3, 0.5; off for detection).
    cfg.MODEL.WRN.DROPOUT = [0.0, 0.0]
    # For mod2..mod7: make the 3x3 convs of the module deformable (torchvision deform_conv2d).
    cfg.MODEL.WRN.DEFORM_ON_PER_STAGE = [False, False, False, False, False, False]
    # Modulated deformable conv (DCNv2: offsets and a sigmoid mask) instead of DCNv1 (offsets).
    cfg.MODEL.WRN.DEFORM_MODULATED = True
    # Groups of input channels sharing one offset field.
    cfg.MODEL.WRN.DEFORM_NUM_GROUPS = 1
    # Features returned: res2..res5 at strides 4, 8, 16, 32 (outputs of mod3, mod4, mod5, mod7).
    cfg.MODEL.WRN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg
