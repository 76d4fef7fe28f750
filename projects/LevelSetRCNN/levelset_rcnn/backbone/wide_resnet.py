"""
WideResNet-38 (Wu, Shen, van den Hengel, "Wider or Deeper: Revisiting the ResNet Model for Visual
Recognition", Pattern Recognition 2019; "model A"), the backbone of LevelSet R-CNN's Table 1 on
Cityscapes, as a Detectron2 backbone.

Layout implemented (that of Mapillary's ``WiderResNetA2`` with structure [3, 3, 6, 3, 1, 1], the
ImageNet model of in-place ABN; module and parameter names are theirs, so its checkpoint converts
by renaming nothing, see :func:`convert_mapillary_checkpoint`):

    module  units  unit channels         stride of the output   dilated layout  exported as
    mod1    -      conv3x3 3 -> 64       1                      1               -
    mod2    3      (128, 128)            2  (max-pool before)   2               -
    mod3    3      (256, 256)            4  (max-pool before)   4               res2
    mod4    6      (512, 512)            8  (first unit s2)     8               res3
    mod5    3      (512, 1024)           16 (first unit s2)     8, dilation 2   res4
    mod6    1      (512, 1024, 2048)     32 (first unit s2)     8, dilation 4   -
    mod7    1      (1024, 2048, 4096)    32                     8, dilation 4   res5

Units are pre-activation residual units (He et al., ECCV 2016): ``x + F(act(norm(x)))``, where F is
two 3x3 convs (two channel numbers) or a 1x1-3x3-1x1 bottleneck (three); the shortcut is a 1x1
projection of ``act(norm(x))`` where the stride or width changes. Strides sit in the first 3x3 conv
of a basic unit and in the first 1x1 conv of a bottleneck (as in Mapillary's code). B1..B7 of the
paper are mod1..mod7. The convolutions hold 105.0 M weights (ImageNet classifier excluded).

Where this differs from the paper / Mapillary's model:
- Detection layout by default: no dilation, output stride 32, so that FPN gets strides 4..32.
  ``dilated=True`` gives the segmentation layout (output stride 8; not usable with FPN).
- The exported features res2..res4 are the raw sums of a pre-activation network; each goes through
  its own norm + activation (``bn_out_res2`` ...) before leaving the backbone, as res5 goes through
  ``bn_out`` in the original (there, the only output). These extra norms are new parameters.
- Activation: Mapillary's ABN uses leaky ReLU (slope 0.01), which its ImageNet weights were trained
  with; the paper uses ReLU. Both are available (``activation``).
- Dropout (Mapillary: 0.3 in mod6 and 0.5 in mod7, before the last conv of the unit) is
  configurable and off by default for detection.
- Optional deformable convolutions (``deform_on_per_stage``): every 3x3 conv of the units of the
  selected modules becomes a :class:`DeformConv2dPack` (DCNv2 by default), the setting of
  PolyTransform / LevelSet R-CNN "Ours (COCO)" ("WideResNet-38 with deformable convolutions").
"""
import pickle
from functools import partial

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import CNNBlockBase, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from .deform_conv import DeformConv2dPack, make_conv
from .fpn import fpn_from_config

__all__ = [
    "IdentityResidualBlock",
    "WideResNet38",
    "WRN38_CHANNELS",
    "WRN38_STRUCTURE",
    "convert_mapillary_checkpoint",
    "build_wide_resnet38_backbone",
    "build_wide_resnet38_fpn_backbone",
]

# Unit channels of mod2..mod7 and units per module (Wu et al., model A; Mapillary's WRN-38).
WRN38_CHANNELS = [(128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096)]
WRN38_STRUCTURE = [3, 3, 6, 3, 1, 1]
# Module whose output is each exported feature.
_FEATURE_MODULES = {"res2": "mod3", "res3": "mod4", "res4": "mod5", "res5": "mod7"}


def _activation(name):
    if name == "leaky_relu":
        return partial(F.leaky_relu, negative_slope=0.01)
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown WRN activation {name!r}; use 'leaky_relu' or 'relu'")


class IdentityResidualBlock(CNNBlockBase):
    """
    Pre-activation residual unit: ``out = shortcut + convs(act(bn1(x)))``, with ``shortcut = x`` or
    ``proj_conv(act(bn1(x)))``. ``channels`` has two values (3x3, 3x3) or three (1x1, 3x3, 1x1).
    """

    def __init__(
        self,
        in_channels,
        channels,
        *,
        stride=1,
        dilation=1,
        norm="BN",
        activation="leaky_relu",
        dropout=0.0,
        deform=False,
        deform_modulated=True,
        deform_groups=1,
    ):
        assert len(channels) in (2, 3), channels
        super().__init__(in_channels, channels[-1], stride)
        self.is_bottleneck = len(channels) == 3
        self.act = _activation(activation)
        conv3x3 = partial(
            make_conv,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            bias=False,
            deform=deform,
            modulated=deform_modulated,
            deform_groups=deform_groups,
        )

        self.bn1 = get_norm(norm, in_channels)
        self.convs = nn.Module()
        if self.is_bottleneck:
            self.convs.conv1 = nn.Conv2d(in_channels, channels[0], 1, stride=stride, bias=False)
            self.convs.bn2 = get_norm(norm, channels[0])
            self.convs.conv2 = conv3x3(channels[0], channels[1])
            self.convs.bn3 = get_norm(norm, channels[1])
            self.convs.conv3 = nn.Conv2d(channels[1], channels[2], 1, bias=False)
        else:
            self.convs.conv1 = conv3x3(in_channels, channels[0], stride=stride)
            self.convs.bn2 = get_norm(norm, channels[0])
            self.convs.conv2 = conv3x3(channels[0], channels[1])
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.proj_conv = None
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                weight_init.c2_msra_fill(m)
            elif isinstance(m, DeformConv2dPack):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # deformable convs start on the regular grid
            if isinstance(m, DeformConv2dPack):
                nn.init.zeros_(m.conv_offset.weight)
                nn.init.zeros_(m.conv_offset.bias)

    def forward(self, x):
        pre = self.act(self.bn1(x))
        shortcut = x if self.proj_conv is None else self.proj_conv(pre)
        c = self.convs
        out = self.act(c.bn2(c.conv1(pre)))
        if self.is_bottleneck:
            out = self.act(c.bn3(c.conv2(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = c.conv3(out) if self.is_bottleneck else c.conv2(out)
        return out + shortcut


class WideResNet38(Backbone):
    """
    WideResNet-38 (model A of Wu et al.); see the module docstring for the layout. Outputs any of
    res2 (stride 4), res3 (8), res4 (16), res5 (32), each after its own norm + activation.
    """

    def __init__(
        self,
        *,
        in_channels=3,
        structure=WRN38_STRUCTURE,
        width_divisor=1,
        norm="BN",
        activation="leaky_relu",
        dilated=False,
        dropout=(0.0, 0.0),
        deform_on_per_stage=(False,) * 6,
        deform_modulated=True,
        deform_groups=1,
        out_features=("res2", "res3", "res4", "res5"),
        freeze_at=0,
    ):
        """
        Args:
            structure (list[int]): units in mod2..mod7 ([3, 3, 6, 3, 1, 1] for WRN-38).
            width_divisor (int): divide every channel number by this (1 for WRN-38; tests use more).
            norm (str): any of :func:`detectron2.layers.get_norm` ("BN", "SyncBN", "GN", "FrozenBN").
            activation (str): "leaky_relu" (slope 0.01; Mapillary) or "relu" (the paper).
            dilated (bool): segmentation layout (output stride 8) instead of the detection one.
            dropout (tuple[float, float]): Dropout2d probability in the units of mod6 and mod7.
            deform_on_per_stage (list[bool]): for mod2..mod7, make their 3x3 convs deformable.
            deform_modulated (bool), deform_groups (int): DCNv2 mask; offset groups.
            out_features (list[str]): subset of res2..res5.
            freeze_at (int): freeze (requires_grad=False, BN -> FrozenBN) everything up to the
                output of res{freeze_at}: 1 = mod1 + mod2 (the stride-1/2 "stem"), 2 = up to mod3
                (res2), ..., as Detectron2's ResNet does with MODEL.BACKBONE.FREEZE_AT.
        """
        super().__init__()
        assert len(structure) == 6 and len(deform_on_per_stage) == 6 and len(dropout) == 2
        assert set(out_features) <= set(_FEATURE_MODULES), out_features
        self._out_features = list(out_features)
        act = _activation(activation)

        stem_channels = 64 // width_divisor
        self.mod1 = nn.Module()
        self.mod1.conv1 = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        weight_init.c2_msra_fill(self.mod1.conv1)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)

        channels_in = stem_channels
        stride_so_far = 2  # after pool2
        self._out_feature_strides, self._out_feature_channels = {}, {}
        module_to_feature = {m: f for f, m in _FEATURE_MODULES.items()}
        for mod_idx, num_units in enumerate(structure):  # mod2..mod7
            name = f"mod{mod_idx + 2}"
            channels = tuple(c // width_divisor for c in WRN38_CHANNELS[mod_idx])
            if dilated:
                dilation = {3: 2, 4: 4, 5: 4}.get(mod_idx, 1)
                first_stride = 2 if mod_idx == 2 else 1
            else:
                dilation = 1
                first_stride = 2 if 2 <= mod_idx <= 4 else 1
            if mod_idx == 1:
                stride_so_far *= 2  # pool3
            stride_so_far *= first_stride
            units = []
            for unit_idx in range(num_units):
                units.append(
                    IdentityResidualBlock(
                        channels_in,
                        channels,
                        stride=first_stride if unit_idx == 0 else 1,
                        dilation=dilation,
                        norm=norm,
                        activation=activation,
                        dropout=dropout[mod_idx - 4] if mod_idx >= 4 else 0.0,
                        deform=deform_on_per_stage[mod_idx],
                        deform_modulated=deform_modulated,
                        deform_groups=deform_groups,
                    )
                )
                channels_in = channels[-1]
            stage = nn.Sequential()
            for unit_idx, unit in enumerate(units):
                stage.add_module(f"block{unit_idx + 1}", unit)
            self.add_module(name, stage)
            feature = module_to_feature.get(name)
            if feature in self._out_features:
                self._out_feature_strides[feature] = stride_so_far
                self._out_feature_channels[feature] = channels_in
                # res5 uses Mapillary's name for the final norm so that its weights load.
                norm_name = "bn_out" if feature == "res5" else f"bn_out_{feature}"
                self.add_module(norm_name, get_norm(norm, channels_in))
        self._act = act
        self._feature_of_module = module_to_feature
        self._last_module = max(int(_FEATURE_MODULES[f][3:]) for f in self._out_features)
        self.freeze(freeze_at)

    def forward(self, x):
        assert x.dim() == 4, f"WideResNet38 takes an input of shape (N, C, H, W); got {x.shape}"
        outputs = {}
        x = self.mod1.conv1(x)
        for idx in range(2, self._last_module + 1):
            if idx in (2, 3):
                x = getattr(self, f"pool{idx}")(x)
            x = getattr(self, f"mod{idx}")(x)
            feature = self._feature_of_module.get(f"mod{idx}")
            if feature in self._out_features:
                norm = self.bn_out if feature == "res5" else getattr(self, f"bn_out_{feature}")
                outputs[feature] = self._act(norm(x))
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def freeze(self, freeze_at=0):
        """Freeze everything up to res{freeze_at}; see ``freeze_at`` in ``__init__``."""
        if freeze_at >= 1:
            for p in self.mod1.parameters():
                p.requires_grad = False
        last_frozen_module = {0: 1, 1: 2}.get(freeze_at, None)
        if last_frozen_module is None:
            last_frozen_module = int(_FEATURE_MODULES[f"res{min(freeze_at, 5)}"][3:])
        for idx in range(2, last_frozen_module + 1):
            for unit in getattr(self, f"mod{idx}").children():
                unit.freeze()
        return self


def convert_mapillary_checkpoint(src, dst):
    """
    Convert Mapillary's ImageNet WRN-38 checkpoint (``wide_resnet38_ipabn_lr_256.pth.tar`` of
    github.com/mapillary/inplace_abn) into a Detectron2 ``.pkl`` for ``MODEL.WEIGHTS``. Parameter
    names are already ours; this drops the ``module.`` prefix and the ImageNet classifier and lets
    Detectron2 match the names under ``backbone.bottom_up.`` by suffix. Untested against the real
    file (not available here). Note: in-place ABN >= 1.0 uses ``|weight| + eps`` as the BN scale;
    checkpoints of that version need ``abs`` applied to the ``bn*.weight`` tensors.
    """
    state = torch.load(src, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    model = {}
    for name, tensor in state.items():
        name = name[len("module."):] if name.startswith("module.") else name
        if name.startswith("classifier") or name.endswith("num_batches_tracked"):
            continue
        model[name] = tensor.numpy()
    with open(dst, "wb") as f:
        pickle.dump(
            {"model": model, "__author__": "mapillary/inplace_abn", "matching_heuristics": True}, f
        )
    return dst


@BACKBONE_REGISTRY.register()
def build_wide_resnet38_backbone(cfg, input_shape):
    """WideResNet-38 from MODEL.WRN (declared by ``add_wrn_config``) and MODEL.BACKBONE.FREEZE_AT."""
    wrn = cfg.MODEL.WRN
    return WideResNet38(
        in_channels=input_shape.channels,
        structure=wrn.STRUCTURE,
        width_divisor=wrn.WIDTH_DIVISOR,
        norm=wrn.NORM,
        activation=wrn.ACTIVATION,
        dilated=wrn.DILATED,
        dropout=wrn.DROPOUT,
        deform_on_per_stage=wrn.DEFORM_ON_PER_STAGE,
        deform_modulated=wrn.DEFORM_MODULATED,
        deform_groups=wrn.DEFORM_NUM_GROUPS,
        out_features=wrn.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


@BACKBONE_REGISTRY.register()
def build_wide_resnet38_fpn_backbone(cfg, input_shape):
    """WideResNet-38 + Detectron2's FPN (MODEL.FPN) with P6 by max-pooling P5."""
    return fpn_from_config(cfg, build_wide_resnet38_backbone(cfg, input_shape))
