"""WideResNet-38, torchvision deformable convolution and PANet (levelset_rcnn.backbone), on CPU."""
import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg as get_detectron2_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone

from levelset_rcnn.backbone import (
    DeformConv2dPack,
    PANetFPN,
    WideResNet38,
    add_wrn_config,
    build_resnet_tv_deform_backbone,
)
from levelset_rcnn.backbone.wide_resnet import IdentityResidualBlock

TINY_WRN = dict(structure=[1, 1, 1, 1, 1, 1], width_divisor=16, norm="BN")


FPN_OUT = ["p2", "p3", "p4", "p5", "p6"]


@pytest.mark.parametrize("name, cls, outputs", [
    ("build_resnet_tv_deform_backbone", ResNet, ["res2", "res3", "res4", "res5"]),
    ("build_resnet_tv_deform_fpn_backbone", FPN, FPN_OUT),
    ("build_resnet_panet_backbone", PANetFPN, FPN_OUT),
    ("build_wide_resnet38_backbone", WideResNet38, ["res2", "res3", "res4", "res5"]),
    ("build_wide_resnet38_fpn_backbone", FPN, FPN_OUT),
    ("build_wide_resnet38_panet_backbone", PANetFPN, FPN_OUT),
])
def test_each_registered_backbone_builds_from_the_config(name, cls, outputs):
    cfg = tiny_resnet_cfg([False, False, False, True], modulated=False)
    add_wrn_config(cfg)
    cfg.MODEL.WRN.STRUCTURE, cfg.MODEL.WRN.WIDTH_DIVISOR, cfg.MODEL.WRN.NORM = [1] * 6, 16, "BN"
    model = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3))
    assert type(model) is cls
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert list(out) == outputs
    assert {k: v.shape[-1] for k, v in out.items()} == {k: 64 // s.stride for k, s in model.output_shape().items()}


def test_wrn38_full_layout_on_meta_device():
    """The real WRN-38 (no allocation: meta tensors): units, widths, strides, parameter count."""
    with torch.device("meta"):
        model = WideResNet38()
        out = model(torch.empty(1, 3, 1024, 2048))
    units = {f"mod{i}": list(getattr(model, f"mod{i}").children()) for i in range(2, 8)}
    assert [len(u) for u in units.values()] == [3, 3, 6, 3, 1, 1]
    widths = [[c.out_channels for c in (u.convs.conv1, u.convs.conv2, getattr(u.convs, "conv3", None))
               if c is not None] for u in (m[0] for m in units.values())]
    assert widths == [[128, 128], [256, 256], [512, 512], [512, 1024], [512, 1024, 2048],
                      [1024, 2048, 4096]]
    assert [u[0].is_bottleneck for u in units.values()] == [False] * 4 + [True] * 2
    assert model.mod1.conv1.out_channels == 64 and model.mod1.conv1.stride == (1, 1)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 256, 256, 512), "res3": (1, 512, 128, 256),
        "res4": (1, 1024, 64, 128), "res5": (1, 4096, 32, 64),
    }
    assert {k: (s.channels, s.stride) for k, s in model.output_shape().items()} == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (4096, 32)}
    # Convolutions alone (sum over the table of the module docstring): 105.0 M weights.
    conv_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 4)
    assert 104.5e6 < conv_params < 105.5e6
    # Parameter names are those of Mapillary's WiderResNetA2, so its checkpoint maps one to one.
    names = set(model.state_dict())
    assert {"mod1.conv1.weight", "mod2.block1.bn1.running_var", "mod2.block1.convs.conv1.weight",
            "mod2.block1.proj_conv.weight", "mod6.block1.convs.bn3.weight",
            "mod7.block1.convs.conv3.weight", "bn_out.weight"} <= names


def test_wrn38_tiny_forward_backward_and_dilated_layout():
    torch.manual_seed(0)
    model = WideResNet38(**TINY_WRN, deform_on_per_stage=[False, False, False, True, True, True])
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    out = model(x)
    for name, spec in model.output_shape().items():
        assert out[name].shape == (2, spec.channels, 64 // spec.stride, 96 // spec.stride)
    assert isinstance(model.mod5.block1.convs.conv1, DeformConv2dPack)  # basic unit: both 3x3
    assert isinstance(model.mod7.block1.convs.conv2, DeformConv2dPack)  # bottleneck: the 3x3
    assert not isinstance(model.mod4.block1.convs.conv1, DeformConv2dPack)
    sum(o.square().mean() for o in out.values()).backward()
    assert x.grad.abs().sum() > 0
    assert model.mod1.conv1.weight.grad.abs().sum() > 0
    assert model.mod7.block1.convs.conv2.conv_offset.weight.grad.abs().sum() > 0

    dilated = WideResNet38(**TINY_WRN, dilated=True)
    assert dilated.mod7.block1.convs.conv2.dilation == (4, 4)
    assert {k: s.stride for k, s in dilated.output_shape().items()} == {
        "res2": 4, "res3": 8, "res4": 8, "res5": 8}
    assert {k: v.shape[-2:] for k, v in dilated(x).items()} == {
        "res2": (16, 24), "res3": (8, 12), "res4": (8, 12), "res5": (8, 12)}


def test_pre_activation_unit():
    """out = x + conv2(act(bn2(conv1(act(bn1(x)))))) with identity shortcut; 1x1 projection else."""
    torch.manual_seed(0)
    unit = IdentityResidualBlock(8, (8, 8), norm="BN", activation="relu").eval()
    x = torch.randn(2, 8, 6, 6)
    c = unit.convs
    expected = x + c.conv2(F.relu(c.bn2(c.conv1(F.relu(unit.bn1(x))))))
    assert unit.proj_conv is None and torch.allclose(unit(x), expected, atol=1e-6)
    unit = IdentityResidualBlock(8, (4, 8, 16), stride=2, norm="BN").eval()
    assert unit(x).shape == (2, 16, 3, 3) and unit.proj_conv.stride == (2, 2)


def test_wrn38_freeze_at():
    model = WideResNet38(**TINY_WRN, freeze_at=2)  # mod1..mod3 (up to res2)
    for i in (2, 3):
        assert not any(p.requires_grad for p in getattr(model, f"mod{i}").parameters())
        assert isinstance(getattr(model, f"mod{i}").block1.bn1, FrozenBatchNorm2d)
    assert not model.mod1.conv1.weight.requires_grad
    assert all(p.requires_grad for p in model.mod4.parameters())
    assert isinstance(model.mod4.block1.bn1, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv_at_init_is_plain_conv(modulated):
    """Zero offsets at init: DCNv1 equals conv2d; DCNv2's mask is sigmoid(0) = 0.5 everywhere."""
    torch.manual_seed(0)
    conv = DeformConv2dPack(6, 5, 3, stride=2, padding=2, dilation=2, bias=True, modulated=modulated)
    x = torch.randn(2, 6, 11, 13)
    ref = F.conv2d(x, conv.weight, None, stride=2, padding=2, dilation=2)
    scale = 0.5 if modulated else 1.0
    assert torch.allclose(conv(x), scale * ref + conv.bias[:, None, None], atol=1e-5)


def test_deform_conv_offsets_shift_sampling_and_gradients():
    torch.manual_seed(0)
    conv = DeformConv2dPack(4, 3, 3, padding=1, modulated=False)
    with torch.no_grad():
        conv.conv_offset.bias[1::2] = 1.0  # (dy, dx) per kernel tap: dx = +1 pixel everywhere
    x = torch.randn(1, 4, 9, 10, requires_grad=True)
    out = conv(x)
    ref = F.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(out[..., :-1], ref[..., 1:], atol=1e-5)  # = conv of x shifted left by 1
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0
    assert conv.conv_offset.weight.grad.abs().sum() > 0  # offsets are learnt from the loss

    mod = DeformConv2dPack(4, 3, 3, padding=1, modulated=True)
    mod(x).sum().backward()
    assert mod.conv_offset.weight.grad.abs().sum() > 0
    assert mod(x[:0]).shape == (0, 3, 9, 10)  # empty batch


def tiny_resnet_cfg(deform_on_per_stage, modulated):
    cfg = get_detectron2_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = deform_on_per_stage
    cfg.MODEL.RESNETS.DEFORM_MODULATED = modulated
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    return cfg


def test_resnet_tv_deform_matches_plain_resnet_at_init():
    torch.manual_seed(0)
    cfg = tiny_resnet_cfg([False, False, True, True], modulated=False)
    deform = build_resnet_tv_deform_backbone(cfg, ShapeSpec(channels=3)).eval()
    plain = build_resnet_backbone(tiny_resnet_cfg([False] * 4, False), ShapeSpec(channels=3)).eval()
    assert all(isinstance(b.conv2, DeformConv2dPack) for b in deform.res4)
    assert not any(isinstance(b.conv2, DeformConv2dPack) for b in deform.res3)
    # Checkpoint names of the plain ResNet are unchanged; only conv_offset is new.
    extra = set(deform.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(deform.state_dict())
    assert extra and all(".conv2.conv_offset." in k for k in extra)
    deform.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    a, b = deform(x), plain(x)
    for name in ["res2", "res3", "res4", "res5"]:
        assert torch.allclose(a[name], b[name], atol=1e-4, rtol=1e-4), name


def test_panet_bottom_up_path():
    torch.manual_seed(0)
    bottom_up = WideResNet38(**TINY_WRN)
    fpn_args = dict(in_features=["res2", "res3", "res4", "res5"], out_channels=16)
    panet = PANetFPN(bottom_up, top_block=LastLevelMaxPool(), **fpn_args).eval()
    fpn = FPN(bottom_up, top_block=LastLevelMaxPool(), **fpn_args).eval()
    fpn.load_state_dict(panet.state_dict(), strict=False)  # same FPN weights
    x = torch.randn(1, 3, 64, 128)
    n, p = panet(x), fpn(x)
    assert list(n) == ["p2", "p3", "p4", "p5", "p6"]
    assert {k: s.stride for k, s in panet.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    for k in n:
        assert n[k].shape == p[k].shape
    assert torch.equal(n["p2"], p["p2"])  # N2 = P2
    # PANet's bottom-up path written out with F.conv2d on the checkpoint's weights:
    # N_i = relu(conv3x3(relu(conv3x3_stride2(N_{i-1})) + P_i)), N2 = P2 (Liu et al. 2018, fig. 2).
    state = panet.state_dict()

    def conv(x, name, stride):
        return F.relu(F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], stride=stride, padding=1))

    expected = p["p2"]
    for i in (3, 4, 5):
        expected = conv(conv(expected, f"pan_down{i}", 2) + p[f"p{i}"], f"pan_output{i}", 1)
        assert torch.allclose(n[f"p{i}"], expected, atol=1e-5), i
        assert not torch.allclose(n[f"p{i}"], p[f"p{i}"])
    assert torch.equal(n["p6"], F.max_pool2d(n["p5"], 1, stride=2))  # P6 from N5
    assert len([k for k in panet.state_dict() if k.startswith("pan_")]) == 3 * 2 * 2  # w, b


def test_panet_builders_from_config():
    cfg = tiny_resnet_cfg([False, False, False, True], modulated=True)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_panet_backbone"
    model = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))
    assert isinstance(model, PANetFPN) and isinstance(model.bottom_up.res5[0].conv2, DeformConv2dPack)
    out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2), (1, 16, 1, 1)]

    add_wrn_config(cfg)
    cfg.MODEL.WRN.STRUCTURE, cfg.MODEL.WRN.WIDTH_DIVISOR = [1] * 6, 16  # NORM: SyncBN default
    cfg.MODEL.WRN.DEFORM_ON_PER_STAGE = [False] * 5 + [True]
    for name, cls in [("build_wide_resnet38_fpn_backbone", FPN),
                      ("build_wide_resnet38_panet_backbone", PANetFPN)]:
        model = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3))
        assert type(model) is cls and isinstance(model.bottom_up, WideResNet38)
        assert isinstance(model.bottom_up.mod7.block1.convs.conv2, DeformConv2dPack)
        assert isinstance(model.bottom_up.mod2.block1.bn1, torch.nn.SyncBatchNorm)
        assert list(model.eval()(torch.randn(1, 3, 64, 64))) == ["p2", "p3", "p4", "p5", "p6"]
