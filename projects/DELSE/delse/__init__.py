"""DELSE: Deep Extreme Level Set Evolution (Wang et al., CVPR 2019) as a Detectron2 project.

``import delse`` registers META_ARCHITECTURE "DELSE", ROI_MASK_HEAD "DELSEMaskHead" and the
paper's PASCAL/DAVIS dataset names (:mod:`delse.datasets`). Layout:

- :mod:`delse.config`: ``add_delse_config`` (every key, with the paper's defaults).
- :mod:`delse.data`: one sample per instance (``flatten_instances``), the crop/extreme-point
  mapper and the train/test loaders ``train_net.py`` uses.
- :mod:`delse.modeling`: the network, eq. 9 evolution (``levelset.delse_evolve``), losses.
- :mod:`delse.interactive`: the simulated annotator and the drag encoding (section 4.4).
- :mod:`delse.predictor`: ``DELSEPredictor`` for interactive annotation.
- :mod:`delse.evaluation`: ``DELSEEvaluator`` (IoU, boundary F, DAVIS J/F, IoU after drags).
- :mod:`delse.mask_head`: ``DELSEMaskHead``, DELSE inside Mask R-CNN (LevelSet R-CNN Table 3).

Usage::

    python train_net.py --config-file configs/DELSE/delse_R_101_davis2016.yaml
    python train_net.py --config-file configs/DELSE/delse_R_101_davis2016.yaml --eval-only \\
        MODEL.WEIGHTS output/delse_R_101_davis2016/model_final.pth

    predictor = delse.DELSEPredictor(cfg)             # cfg from levelset_rcnn.get_cfg() + yaml
    result = predictor.predict(image_bgr, [left, right, top, bottom])   # (x, y) clicks
    result = predictor.correct(from_point, to_point)  # drag a wrong boundary point; repeatable
    result.mask, result.polygon                       # (H, W) bool; (K, 2) sub-pixel (x, y)
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
