"""LevelSet R-CNN (Homayounfar et al., ECCV 2020) for Detectron2. ``import levelset_rcnn`` registers
the mask heads (``LevelSetMaskHead``, the Mask R-CNN baselines and Table 3's ``DELSEMaskHead``),
``LevelSetROIHeads`` (which can pass the mask head image crops), the
backbones, the config keys (``MODEL.LEVELSET``, ``MODEL.WRN``) and the COCO evaluator with polygons,
so that configs resolve. Built on the core ``levelset`` and the shared layer ``levelset_d2``.
``levelset_rcnn.label_studio`` (not imported here) is the Label Studio pre-annotation backend
(``levelset-rcnn-serve``)."""
from functools import partial

from levelset_d2.config import register_config
from levelset_d2.engine import register_meta_architecture
from levelset_d2.evaluation import build_detection_evaluator

from .config import add_levelset_rcnn_config, get_cfg
from .delse_mask_head import DELSEMaskHead
from .evaluation import LevelSetCOCOEvaluator
from .mask_head import HighResMaskRCNNHead, LevelSetMaskHead, TSDFMaskRCNNHead
from .postprocessing import add_polygons, tsdf_to_polygons
from .roi_heads import LevelSetROIHeads
from .tta import LevelSetRCNNWithTTA

from . import backbone as _backbone  # noqa: F401  (only registration)

register_config(add_levelset_rcnn_config)
# Mask R-CNN-family models: the detection path, COCO results with sub-pixel polygons when returned.
# Their test-time augmentation passes the image crop and keeps phi_N (polygons).
register_meta_architecture(
    "GeneralizedRCNN", build_evaluator=partial(build_detection_evaluator, coco_evaluator=LevelSetCOCOEvaluator),
    build_tta_model=LevelSetRCNNWithTTA,
)

__all__ = [
    "add_levelset_rcnn_config",
    "get_cfg",
    "LevelSetMaskHead",
    "TSDFMaskRCNNHead",
    "HighResMaskRCNNHead",
    "DELSEMaskHead",
    "LevelSetROIHeads",
    "add_polygons",
    "tsdf_to_polygons",
    "LevelSetCOCOEvaluator",
    "LevelSetRCNNWithTTA",
]
