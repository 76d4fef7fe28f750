"""LevelSet R-CNN (Homayounfar et al., ECCV 2020) for Detectron2. ``import levelset_rcnn`` registers
the mask heads, the backbones and the datasets, so that configs resolve."""
from .config import add_levelset_rcnn_config, get_cfg
from .mask_head import HighResMaskRCNNHead, LevelSetMaskHead, TSDFMaskRCNNHead
from .postprocessing import add_polygons, tsdf_to_polygons
from .evaluation import LevelSetCOCOEvaluator
from .robust_data import RobustDatasetMapper

from . import backbone as _backbone, data as _data  # noqa: F401  (only registration)

__all__ = [
    "add_levelset_rcnn_config",
    "get_cfg",
    "LevelSetMaskHead",
    "TSDFMaskRCNNHead",
    "HighResMaskRCNNHead",
    "add_polygons",
    "tsdf_to_polygons",
    "LevelSetCOCOEvaluator",
    "RobustDatasetMapper",
]
