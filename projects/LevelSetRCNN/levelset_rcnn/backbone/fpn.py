"""The FPN on top of any of this package's bottom-up networks, from ``MODEL.FPN`` (as Detectron2's
``build_resnet_fpn_backbone``): P2-P5 and P6 by max-pooling."""
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

__all__ = ["fpn_from_config"]


def fpn_from_config(cfg, bottom_up, fpn_class=FPN):
    """``fpn_class`` (FPN or a subclass taking its arguments, e.g. PANetFPN) over ``bottom_up``."""
    return fpn_class(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
