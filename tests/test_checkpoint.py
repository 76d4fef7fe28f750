"""Checkpoints: atomic saves (a kill mid-save leaves the previous one loadable) and safe loading."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from levelset_d2.checkpoint import SafeDetectionCheckpointer, UnsafeCheckpointError, WeightsUnavailableError


class _Payload:
    """Pickles into a call of os.system that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))


def test_save_is_atomic_when_killed_mid_write(tmp_path, monkeypatch):
    model = _model(0)
    ckpt = SafeDetectionCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):  # write a truncated file, then "get killed"
        real_save(obj, f)
        f.truncate(100)
        raise KeyboardInterrupt("killed during save")

    with torch.no_grad():
        model[0].weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert not (tmp_path / "model_0000002.pth").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no debris
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    fresh = _model(1)
    loaded = SafeDetectionCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        SafeDetectionCheckpointer(_model(0)).load(str(path))
    assert not marker.exists()


def test_malicious_pkl_is_refused_and_model_zoo_pkl_loads(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "y": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        SafeDetectionCheckpointer(_model(0)).load(str(evil))
    assert not marker.exists()

    # A legitimate Detectron2 model-zoo pickle (NumPy arrays) still loads, values intact.
    model = _model(0)
    state = {k: v.numpy() for k, v in _model(3).state_dict().items()}
    good = tmp_path / "zoo.pkl"
    good.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    SafeDetectionCheckpointer(model).load(str(good))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k])


def test_weights_url_that_cannot_be_fetched_names_the_url_and_the_offline_way(tmp_path, monkeypatch):
    # ".invalid" never resolves (RFC 2606): the download fails at once, with or without internet.
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    url = "https://weights.invalid/ImageNetPretrained/R-50.pkl"
    with pytest.raises(WeightsUnavailableError, match=r"weights\.invalid.*make pretrained") as info:
        SafeDetectionCheckpointer(nn.Linear(2, 2)).load(url)
    assert str(tmp_path / "cache") in str(info.value)
    # A local file that is missing keeps Detectron2's own behaviour (no URL involved).
    with pytest.raises(AssertionError, match="not found"):
        SafeDetectionCheckpointer(nn.Linear(2, 2)).load(str(tmp_path / "missing.pth"))


def test_cpu_inference_preparation_keeps_the_outputs():
    """levelset_d2.inference.prepare_for_cpu_inference folds frozen BatchNorm into the convs and makes the
    weights channels-last: the R-50-FPN backbone's outputs are those of the unprepared model (with
    BatchNorm statistics that are not the identity, so a wrong fold shows)."""
    import copy

    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_backbone
    from _configs import tiny_cfg
    from levelset_d2.inference import fold_frozen_batchnorm, prepare_for_cpu_inference

    cfg = tiny_cfg(config="mask_rcnn_R_50_FPN_coco128.yaml")
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n) + 0.5)
            m.bias.copy_(torch.randn(n))
            m.running_mean.copy_(torch.randn(n))
            m.running_var.copy_(torch.rand(n) + 0.1)
    prepared = prepare_for_cpu_inference(copy.deepcopy(backbone))
    assert fold_frozen_batchnorm(prepared) == 0  # all folded already: 53 convs of R-50 carry a norm
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in prepared.modules())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected, got = backbone(x), prepared(x)
    for k in expected:
        scale = expected[k].abs().max()
        assert torch.allclose(got[k], expected[k], rtol=0, atol=1e-4 * float(scale)), k
