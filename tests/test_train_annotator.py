"""tools/train_annotator.py: trains DELSE on a user's COCO json (registered under its own name, not the
config's dataset), fine-tunes it interactively from those weights, and prints the delse-serve line that
serves the fine-tuned weights."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trains_on_a_users_json_and_prints_the_serve_line(tmp_path, coco_sample_dir):
    out = tmp_path / "annotator"
    cmd = [sys.executable, "tools/train_annotator.py", "--config-file", "configs/DELSE/tiny_delse_coco_sample.yaml",
           "--json", str(coco_sample_dir / "instances_val2017_subset.json"), "--image-root",
           str(coco_sample_dir / "images"), "--output-dir", str(out), "--interactive-iters", "2",
           "SOLVER.MAX_ITER", "3", "MODEL.DELSE.PRETRAIN_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
           "SOLVER.EMA.ENABLED", "True"]  # each stage continues from, and serves, the moving average
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, weights = out / "model_final_ema.pth", out / "interactive/model_final_ema.pth"
    base_sd = torch.load(base, map_location="cpu", weights_only=True)["model"]
    tuned_sd = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert set(base_sd) == set(tuned_sd)  # the same model, trained further
    assert any(not torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd)
    for run, iters in [(out, 3), (out / "interactive", 2)]:
        saved = yaml.safe_load((run / "config.yaml").read_text())  # the run's config, as default_setup wrote it
        assert list(saved["DATASETS"]["TRAIN"]) == ["annotator_train"] and list(saved["DATASETS"]["TEST"]) == []
        assert saved["SOLVER"]["MAX_ITER"] == iters
    assert saved["MODEL"]["WEIGHTS"] == str(base)
    assert saved["MODEL"]["DELSE"]["CORRECTION_MODE"] == "motion_editing" and saved["MODEL"]["DELSE"]["NUM_CORRECTIONS"] == 3
    line = [l for l in proc.stdout.splitlines() if l.strip().startswith("delse-serve")][-1]
    words = shlex.split(line)
    assert words[words.index("--weights") + 1] == str(weights)
    assert words[-2:] == ["MODEL.DELSE.DRAG_EDIT", "result"]


def test_the_served_weights_are_the_moving_average_where_the_run_keeps_one(import_tool, tmp_path):
    trained_weights = import_tool(".", "train_annotator").trained_weights
    config = REPO / "configs/DELSE/delse_R_50_coco128.yaml"
    out = ["OUTPUT_DIR", str(tmp_path)]
    assert trained_weights(config, out) == tmp_path / "model_final.pth"
    assert trained_weights(config, out + ["SOLVER.EMA.ENABLED", "True"]) == tmp_path / "model_final_ema.pth"


def test_interactive_stage_is_the_interactive_config(import_tool):
    """The tool's interactive overrides, applied to the R-50 config, give what
    configs/DELSE/delse_R_50_coco128_interactive.yaml declares (one recipe, two ways to run it)."""
    import delse
    interactive_opts = import_tool(".", "train_annotator").interactive_opts

    from_yaml = delse.get_cfg()
    from_yaml.merge_from_file(str(REPO / "configs/DELSE/delse_R_50_coco128_interactive.yaml"))
    from_tool = delse.get_cfg()
    from_tool.merge_from_file(str(REPO / "configs/DELSE/delse_R_50_coco128.yaml"))
    from_tool.merge_from_list(interactive_opts(from_yaml.MODEL.WEIGHTS, from_yaml.SOLVER.MAX_ITER))
    assert from_tool.MODEL.DELSE == from_yaml.MODEL.DELSE
    assert from_tool.SOLVER == from_yaml.SOLVER


def test_json_without_image_root_is_refused():
    proc = subprocess.run([sys.executable, "tools/train_annotator.py", "--json", "x.json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--json and --image-root go together" in proc.stderr
