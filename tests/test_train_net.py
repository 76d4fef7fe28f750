"""train_net.py end to end on the real COCO val2017 sample (CPU, tiny config, subprocesses)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import levelset_d2
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


@pytest.mark.slow
def test_eval_only_prints_segm_ap_and_exports_polygons(trained, tmp_path):
    output = run_train_net(
        "--eval-only", "MODEL.WEIGHTS", trained / "model_final.pth", "OUTPUT_DIR", tmp_path,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.LEVELSET.RETURN_POLYGONS", True,
        "TEST.DETECTIONS_PER_IMAGE", 10,
    )
    match = re.search(r"copypaste: Task: segm\n.*copypaste: AP,AP50,AP75,APs,APm,APl\n"
                      r".*copypaste: ([-\d.na]+),", output)
    assert match, output[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
    results = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert len(results) > 0
    # Official category ids (not contiguous indices), RLE for AP, sub-pixel polygons beside it.
    valid_ids = set(levelset_d2.datasets._get_builtin_metadata("coco")["thing_dataset_id_to_contiguous_id"])
    assert {r["category_id"] for r in results} <= valid_ids
    assert all("counts" in r["segmentation"] for r in results)
    with_polygons = [r for r in results if r["polygons"]]
    assert len(with_polygons) > 0
    assert all(len(p) >= 6 and len(p) % 2 == 0 for r in with_polygons for p in r["polygons"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path, coco_sample_dir):
    output = run_train_net(
        "--num-gpus", 2, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "DATASETS.TEST", "()",
        "OUTPUT_DIR", tmp_path,
    )
    assert "World size: 2" in output
    assert (tmp_path / "model_final.pth").exists()


def _train_net_module():
    sys.path.insert(0, str(REPO))
    try:
        import train_net
    finally:
        sys.path.remove(str(REPO))
    return train_net


def test_evaluators_follow_dataset_metadata(tmp_path, coco_sample_dir):
    from detectron2.evaluation import CityscapesInstanceEvaluator, DatasetEvaluators

    from levelset_d2.boundary_evaluation import BoundaryEvaluator
    from levelset_rcnn.evaluation import LevelSetCOCOEvaluator

    Trainer = _train_net_module().Trainer
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    evaluator = Trainer.build_evaluator(cfg, "coco_sample_val2017", str(tmp_path))
    assert isinstance(evaluator, DatasetEvaluators)
    kinds = [type(e) for e in evaluator._evaluators]
    assert kinds == [LevelSetCOCOEvaluator, BoundaryEvaluator]
    assert evaluator._evaluators[0]._max_dets_per_image[-1] == cfg.TEST.DETECTIONS_PER_IMAGE

    cfg.TEST.BOUNDARY_EVAL = False
    assert isinstance(Trainer.build_evaluator(cfg, "coco_sample_val2017", str(tmp_path)),
                      LevelSetCOCOEvaluator)
    # Builtin Cityscapes (no files needed to build the evaluator).
    assert isinstance(Trainer.build_evaluator(cfg, "cityscapes_fine_instance_seg_val"),
                      CityscapesInstanceEvaluator)


def test_lvis_ap_star_on_coco_categories(tmp_path, coco_sample_dir):
    """
    The LVIS AP* path: a COCO-category model evaluated with lvis-api on an LVIS-format set whose
    categories carry COCO ids (what lvis_v0.5_val_cocofied is). Here the set is the real COCO sample
    rewritten in LVIS format, and the "predictions" are its ground truth: AP must be 100.
    """
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_lvis_instances
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
    from detectron2.evaluation import LVISEvaluator
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

    coco = json.loads((coco_sample_dir / "instances_val2017_subset.json").read_text())
    annotations = [a for a in coco["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list)]
    used = {a["category_id"] for a in annotations}
    lvis = {
        "images": [dict(img, neg_category_ids=[], not_exhaustive_category_ids=[]) for img in coco["images"]],
        "annotations": [{k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "segmentation")}
                        for a in annotations],
        "categories": [dict(c, frequency="f", synonyms=[c["name"]], synset=c["name"])
                       for c in coco["categories"] if c["id"] in used],
    }
    json_file = tmp_path / "lvis_cocofied_sample.json"
    json_file.write_text(json.dumps(lvis))
    name = f"test_lvis_cocofied_{tmp_path.name}"
    register_lvis_instances(name, _get_builtin_metadata("coco"), str(json_file),
                            str(coco_sample_dir / "images"))

    Trainer = _train_net_module().Trainer
    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert isinstance(evaluator, LVISEvaluator)  # no boundary metrics on federated LVIS
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        h, w = d["height"], d["width"]
        anns = d["annotations"]
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
            dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        inst.pred_masks = BitMasks.from_polygon_masks(
            PolygonMasks([a["segmentation"] for a in anns]), h, w).tensor
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert abs(results["segm"]["AP"] - 100.0) < 1e-6, results["segm"]


def test_delse_meta_architecture_dispatches_to_delse(tmp_path, coco_sample_dir):
    delse = pytest.importorskip("delse")
    Trainer = _train_net_module().Trainer
    cfg = levelset_rcnn.get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DELSE"
    evaluator = Trainer.build_evaluator(cfg, "coco_sample_val2017", str(tmp_path))
    assert isinstance(evaluator, delse.DELSEEvaluator)


@pytest.mark.slow
def test_test_time_augmentation_evaluates(tmp_path, coco_sample_dir):
    """TEST.AUG (multi-scale + flip, the paper's "MS+F"): LevelSet masks go through Detectron2's TTA."""
    from detectron2.modeling import build_model

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path), "TEST.AUG.ENABLED", True,
                         "TEST.AUG.MIN_SIZES", (128, 160), "TEST.AUG.MAX_SIZE", 256,
                         "TEST.AUG.FLIP", True, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                         "TEST.DETECTIONS_PER_IMAGE", 5, "TEST.BOUNDARY_EVAL", False])
    model = build_model(cfg).eval()
    res = _train_net_module().Trainer.test_with_TTA(cfg, model)
    assert "AP" in res["segm_TTA"]  # one test set: keys are the tasks
    assert (tmp_path / "inference_TTA" / "coco_instances_results.json").exists()
