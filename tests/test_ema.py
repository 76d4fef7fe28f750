"""SOLVER.EMA: the exponential moving average of the weights (levelset_d2.ema.EMAHook).

Expected values are the recurrence W_ema(1) = W(1), W_ema(t) = d * W_ema(t - 1) + (1 - d) * W(t), evaluated
here by hand on weights set to known values; train_net's wiring and its resume are in test_resume.py.
"""
import types

import pytest
import torch

from levelset_d2.checkpoint import SafeDetectionCheckpointer
from levelset_d2.config import get_cfg
from levelset_d2.ema import EMA_WEIGHTS_FILE, EMAHook


def _model_with_weight(value, model=None):
    model = model or torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(value)
        model[1].running_mean.fill_(10 * value)
    return model


def test_the_average_follows_the_recurrence_over_parameters_and_batch_norm_statistics(tmp_path):
    model = _model_with_weight(-100.0)  # the weights at construction never enter the average
    checkpointer = SafeDetectionCheckpointer(model, save_dir=str(tmp_path))
    hook = EMAHook(model, 0.9, checkpointer, str(tmp_path))
    hook.trainer = types.SimpleNamespace(iter=2, max_iter=3)
    for value in (1.0, 2.0, 4.0):
        _model_with_weight(value, model)
        hook.after_step()
    expected = 0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 4.0  # 1.39
    assert hook.ema.module[0].weight.flatten().tolist() == pytest.approx([expected] * 2)
    assert hook.ema.module[1].running_mean.item() == pytest.approx(10 * expected)
    assert model[0].weight[0, 0].item() == 4.0  # the trained model is untouched

    checkpointer.save("model_0000002")  # the average travels in the training checkpoint ...
    hook.after_train()  # ... and becomes a weights file after the last iteration
    final = torch.load(tmp_path / EMA_WEIGHTS_FILE, weights_only=True)
    assert final["model"]["0.weight"].flatten().tolist() == pytest.approx([expected] * 2)
    assert final["iteration"] == 2 and final["ema_updates"] == 3

    # A resume restores it: a fresh hook (its own copy at -100) reads the checkpoint's average.
    model2 = _model_with_weight(-100.0)
    checkpointer2 = SafeDetectionCheckpointer(model2, save_dir=str(tmp_path))
    hook2 = EMAHook(model2, 0.9, checkpointer2, str(tmp_path))
    checkpointer2.resume_or_load("", resume=True)
    assert hook2.ema.module[0].weight[0, 0].item() == pytest.approx(expected)
    _model_with_weight(8.0, model2)
    hook2.after_step()
    assert hook2.ema.module[0].weight[0, 0].item() == pytest.approx(0.9 * expected + 0.8)


def test_an_interrupted_run_writes_no_final_average(tmp_path):
    model = _model_with_weight(1.0)
    hook = EMAHook(model, 0.9, SafeDetectionCheckpointer(model, save_dir=str(tmp_path)), str(tmp_path))
    hook.trainer = types.SimpleNamespace(iter=4, max_iter=10)  # after_train after an exception at 4
    hook.after_step()
    hook.after_train()
    assert not (tmp_path / EMA_WEIGHTS_FILE).exists()


def test_config_declares_the_keys_and_a_decay_of_one_is_refused(tmp_path):
    cfg = get_cfg()
    assert cfg.SOLVER.EMA.ENABLED is False and 0.0 < cfg.SOLVER.EMA.DECAY < 1.0
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        EMAHook(model, 1.0, SafeDetectionCheckpointer(model), str(tmp_path))


@pytest.mark.parametrize("iters, warns", [(100, True), (800, False)])
def test_a_run_too_short_for_its_average_is_warned_about(tmp_path, caplog, iters, warns):
    """0.995 ** 99 = 0.61 of the first iteration's weights left after 100 iterations (warned: the average is
    mostly the start); 0.995 ** 799 = 0.018 after 800 (not warned)."""
    model = _model_with_weight(1.0)
    hook = EMAHook(model, 0.995, SafeDetectionCheckpointer(model, save_dir=str(tmp_path)), str(tmp_path))
    hook.trainer = types.SimpleNamespace(start_iter=0, max_iter=iters)
    with caplog.at_level("WARNING", logger="levelset_d2.ema"):
        hook.before_train()
    assert ("61%" in caplog.text) if warns else caplog.text == ""
