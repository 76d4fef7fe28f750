"""tools/benchmarks/bench_levelset_rcnn.py: the command line as BENCHMARKS.md writes it."""
import pytest


def test_overrides_after_models_are_split_off(import_tool):
    bench = import_tool("benchmarks", "bench_levelset_rcnn")
    # BENCHMARKS.md's GPU command: the overrides follow the model names, and argparse gives them all to --models.
    models, opts = bench.split_models_and_opts(
        ["Mask R-CNN", "LevelSet R-CNN", "INPUT.MIN_SIZE_TEST", "640", "MODEL.DEVICE", "cuda"], [])
    assert models == ["Mask R-CNN", "LevelSet R-CNN"]
    assert opts == ["INPUT.MIN_SIZE_TEST", "640", "MODEL.DEVICE", "cuda"]
    # Overrides after another flag reach opts directly; a "--" separator is dropped; model names (mixed case,
    # spaces, commas: "LevelSet R-CNN + image crop, features conv") are never taken for keys.
    models, opts = bench.split_models_and_opts(["LevelSet R-CNN + image crop, features conv"],
                                               ["--", "MODEL.LEVELSET.LOSS_WEIGHT_PHIN", "0.5"])
    assert models == ["LevelSet R-CNN + image crop, features conv"]
    assert opts == ["MODEL.LEVELSET.LOSS_WEIGHT_PHIN", "0.5"]
    assert bench.split_models_and_opts(["Mask R-CNN"], []) == (["Mask R-CNN"], [])


def test_unknown_model_and_missing_model_are_named(import_tool, monkeypatch, capsys):
    bench = import_tool("benchmarks", "bench_levelset_rcnn")
    for argv, expected in ((["--models", "Mask RCNN"], "Mask RCNN"),
                           (["--models", "MODEL.DEVICE", "cpu"], "at least one model name")):
        monkeypatch.setattr("sys.argv", ["bench_levelset_rcnn.py", *argv])
        with pytest.raises(SystemExit):
            bench.main()
        assert expected in capsys.readouterr().err
