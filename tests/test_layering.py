"""The layering of the repository: the core imports no Detectron2, the shared layer no project,
each project only the core and the shared layer, and each project works without the other."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "levelset": REPO / "levelset",
    "levelset_d2": REPO / "levelset_d2",
    "levelset_rcnn": REPO / "projects/LevelSetRCNN/levelset_rcnn",
    "delse": REPO / "projects/DELSE/delse",
}
# Top-level packages each layer may import, among detectron2 and this repository's.
ALLOWED = {
    "levelset": {"levelset"},
    "levelset_d2": {"levelset", "levelset_d2", "detectron2"},
    "levelset_rcnn": {"levelset", "levelset_d2", "levelset_rcnn", "detectron2"},
    "delse": {"levelset", "levelset_d2", "delse", "detectron2"},
}
OURS = set(PACKAGES) | {"detectron2"}
# Tests of the entry points that serve both projects (train_net.py, demo.py), of the shared layer's
# CUDA paths and CPU mixed precision on both projects' models (test_gpu.py, test_cpu_amp.py), and of the
# layering itself.
CROSS_PROJECT_TESTS = {"test_train_net.py", "test_demo.py", "test_gpu.py", "test_cpu_amp.py", "test_layering.py"}


def imported_packages(path: Path):
    """Top-level names of every import statement in a file (also those inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_packages_reads_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os.path\nfrom . import x\ndef f():\n    from delse.data import y\n    import levelset_rcnn as r\n")
    assert imported_packages(f) == {"os", "delse", "levelset_rcnn"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_its_layers(package):
    bad = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        for name in (imported_packages(path) & OURS) - ALLOWED[package]:
            bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_each_projects_tests_import_only_that_project():
    bad = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name in CROSS_PROJECT_TESTS:
            continue
        projects = imported_packages(path) & {"levelset_rcnn", "delse"}
        if len(projects) > 1:
            bad.append(f"{path.name} imports {sorted(projects)}")
    assert not bad, "\n".join(bad)


# tools/: each script serves one project (it may import the core, the shared layer, Detectron2 and one
# of the projects); _benchmarks.py, shared by both projects' benchmarks, imports neither.
TOOLS = REPO / "tools"
SHARED_TOOLS = {"_benchmarks.py"}


def test_tools_import_at_most_one_project():
    bad = []
    for path in sorted(TOOLS.rglob("*.py")):
        projects = imported_packages(path) & {"levelset_rcnn", "delse"}
        allowed = 0 if path.name in SHARED_TOOLS else 1
        if len(projects) > allowed:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(projects)}")
    assert not bad, "\n".join(bad)


def _run_without(blocked: str, code: str, tmp_path):
    """Run ``code`` in a fresh interpreter where importing ``blocked`` fails."""
    script = tmp_path / "run.py"
    script.write_text(f"import sys\nsys.modules[{blocked!r}] = None  # import {blocked} -> ImportError\n" + code)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_delse_configures_trains_and_predicts_without_levelset_rcnn(tmp_path):
    out = _run_without("levelset_rcnn", f"""
import numpy as np, torch
import delse
from levelset_d2.engine import Trainer
cfg = delse.get_cfg()
assert "DELSE" in cfg.MODEL and "LEVELSET" not in cfg.MODEL
cfg.merge_from_file({str(REPO / "configs/DELSE/demo_delse_synthetic.yaml")!r})
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", 3, "MODEL.DELSE.PRETRAIN_ITERS", 1,
                     "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
                     "OUTPUT_DIR", {str(tmp_path / "out")!r}])
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
cfg.MODEL.WEIGHTS = {str(tmp_path / "out" / "model_final.pth")!r}
image = np.zeros((64, 80, 3), np.uint8); image[20:40, 30:60] = 200
result = delse.DELSEPredictor(cfg).predict(image, [(30, 30), (59, 30), (45, 20), (45, 39)])
assert result.mask.shape == (64, 80)
print("imported levelset_rcnn:", any(m.startswith("levelset_rcnn") for m in sys.modules if sys.modules[m]))
""", tmp_path)
    assert "imported levelset_rcnn: False" in out


@pytest.mark.slow
def test_levelset_rcnn_configures_and_trains_without_delse(tmp_path):
    out = _run_without("delse", f"""
import levelset_rcnn
from levelset_d2.engine import Trainer
cfg = levelset_rcnn.get_cfg()
assert "LEVELSET" in cfg.MODEL and "DELSE" not in cfg.MODEL
cfg.merge_from_file({str(REPO / "configs/LevelSetRCNN/tiny_levelset_rcnn_synthetic.yaml")!r})
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2,
                     "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", {str(tmp_path / "out")!r}])
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
print("imported delse:", any(m.startswith("delse") for m in sys.modules if sys.modules[m]))
""", tmp_path)
    assert "imported delse: False" in out


@pytest.mark.slow
def test_get_cfg_declares_every_installed_project():
    """Through the entry points, a fresh interpreter that imported no project gets both projects' keys."""
    code = "import levelset_d2\ncfg = levelset_d2.get_cfg()\nprint('LEVELSET' in cfg.MODEL, 'DELSE' in cfg.MODEL)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["True", "True"]
