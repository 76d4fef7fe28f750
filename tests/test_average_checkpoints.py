"""Checkpoint averaging (levelset_d2.checkpoint.average_checkpoints, tools/average_checkpoints.py): the averaged
file holds the element-wise mean of the checkpoints' weights and loads into the model as MODEL.WEIGHTS; files of
different models are refused, naming the file."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from levelset_d2.checkpoint import SafeDetectionCheckpointer, UnsafeCheckpointError, average_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def _save(path, fill, iteration):
    """A Detectron2-style checkpoint of _model() with every float tensor set to ``fill``."""
    model = _model()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(fill)
    model[1].num_batches_tracked.fill_(iteration)
    torch.save({"model": model.state_dict(), "iteration": iteration, "optimizer": {}}, path)
    return str(path)


def test_the_average_is_the_elementwise_mean_and_loads_as_weights(tmp_path):
    paths = [_save(tmp_path / f"model_{i:07d}.pth", fill, i) for i, fill in ((199, 1.0), (399, 2.0), (599, 6.0))]
    out = tmp_path / "model_avg.pth"
    subprocess.run([sys.executable, "tools/average_checkpoints.py", "--last", "3", str(tmp_path), "--output", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    model = _model()
    SafeDetectionCheckpointer(model).load(str(out))
    state = model.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(state[name], torch.full_like(state[name], 3.0)), name  # (1 + 2 + 6) / 3
    assert int(state["1.num_batches_tracked"]) == 599  # an integer counter: the last checkpoint's
    saved = torch.load(out, weights_only=True)
    assert saved["averaged_from"] == paths


def test_last_ignores_model_final_and_needs_enough_checkpoints(tmp_path):
    for i, fill in ((199, 1.0), (399, 3.0)):
        _save(tmp_path / f"model_{i:07d}.pth", fill, i)
    _save(tmp_path / "model_final.pth", 100.0, 399)
    out = tmp_path / "avg.pth"
    subprocess.run([sys.executable, "tools/average_checkpoints.py", "--last", "2", str(tmp_path), "--output", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    assert torch.equal(torch.load(out, weights_only=True)["model"]["0.bias"], torch.full((2,), 2.0))
    proc = subprocess.run([sys.executable, "tools/average_checkpoints.py", "--last", "3", str(tmp_path), "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "has 2 numbered checkpoints" in proc.stderr


def test_checkpoints_of_different_models_are_refused_by_name(tmp_path):
    a = _save(tmp_path / "a.pth", 1.0, 1)
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))  # 3 channels: other shapes
    torch.save({"model": other.state_dict()}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"b\.pth: 0\.weight has shape \(3, 1, 3, 3\)"):
        average_checkpoints([a, str(tmp_path / "b.pth")])
    torch.save({"weights": {}}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"c\.pth: not a Detectron2 checkpoint"):
        average_checkpoints([a, str(tmp_path / "c.pth")])
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([a])


RAN = []


def _record(what):
    RAN.append(what)


class _Payload:
    """Unpickling it calls _record: code that a checkpoint must not be able to run."""

    def __reduce__(self):
        return _record, ("unpickled",)


def test_a_checkpoint_that_would_run_code_is_refused_by_name_unrun(tmp_path):
    a = _save(tmp_path / "a.pth", 1.0, 1)
    torch.save({"model": _model().state_dict(), "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth is not a plain tensor checkpoint"):
        average_checkpoints([a, str(tmp_path / "evil.pth")])
    assert RAN == []
    proc = subprocess.run([sys.executable, "tools/average_checkpoints.py", a, str(tmp_path / "evil.pth"), "--output",
                           str(tmp_path / "avg.pth")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "evil.pth is not a plain tensor checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "avg.pth").exists()
