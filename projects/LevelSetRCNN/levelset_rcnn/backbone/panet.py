"""
PANet's bottom-up path augmentation (Liu et al., "Path Aggregation Network for Instance
Segmentation", CVPR 2018, section 3.1 and Fig. 2(b)) on top of Detectron2's FPN.

    N2 = P2,    N_{i+1} = relu(conv3x3(relu(conv3x3_stride2(N_i)) + P_{i+1}))

The outputs keep FPN's names (p2..p5, and p6 from the top block applied to N5), so RPN and ROI
heads configured for FPN work unchanged.
"""
import fvcore.nn.weight_init as weight_init
from torch.nn import functional as F

from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN

from .deform_conv import build_resnet_tv_deform_backbone
from .fpn import fpn_from_config
from .wide_resnet import build_wide_resnet38_backbone

__all__ = ["PANetFPN", "build_resnet_panet_backbone", "build_wide_resnet38_panet_backbone"]


class PANetFPN(FPN):
    """
    :class:`detectron2.modeling.backbone.fpn.FPN` followed by PANet's bottom-up path. Takes the
    arguments of ``FPN``; ``norm`` also applies to the bottom-up convs.
    """

    def __init__(self, bottom_up, in_features, out_channels, norm="", top_block=None, **kwargs):
        super().__init__(bottom_up, in_features, out_channels, norm, top_block, **kwargs)
        use_bias = norm == ""
        # Registered once under their names (like FPN's fpn_lateral{i}); the lists are for forward.
        self.pan_down_convs, self.pan_output_convs = [], []
        levels = self._out_features[: len(self.in_features)]  # p2..p5, high to low resolution
        for level in levels[1:]:
            stage = int(level[1:])
            down = Conv2d(
                out_channels, out_channels, 3, stride=2, padding=1, bias=use_bias,
                norm=get_norm(norm, out_channels), activation=F.relu,
            )
            output = Conv2d(
                out_channels, out_channels, 3, padding=1, bias=use_bias,
                norm=get_norm(norm, out_channels), activation=F.relu,
            )
            weight_init.c2_xavier_fill(down)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"pan_down{stage}", down)  # N_{stage-1} -> stride of P_stage
            self.add_module(f"pan_output{stage}", output)  # fused map -> N_stage
            self.pan_down_convs.append(down)
            self.pan_output_convs.append(output)

    def forward(self, x):
        fpn = super().forward(x)
        levels = self._out_features[: len(self.in_features)]
        outputs = {levels[0]: fpn[levels[0]]}  # N2 = P2
        prev = fpn[levels[0]]
        for level, down, output in zip(levels[1:], self.pan_down_convs, self.pan_output_convs):
            prev = output(down(prev) + fpn[level])
            outputs[level] = prev
        extra = self._out_features[len(self.in_features):]
        if self.top_block is not None and self.top_block.in_feature in outputs:
            # p6 of LastLevelMaxPool comes from N5, not P5.
            outputs.update(zip(extra, self.top_block(outputs[self.top_block.in_feature])))
        else:  # e.g. LastLevelP6P7 on res5: unchanged
            outputs.update({name: fpn[name] for name in extra})
        return outputs


@BACKBONE_REGISTRY.register()
def build_resnet_panet_backbone(cfg, input_shape):
    """Detectron2's ResNet (with torchvision deformable convs where
    MODEL.RESNETS.DEFORM_ON_PER_STAGE says) + FPN + PANet bottom-up path."""
    return fpn_from_config(cfg, build_resnet_tv_deform_backbone(cfg, input_shape), PANetFPN)


@BACKBONE_REGISTRY.register()
def build_wide_resnet38_panet_backbone(cfg, input_shape):
    """WideResNet-38 (MODEL.WRN) + FPN + PANet bottom-up path."""
    return fpn_from_config(cfg, build_wide_resnet38_backbone(cfg, input_shape), PANetFPN)
