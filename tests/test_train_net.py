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
def test_eval_only_prints_segm_ap_and_exports_polygons(trained, tmp_path, coco_sample_dir):
    output = run_train_net(
        "--eval-only", "MODEL.WEIGHTS", trained / "model_final.pth", "OUTPUT_DIR", tmp_path,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.LEVELSET.RETURN_POLYGONS", True,
        "TEST.DETECTIONS_PER_IMAGE", 10,
    )
    match = re.search(r"copypaste: Task: segm\n.*copypaste: AP,AP50,AP75,APs,APm,APl\n"
                      r".*copypaste: ([-\d.na]+),", output)
    assert match, output[-3000:]
    results = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert len(results) > 0
    # Independent value: pycocotools' COCOeval on the exported results against the json, AP read
    # from its precision array at the 10 detections per image asked for.
    import contextlib
    import io
    from collections import Counter

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from skimage.draw import polygon2mask

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_sample_dir / "instances_val2017_subset.json"))
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="segm")
        ev.params.maxDets = [1, 10, 10]
        ev.evaluate(), ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    expected_ap = 100 * precision[precision > -1].mean() if (precision > -1).any() else float("nan")
    assert float(match.group(1)) == pytest.approx(expected_ap, abs=1e-3)
    assert max(Counter(r["image_id"] for r in results).values()) <= 10  # TEST.DETECTIONS_PER_IMAGE
    # Official category ids (not contiguous indices), RLE for AP, sub-pixel polygons beside it.
    valid_ids = set(levelset_d2.datasets._get_builtin_metadata("coco")["thing_dataset_id_to_contiguous_id"])
    assert {r["category_id"] for r in results} <= valid_ids
    assert all("counts" in r["segmentation"] for r in results)
    with_polygons = [r for r in results if r["polygons"]]
    assert len(with_polygons) > 0
    assert all(len(p) >= 6 and len(p) % 2 == 0 for r in with_polygons for p in r["polygons"])
    # The polygons are the zero level set of the mask AP uses: rasterised (even-odd, so holes,
    # contours of their own, are cut out) by scikit-image they cover the RLE's pixels.
    from pycocotools import mask as mask_util

    large = [r for r in with_polygons if mask_util.area(r["segmentation"]) > 200]
    assert len(large) > 0
    for r in large[:20]:
        rle = mask_util.decode(r["segmentation"]).astype(bool)
        raster = np.zeros_like(rle)
        for p in r["polygons"]:
            xy = np.asarray(p, np.float64).reshape(-1, 2)
            raster ^= polygon2mask(rle.shape, np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1))
        assert (raster & rle).sum() / (raster | rle).sum() > 0.8, r["image_id"]


@pytest.mark.slow
def test_saved_config_loads_into_default_predictor(trained, coco_sample_dir):
    """The saved config and weights give, through DefaultPredictor, exactly what the in-process
    model gives with the checkpoint's tensors loaded by hand; a model whose weights did not load
    gives something else."""
    import numpy as np
    import torch
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

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
    assert instances.pred_masks.dtype == torch.bool

    saved = torch.load(trained / "model_final.pth", map_location="cpu", weights_only=False)["model"]

    def run(model):
        """The image as DefaultPredictor prepares it: RGB, shortest edge resized, CHW float."""
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        x = resize.get_transform(rgb).apply_image(rgb)
        x = torch.as_tensor(np.ascontiguousarray(x.transpose(2, 0, 1)).astype("float32"))
        with torch.no_grad():
            return model.eval()([{"image": x, "height": image.shape[0], "width": image.shape[1]}])[0]["instances"]

    model = build_model(cfg)
    model.load_state_dict(saved)
    expected = run(model)
    assert len(instances) == len(expected)
    assert torch.equal(instances.pred_classes, expected.pred_classes)
    assert torch.allclose(instances.scores, expected.scores, atol=1e-6)
    assert torch.equal(instances.pred_masks, expected.pred_masks) and expected.pred_masks.any()

    # The negative control: same config, fresh initialisation. After 3 iterations every score sits
    # near 1/81 (a fresh model's too, within 1e-3), so compare the boxes, which the RPN and box
    # regression weights move by pixels.
    torch.manual_seed(123)
    unloaded = run(build_model(cfg))
    assert len(unloaded) != len(expected) or not torch.allclose(
        unloaded.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1.0)


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
    import delse  # both projects are installed; a broken import is a failure, not a skip

    Trainer = _train_net_module().Trainer
    cfg = levelset_rcnn.get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DELSE"
    evaluator = Trainer.build_evaluator(cfg, "coco_sample_val2017", str(tmp_path))
    assert isinstance(evaluator, delse.DELSEEvaluator)


@pytest.mark.slow
def test_test_time_augmentation_evaluates(tmp_path, coco_sample_dir):
    """TEST.AUG (the paper's "MS+F") goes through Detectron2's TTA and its evaluators. Independent
    value: with one scale (the test size) and no flip, TTA exports the detections and reports the AP
    of plain inference, and the polygons of their zero level sets (RETURN_POLYGONS)."""
    import torch
    from detectron2.modeling import build_model
    from pycocotools import mask as mask_util

    cfg = levelset_rcnn.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path), "TEST.AUG.ENABLED", True,
                         "TEST.AUG.MIN_SIZES", (cfg.INPUT.MIN_SIZE_TEST,), "TEST.AUG.MAX_SIZE",
                         cfg.INPUT.MAX_SIZE_TEST, "TEST.AUG.FLIP", False,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                         "TEST.DETECTIONS_PER_IMAGE", 5, "TEST.BOUNDARY_EVAL", False,
                         "MODEL.LEVELSET.RETURN_POLYGONS", True])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    Trainer = _train_net_module().Trainer
    tta = Trainer.test_with_TTA(cfg, model)["segm_TTA"]  # one test set: keys are the tasks
    plain = Trainer.test(cfg, model)["segm"]
    assert tta.keys() == plain.keys() and "AP" in tta
    assert all(tta[k] == pytest.approx(plain[k], abs=1e-6, nan_ok=True) for k in plain), (tta, plain)

    def load(folder):
        results = json.loads((tmp_path / folder / "coco_instances_results.json").read_text())
        return sorted(results, key=lambda r: (r["image_id"], -r["score"]))

    a, b = load("inference_TTA"), load("inference")
    assert len(a) == len(b) == 5 * 10
    assert all("polygons" in r for r in a + b)
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        # Boxes go back and forth through the resize in TTA: a pixel may flip at a mask's edge.
        assert mask_util.iou([x["segmentation"]], [y["segmentation"]], [0])[0, 0] > 0.98
