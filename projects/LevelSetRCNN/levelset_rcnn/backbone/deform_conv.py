"""
Deformable convolution (Dai et al., ICCV 2017; modulated: Zhu et al., CVPR 2019, "DCNv2") on
``torchvision.ops.deform_conv2d``, which runs on CPU and GPU without Detectron2's compiled ``_C``.

``DeformConv2dPack`` is a drop-in replacement for Detectron2's ``layers.Conv2d``: same ``weight``,
``bias``, ``norm`` and ``activation`` attributes (so ImageNet weights of the plain conv load into
it), plus ``conv_offset``, a zero-initialised conv that predicts the sampling offsets (and, when
modulated, the mask). At initialisation the offsets are 0 and the layer samples the regular grid.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from detectron2.layers import Conv2d
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .fpn import fpn_from_config

__all__ = [
    "DeformConv2dPack",
    "replace_resnet_conv2_by_deform_conv",
    "build_resnet_tv_deform_backbone",
    "build_resnet_tv_deform_fpn_backbone",
]


class DeformConv2dPack(nn.Module):
    """
    Deformable convolution whose offsets (and modulation mask) are predicted from its own input by
    ``conv_offset``, a conv with the same kernel, stride, padding and dilation (DCNv1 section 2.1;
    DCNv2 Eq. 3). Output ``y(p) = sum_k w_k * m_k * x(p + p_k + dp_k)``, with ``m_k = sigmoid(.)``
    when ``modulated`` and ``m_k = 1`` otherwise.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=False,
        modulated=True,
        norm=None,
        activation=None,
    ):
        """
        Args:
            deform_groups (int): groups of input channels that share one offset field.
            modulated (bool): DCNv2 (offsets and a sigmoid mask) instead of DCNv1 (offsets only).
            norm (nn.Module or None), activation (callable or None): applied after the conv, as in
                :class:`detectron2.layers.Conv2d`.
        """
        super().__init__()
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.modulated = modulated
        kh, kw = _pair(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=1)
        # 2 offsets (dy, dx) per kernel position and deformable group, + 1 mask value if modulated.
        offset_channels = (3 if modulated else 2) * deform_groups * kh * kw
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_channels,
            (kh, kw),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)  # start from the regular grid
        nn.init.zeros_(self.conv_offset.bias)
        self.norm = norm
        self.activation = activation

    def offset_and_mask(self, x):
        """
        Returns offset (N, 2*G*kh*kw, H', W') and mask (N, G*kh*kw, H', W') or None.
        """
        out = self.conv_offset(x)
        if not self.modulated:
            return out, None
        num_offsets = out.shape[1] * 2 // 3
        return out[:, :num_offsets], torch.sigmoid(out[:, num_offsets:])

    def forward(self, x):
        if x.numel() == 0:  # empty batch (e.g. no RoIs): deform_conv2d rejects it
            out = F.conv2d(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        else:
            offset, mask = self.offset_and_mask(x)
            out = deform_conv2d(
                x,
                offset,
                self.weight,
                self.bias,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=mask,
            )
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self):
        return (
            f"in_channels={self.weight.shape[1] * self.groups}, out_channels={self.weight.shape[0]}, "
            f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, modulated={self.modulated}"
        )


def deform_conv_like(conv: Conv2d, *, modulated=True, deform_groups=1):
    """
    A :class:`DeformConv2dPack` with the geometry, norm and activation of ``conv`` (a Detectron2
    ``Conv2d``), with a copy of its weights; ``conv.norm`` is moved, not copied.
    """
    deform = DeformConv2dPack(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        deform_groups=deform_groups,
        bias=conv.bias is not None,
        modulated=modulated,
        norm=conv.norm,
        activation=conv.activation,
    )
    with torch.no_grad():
        deform.weight.copy_(conv.weight)
        if conv.bias is not None:
            deform.bias.copy_(conv.bias)
    return deform


def replace_resnet_conv2_by_deform_conv(resnet, deform_on_per_stage, *, modulated, deform_groups):
    """
    Turn the 3x3 ``conv2`` of every bottleneck block of the ResNet stages res2..res5 selected by
    ``deform_on_per_stage`` (4 bools, like ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) into a
    :class:`DeformConv2dPack`, in place. This is what Detectron2's ``DeformBottleneckBlock`` does,
    without its compiled ops. Parameter names of conv2 (``weight``, ``norm.*``) do not change, so
    ImageNet checkpoints load as before.
    """
    assert len(deform_on_per_stage) == 4, deform_on_per_stage
    for stage_name, on in zip(["res2", "res3", "res4", "res5"], deform_on_per_stage):
        if not on or not hasattr(resnet, stage_name):
            continue
        for block in getattr(resnet, stage_name):
            assert hasattr(block, "conv3"), "deformable conv needs bottleneck blocks (R-50 and up)"
            block.conv2 = deform_conv_like(
                block.conv2, modulated=modulated, deform_groups=deform_groups
            )
    return resnet


def make_conv(in_channels, out_channels, kernel_size, *, deform=False, modulated=True, **kwargs):
    """A plain ``nn.Conv2d`` or, if ``deform``, a :class:`DeformConv2dPack` of the same geometry."""
    if deform:
        return DeformConv2dPack(
            in_channels, out_channels, kernel_size, modulated=modulated, **kwargs
        )
    kwargs.pop("deform_groups", None)
    return nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)



@BACKBONE_REGISTRY.register()
def build_resnet_tv_deform_backbone(cfg, input_shape):
    """
    Detectron2's ResNet with the deformable bottlenecks of MODEL.RESNETS.DEFORM_ON_PER_STAGE /
    DEFORM_MODULATED / DEFORM_NUM_GROUPS built on torchvision (Detectron2's own need its ``_C``).
    """
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    resnet = build_resnet_backbone(plain, input_shape)
    replace_resnet_conv2_by_deform_conv(
        resnet,
        cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE,
        modulated=cfg.MODEL.RESNETS.DEFORM_MODULATED,
        deform_groups=cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS,
    )
    # build_resnet_backbone froze before the swap; freeze the new convs of frozen stages too.
    for p_name, param in resnet.named_parameters():
        stage = p_name.split(".")[0]
        if stage.startswith("res") and int(stage[3:]) <= cfg.MODEL.BACKBONE.FREEZE_AT:
            param.requires_grad = False
    return resnet


@BACKBONE_REGISTRY.register()
def build_resnet_tv_deform_fpn_backbone(cfg, input_shape):
    """:func:`build_resnet_tv_deform_backbone` + Detectron2's FPN (as build_resnet_fpn_backbone)."""
    return fpn_from_config(cfg, build_resnet_tv_deform_backbone(cfg, input_shape))
