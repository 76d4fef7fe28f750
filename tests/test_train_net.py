"""train_net.py end to end on the real COCO val2017 sample (CPU, tiny config, subprocesses)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import levelset_rcnn
from detectron2.engine import DefaultPredictor

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_coco_sample.yaml"


def run_train_net(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1" if "--num-gpus" in args else os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, coco_sample_dir):
    """A tiny LevelSet R-CNN trained for 3 iterations on the 10 real COCO images."""
    out = tmp_path_factory.mktemp("train")
    run_train_net("SOLVER.MAX_ITER", 3, "DATASETS.TEST", "()", "OUTPUT_DIR", out)
    assert (out / "model_final.pth").exists() and (out / "config.yaml").exists()
    return out


def test_eval_only_prints_segm_ap_and_exports_polygons(trained, tmp_path):
    output = run_train_net(
        "--eval-only", "MODEL.WEIGHTS", trained / "model_final.pth", "OUTPUT_DIR", tmp_path,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.LEVELSET.RETURN_POLYGONS", True,
    )
    match = re.search(r"copypaste: Task: segm\n.*copypaste: AP,AP50,AP75,APs,APm,APl\n"
                      r".*copypaste: ([-\d.na]+),", output)
    assert match, output[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
    results = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert len(results) > 0
    # Official category ids (not contiguous indices), RLE for AP, sub-pixel polygons beside it.
    valid_ids = set(levelset_rcnn.data._get_builtin_metadata("coco")["thing_dataset_id_to_contiguous_id"])
    assert {r["category_id"] for r in results} <= valid_ids
    assert all("counts" in r["segmentation"] for r in results)
    with_polygons = [r for r in results if r["polygons"]]
    assert len(with_polygons) > 0
    assert all(len(p) >= 6 and len(p) % 2 == 0 for r in with_polygons for p in r["polygons"])


def test_saved_config_loads_into_default_predictor(trained, coco_sample_dir):
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(trained / "config.yaml"))
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "LevelSetMaskHead"
    cfg.MODEL.WEIGHTS = str(trained / "model_final.pth")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # 3 iterations: keep every detection
    predictor = DefaultPredictor(cfg)
    image_path = sorted((coco_sample_dir / "images").glob("*.jpg"))[0]
    image = cv2.imread(str(image_path))
    instances = predictor(image)["instances"]
    assert len(instances) > 0
    assert instances.pred_masks.shape == (len(instances), *image.shape[:2])
    assert instances.pred_masks.dtype == bool or str(instances.pred_masks.dtype) == "torch.bool"


def test_two_process_cpu_training(tmp_path, coco_sample_dir):
    output = run_train_net(
        "--num-gpus", 2, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "DATASETS.TEST", "()",
        "OUTPUT_DIR", tmp_path,
    )
    assert "World size: 2" in output
    assert (tmp_path / "model_final.pth").exists()
