"""``make pretrained``: the ImageNet R-50 converted from the npm package, checked against facts that do
not come from the converter: the algebra of conv + bias + Keras batch norm (PyTorch's own batch norm),
every tensor of Detectron2's R-50 loaded from the file, and ImageNet classes of real COCO photos.

Needs ``pretrained/R-50.pkl`` (``make test`` runs ``make pretrained`` first); elsewhere the file-based
tests skip, and under CI they fail.
"""
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_resnet_backbone
from detectron2.utils.file_io import PathManager
from levelset_d2.checkpoint import SafeDetectionCheckpointer
from levelset_d2.datasets import shared_data_root
from levelset_d2.pretrained import (DEFAULT_OUT, DETECTRON2_URL, KERAS_BN_EPS, convert, iopath_cache_target,
                                    place_in_cache)

PKL = DEFAULT_OUT / "R-50.pkl"
COCO_IMAGES = shared_data_root() / "coco_val2017_sample" / "images"


def _need(path: Path, why: str):
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing under CI: {why}")
        pytest.skip(f"{path} missing: {why}")


def test_conversion_matches_conv_bias_and_keras_batch_norm():
    """A Keras conv (with bias) + batch norm (eps 1e-3), run by PyTorch, equals the converted bias-free
    conv times the scale plus the shift, as Detectron2's frozen batch norm applies them."""
    rng = np.random.default_rng(0)
    keras = {}

    def layer(conv, bn, k, cin, cout):
        keras[f"{conv}/kernel"] = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
        keras[f"{conv}/bias"] = rng.normal(size=cout).astype(np.float32)
        keras[f"{bn}/gamma"] = rng.uniform(0.5, 2, cout).astype(np.float32)
        keras[f"{bn}/beta"] = rng.normal(size=cout).astype(np.float32)
        keras[f"{bn}/moving_mean"] = rng.normal(size=cout).astype(np.float32)
        keras[f"{bn}/moving_variance"] = rng.uniform(1e-4, 3, cout).astype(np.float32)  # small: eps matters

    layer("conv1", "bn_conv1", 7, 3, 4)
    layer("res2a_branch2b", "bn2a_branch2b", 3, 4, 5)
    keras["fc1000/kernel"] = rng.normal(size=(5, 10)).astype(np.float32)
    keras["fc1000/bias"] = rng.normal(size=10).astype(np.float32)
    c2 = convert(keras)
    assert set(c2) == {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "res2_0_branch2b_w", "res2_0_branch2b_bn_s",
                       "res2_0_branch2b_bn_b", "fc1000_w", "fc1000_b"}
    x = torch.tensor(rng.normal(size=(1, 4, 9, 9)), dtype=torch.float64)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    # Keras layout [kh, kw, in, out]; its "same" 3x3 conv at stride 1 pads 1 on each side.
    ref = F.conv2d(x, t(keras["res2a_branch2b/kernel"]).permute(3, 2, 0, 1), t(keras["res2a_branch2b/bias"]), padding=1)
    ref = F.batch_norm(ref, t(keras["bn2a_branch2b/moving_mean"]), t(keras["bn2a_branch2b/moving_variance"]),
                       t(keras["bn2a_branch2b/gamma"]), t(keras["bn2a_branch2b/beta"]), eps=KERAS_BN_EPS)
    got = F.conv2d(x, t(c2["res2_0_branch2b_w"]), padding=1)
    got = got * t(c2["res2_0_branch2b_bn_s"])[:, None, None] + t(c2["res2_0_branch2b_bn_b"])[:, None, None]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(c2["fc1000_w"], keras["fc1000/kernel"].T)


@pytest.fixture(scope="module")
def r50():
    """Detectron2's R-50 (FrozenBN, res5 out) built at a fixed seed, and its state before loading."""
    _need(PKL, "run `make pretrained`")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    torch.manual_seed(0)
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SafeDetectionCheckpointer(model).load(DETECTRON2_URL)  # resolves offline, through iopath's cache
    return model, before


def test_detectron2_url_resolves_to_the_converted_file():
    _need(PKL, "run `make pretrained`")
    entry = iopath_cache_target()
    if not entry.is_symlink() and entry.is_file() and not entry.with_name(entry.name + ".converted.json").is_file():
        pytest.skip(f"{entry} is a real R-50.pkl downloaded earlier; `make pretrained` leaves it alone")
    local = Path(PathManager.get_local_path(DETECTRON2_URL))
    assert local.is_file() and not local.is_symlink(), f"{local}: run `make pretrained`"
    assert local.read_bytes() == PKL.read_bytes()


def test_cache_entry_outlives_its_checkout_follows_new_conversions_and_spares_real_downloads(tmp_path):
    # Checkout A runs `make pretrained`, then is deleted (a CI clone): checkout B must still resolve the URL.
    a, b = tmp_path / "a" / "R-50.pkl", tmp_path / "b" / "R-50.pkl"
    for p, text in ((a, b"conversion 1"), (b, b"conversion 1")):
        p.parent.mkdir()
        p.write_bytes(text)
    entry = tmp_path / "cache" / "R-50.pkl"
    assert "placed" in place_in_cache(a, entry)
    a.unlink()
    a.parent.rmdir()
    assert entry.read_bytes() == b"conversion 1" and not entry.is_symlink()
    assert "already in place" in place_in_cache(b, entry)
    # A changed conversion (rebuilt with os.replace, as ensure_r50 writes) replaces the entry this function placed.
    tmp = b.with_suffix(".tmp")
    tmp.write_bytes(b"conversion 2")
    tmp.replace(b)
    assert "replacing an earlier conversion" in place_in_cache(b, entry)
    assert entry.read_bytes() == b"conversion 2"
    # A symlink left by earlier versions (here dangling: its checkout is gone) is replaced by the bytes.
    entry.unlink()
    entry.symlink_to(tmp_path / "deleted" / "R-50.pkl")
    assert "replacing the symlink" in place_in_cache(b, entry)
    assert entry.read_bytes() == b"conversion 2" and not entry.is_symlink()
    # A real download (no marker beside it) is never replaced.
    entry.unlink()
    entry.with_name("R-50.pkl.converted.json").unlink()
    entry.write_bytes(b"downloaded")
    assert "left alone" in place_in_cache(b, entry)
    assert entry.read_bytes() == b"downloaded"


def test_every_backbone_tensor_is_loaded(r50):
    model, before = r50
    with open(PKL, "rb") as f:
        blobs = pickle.load(f)
    state = model.state_dict()
    weights = [k for k in state if not k.endswith(("running_mean", "running_var"))]
    # 53 convs (stem, 16 blocks x 3, 4 shortcuts), each with a frozen norm's scale and shift.
    assert len(weights) == 53 * 3 == len(blobs) - 2  # all but fc1000_{w,b}
    for k in weights:
        assert not torch.equal(state[k], before[k]), f"{k} left at its initialisation"
    stage, block = 4, 5  # one tensor of each kind, compared by hand-written name
    np.testing.assert_array_equal(state[f"res{stage}.{block}.conv2.weight"].numpy(), blobs[f"res{stage}_{block}_branch2b_w"])
    np.testing.assert_array_equal(state[f"res{stage}.{block}.conv2.norm.weight"].numpy(), blobs[f"res{stage}_{block}_branch2b_bn_s"])
    np.testing.assert_array_equal(state["stem.conv1.norm.bias"].numpy(), blobs["res_conv1_bn_b"])


# ImageNet-1k class indices (the standard ordering), facts about the photos of the shared COCO sample:
ELEPHANT = {101, 385, 386}  # tusker, Indian elephant, African elephant
PORTABLE_COMPUTER = {508, 620, 681}  # computer keyboard, laptop, notebook computer
DESK = {508, 673}  # computer keyboard, mouse
EXPECTED = {
    "000000166563.jpg": (ELEPHANT, ELEPHANT),  # (top-1 in, top-3 within) for an elephant photo
    "000000182202.jpg": (PORTABLE_COMPUTER, PORTABLE_COMPUTER),  # laptop on a table
    "000000409630.jpg": (DESK, DESK),  # keyboard and mouse
}


def _top3(model, name):
    """ImageNet top-3 classes of a photo, with Keras's ResNet-50 preprocessing (the whole photo resized
    to 224 x 224, BGR, mean subtracted), global average pooling and the file's fc1000."""
    with open(PKL, "rb") as f:
        blobs = pickle.load(f)
    image = cv2.resize(cv2.imread(str(COCO_IMAGES / name)), (224, 224)).astype(np.float32)
    x = torch.from_numpy(image - np.array([103.53, 116.28, 123.675], np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = model(x)["res5"].mean((2, 3)) @ torch.from_numpy(blobs["fc1000_w"]).T + torch.from_numpy(blobs["fc1000_b"])
    return logits[0].topk(3).indices.tolist()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_converted_network_classifies_real_photos(r50, name):
    _need(COCO_IMAGES / name, "the shared COCO sample")
    top3 = _top3(r50[0], name)
    top1_set, top3_set = EXPECTED[name]
    assert top3[0] in top1_set, (name, top3)
    assert len(set(top3) & top3_set) >= 1, (name, top3)


def test_a_random_network_does_not_classify_them(r50):
    """The control: the same photos through the freshly initialised weights are not recognised."""
    _need(COCO_IMAGES, "the shared COCO sample")
    _, before = r50
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    fresh = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    fresh.load_state_dict(before)
    assert sum(_top3(fresh, name)[0] in top1_set for name, (top1_set, _) in EXPECTED.items()) == 0
