"""DELSE: Deep Extreme Level Set Evolution (Wang et al., CVPR 2019) as a Detectron2 project.

``import delse`` registers META_ARCHITECTURE "DELSE" and ROI_MASK_HEAD "DELSEMaskHead".
"""
from .config import add_delse_config
from .data import DELSEDatasetMapper, build_delse_test_loader, build_delse_train_loader, flatten_instances
from .evaluation import DELSEEvaluator
from .modeling import DELSE
from .predictor import DELSEPredictor, DELSEResult

from . import datasets as _, mask_head as _  # only registration

__all__ = [
    "add_delse_config",
    "build_delse_train_loader",
    "build_delse_test_loader",
    "flatten_instances",
    "DELSE",
    "DELSEDatasetMapper",
    "DELSEEvaluator",
    "DELSEPredictor",
    "DELSEResult",
]
