"""Shared fixtures. Real data lives in ../shared/data beside the repo; tests that need it skip
with a clear reason where it is absent (a user's machine) and run wherever it is present. With the
environment variable CI set (`.ci/run` sets it) a missing data directory fails those tests instead,
so CI cannot stay green without its real-data tests."""
import importlib
import os
from pathlib import Path

import pytest
import torch

from levelset_d2.datasets import shared_data_root

SHARED_DATA = shared_data_root()
REPO = Path(__file__).resolve().parents[1]


def _require(path: Path) -> Path:
    if not path.exists():
        message = f"real data not found at {path} (set LEVELSET_SHARED_DATA to ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI={os.environ['CI']!r} is set, so missing data fails the run",
                        pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def coco_sample_dir() -> Path:
    """10 real COCO val2017 images: images/*.jpg and instances_val2017_subset.json."""
    return _require(SHARED_DATA / "coco_val2017_sample")


@pytest.fixture(scope="session")
def dsb2018_dir() -> Path:
    """DSB2018 nuclei: images/, train.json, dev.json (COCO RLE masks)."""
    return _require(SHARED_DATA / "dsb2018")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread, as `make test` sets OMP_NUM_THREADS=1: the suite's tiny models and
    multi-process runs are many times slower when threads outnumber a small machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A fresh Label Studio (`make label-studio`) on localhost, shared by the end-to-end tests;
    yields (url, personal access token, (user, password), log)."""
    from _label_studio import start_label_studio, stop

    url, pat, login, log, proc = start_label_studio(tmp_path_factory.mktemp("label_studio"))
    try:
        yield url, pat, login, log
    finally:
        stop(proc)


@pytest.fixture
def import_tool(monkeypatch):
    """Import a script of ``tools/`` as a module: ``import_tool("analysis", "eval_gt_boxes")``. Its folder
    is put on ``sys.path`` for this test only (undone afterwards)."""
    def load(folder: str, name: str):
        monkeypatch.syspath_prepend(str(REPO / "tools" / folder))
        return importlib.import_module(name)
    return load
