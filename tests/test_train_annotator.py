"""tools/train_annotator.py: trains DELSE on a user's COCO json (registered under its own name, not the
config's dataset), restarts it warm from its trained weights, fine-tunes it interactively from the restart's
served weights, and prints the delse-serve line that serves the fine-tuned weights; its default config and
restart are the benchmarked recipe's commands."""
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
           str(coco_sample_dir / "images"), "--output-dir", str(out), "--restart-iters", "2", "--interactive-iters", "2",
           "SOLVER.MAX_ITER", "3", "MODEL.DELSE.PRETRAIN_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
           "SOLVER.EMA.ENABLED", "True", "SEED", "5"]  # stages 1-2 keep a moving average
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, restarted = out / "model_final.pth", out / "restart/model_final_ema.pth"
    weights = out / "interactive/model_final.pth"  # the interactive stage keeps no average (too short)
    state = {w: torch.load(w, map_location="cpu", weights_only=True)["model"] for w in (base, restarted, weights)}
    for a, b in [(base, restarted), (restarted, weights)]:
        assert set(state[a]) == set(state[b])  # the same model, trained further
        assert any(not torch.equal(state[a][k], state[b][k]) for k in state[a])
    # the interactive stage trains the motion-editing block alone (MODEL.DELSE.TRAIN_EDITING_ONLY)
    moved = {k for k in state[restarted] if not torch.equal(state[restarted][k], state[weights][k])}
    assert moved and all(k.startswith("motion_editing.") for k in moved), sorted(moved)[:5]
    for run in (out, out / "restart", out / "interactive"):  # each stage logs once, into its own log.txt
        assert (run / "log.txt").read_text().count("Starting training from iteration") == 1, run
    assert (proc.stdout + proc.stderr).count("Starting training from iteration") == 3  # the console: once a stage
    saved = {}
    for run, iters in [(out, 3), (out / "restart", 2), (out / "interactive", 2)]:
        saved[run.name] = cfg = yaml.safe_load((run / "config.yaml").read_text())  # as default_setup wrote it
        assert list(cfg["DATASETS"]["TRAIN"]) == ["annotator_train"] and list(cfg["DATASETS"]["TEST"]) == []
        assert cfg["SOLVER"]["MAX_ITER"] == iters
    restart, interactive = saved["restart"], saved["interactive"]
    # the restart continues the trained weights (not their average), joint, with its own step and seed
    assert restart["MODEL"]["WEIGHTS"] == str(base) and restart["MODEL"]["DELSE"]["PHASE"] == "joint"
    assert restart["SOLVER"]["STEPS"] == [1] and (saved["annotator"]["SEED"], restart["SEED"]) == (5, 7)
    first = dict(saved["annotator"]["MODEL"]["DELSE"], PHASE="joint", PRETRAIN_ITERS=0)
    assert restart["MODEL"]["DELSE"] == first and not first["TRAIN_EDITING_ONLY"]  # the config's own recipe
    assert interactive["MODEL"]["WEIGHTS"] == str(restarted)
    assert not interactive["SOLVER"]["EMA"]["ENABLED"] and not (out / "interactive/model_final_ema.pth").exists()
    assert interactive["MODEL"]["DELSE"]["CORRECTION_MODE"] == "motion_editing"
    assert interactive["MODEL"]["DELSE"]["NUM_CORRECTIONS"] == 3 and interactive["MODEL"]["DELSE"]["TRAIN_EDITING_ONLY"]
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
    assert trained_weights(config, out + ["SOLVER.EMA.ENABLED", "True"], average=False) == tmp_path / "model_final.pth"


# BENCHMARKS.md section 6's commands for one seed of the recipe (sessions 19, 21, 22), as written there:
# delse_R_50_coco128.yaml with these overrides, then the second command from the first's model_final.pth.
BENCHMARKED = ["SEED", "8", "SOLVER.AMP.ENABLED", "True", "DATASETS.TEST", "()", "DATASETS.TRAIN",
               '("coco128_seg_train_agnostic", "coco128_seg_dev_agnostic")', "SOLVER.CHECKPOINT_PERIOD", "200",
               "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.995"]
BENCHMARKED_1 = BENCHMARKED + ["SOLVER.MAX_ITER", "1800", "SOLVER.STEPS", "(1440,)"]
BENCHMARKED_2 = BENCHMARKED + ["SEED", "10", "MODEL.WEIGHTS", "stage1/model_final.pth", "MODEL.DELSE.PHASE", "joint",
                               "MODEL.DELSE.PRETRAIN_ITERS", "0", "SOLVER.MAX_ITER", "800", "SOLVER.STEPS", "(640,)"]


def test_the_default_annotator_is_the_benchmarked_recipe(import_tool):
    """tools/train_annotator.py SEED 8 (its default config and restart) trains what BENCHMARKS.md section 6's two
    commands trained (every key training reads); the annotator config differs only in what inference reads."""
    tool = import_tool(".", "train_annotator")
    defaults = tool.build_parser().parse_args(["SEED", "8"])
    assert (defaults.config_file, defaults.interactive_iters) == (str(tool.DEFAULT_CONFIG), 200)  # section 7e's
    benchmarked = REPO / "configs/DELSE/delse_R_50_coco128.yaml"
    stage1 = defaults.opts
    seed = tool.run_config(tool.DEFAULT_CONFIG, stage1).SEED
    stage2 = stage1 + tool.restart_opts("stage1/model_final.pth", defaults.restart_iters, seed)
    for ours, theirs in [(stage1, BENCHMARKED_1), (stage2, BENCHMARKED_2)]:
        a, b = tool.run_config(tool.DEFAULT_CONFIG, ours), tool.run_config(benchmarked, theirs)
        assert (a.MODEL.DELSE.DRAG_EDIT, b.MODEL.DELSE.DRAG_EDIT) == ("result", "none")  # inference only
        assert (a.TEST.DELSE.FLIP, b.TEST.DELSE.FLIP) == (True, False)  # inference only
        a.MODEL.DELSE.DRAG_EDIT, a.TEST.DELSE.FLIP = b.MODEL.DELSE.DRAG_EDIT, b.TEST.DELSE.FLIP
        for key in ("MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER", "SEED", "TEST"):
            assert a[key] == b[key], key


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
    # the one difference: the tool trains the editing block alone, the config the whole network (the paper)
    assert (from_tool.MODEL.DELSE.TRAIN_EDITING_ONLY, from_yaml.MODEL.DELSE.TRAIN_EDITING_ONLY) == (True, False)
    from_tool.MODEL.DELSE.TRAIN_EDITING_ONLY = False
    assert from_tool.MODEL.DELSE == from_yaml.MODEL.DELSE
    assert from_tool.SOLVER == from_yaml.SOLVER


def test_json_without_image_root_is_refused():
    proc = subprocess.run([sys.executable, "tools/train_annotator.py", "--json", "x.json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--json and --image-root go together" in proc.stderr
