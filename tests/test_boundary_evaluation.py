import contextlib
import io
import uuid

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from scipy import ndimage

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from levelset_d2.boundary_evaluation import BoundaryEvaluator


@pytest.fixture(scope="module")
def coco_sample_dataset(coco_sample_dir):
    name = f"test_boundary_eval_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(coco_sample_dir / "instances_val2017_subset.json"),
                            str(coco_sample_dir / "images"))
    dicts = DatasetCatalog.get(name)  # as the test loader does: sets the category id mapping
    yield name, dicts
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _run(name, dicts, transform=lambda m: m):
    """Feed every non-crowd GT mask, transformed, as a prediction; return the evaluator's result."""
    evaluator = BoundaryEvaluator(name)
    metadata = MetadataCatalog.get(name)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(metadata.json_file)
    mapping = metadata.thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for d in dicts:
        anns = [a for a in coco.imgToAnns[d["image_id"]] if not a["iscrowd"]]
        masks = torch.as_tensor(np.stack([transform(coco.annToMask(a).astype(bool)) for a in anns]))
        instances = Instances((d["height"], d["width"]))
        x, y, w, h = np.array([a["bbox"] for a in anns], dtype=np.float32).T
        instances.pred_boxes = Boxes(torch.as_tensor(np.stack([x, y, x + w, y + h], axis=1)))
        instances.scores = torch.linspace(0.9, 0.5, len(anns))
        instances.pred_classes = torch.as_tensor([mapping[a["category_id"]] for a in anns])
        instances.pred_masks = masks
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()


def test_perfect_predictions(coco_sample_dataset):
    result = _run(*coco_sample_dataset)
    assert set(result) == {"boundary"}
    assert result["boundary"] == pytest.approx(
        {"AF1": 100.0, "AF2": 100.0,
         "BoundaryAP": 100.0, "BoundaryAP50": 100.0, "BoundaryAP75": 100.0})


def test_eroded_predictions(coco_sample_dataset):
    erode = lambda m: ndimage.binary_erosion(m, np.ones((3, 3)))  # noqa: E731
    result = _run(*coco_sample_dataset, transform=erode)
    b = result["boundary"]
    assert b["AF1"] < b["AF2"] < 100.0
    assert b["BoundaryAP"] < 100.0


def test_no_predictions(coco_sample_dataset):
    name, _ = coco_sample_dataset
    evaluator = BoundaryEvaluator(name)
    evaluator.reset()
    assert evaluator.evaluate() == {}
