"""DELSE: Deep Extreme Level Set Evolution (Wang et al., CVPR 2019) as a Detectron2 project.

``import delse`` registers META_ARCHITECTURE "DELSE", its config keys (``get_cfg()``), its data
loaders and evaluator for ``train_net.py`` and the paper's PASCAL/DAVIS/Cityscapes dataset names
(:mod:`delse.datasets`). Built on the core ``levelset`` and the shared layer ``levelset_d2``. Layout:

- :mod:`delse.config`: ``add_delse_config`` (every key, with the paper's defaults).
- :mod:`delse.data`: one sample per instance (``flatten_instances``), the crop/extreme-point
  mapper and the train/test loaders ``train_net.py`` uses.
- :mod:`delse.modeling`: the network, eq. 9 evolution (``levelset.delse_evolve``), losses.
- :mod:`delse.interactive`: the simulated annotator and the drag encoding (section 4.4).
- :mod:`delse.predictor`: ``DELSEPredictor`` for interactive annotation.
- :mod:`delse.evaluation`: ``DELSEEvaluator`` (IoU, boundary F, DAVIS J/F, IoU after drags).
- :mod:`delse.label_studio`: the interactive Label Studio ML backend (``delse-serve``; not
  imported here).

Usage::

    python train_net.py --config-file configs/DELSE/delse_R_101_davis2016.yaml
    python train_net.py --config-file configs/DELSE/delse_R_101_davis2016.yaml --eval-only \\
        MODEL.WEIGHTS output/delse_R_101_davis2016/model_final.pth

    cfg = delse.get_cfg(); cfg.merge_from_file(...)   # cfg.MODEL.WEIGHTS = trained model
    predictor = delse.DELSEPredictor(cfg)
    result = predictor.predict(image_bgr, [left, right, top, bottom])   # (x, y) clicks
    result = predictor.correct(from_point, to_point)  # drag a wrong boundary point; repeatable
    result.mask, result.polygon                       # (H, W) bool; (K, 2) sub-pixel (x, y)
"""
from levelset_d2.config import get_cfg, register_config
from levelset_d2.engine import register_meta_architecture

from .config import add_delse_config
from .data import DELSEDatasetMapper, build_delse_test_loader, build_delse_train_loader, flatten_instances
from .evaluation import DELSEEvaluator
from .modeling import DELSE
from .predictor import DELSEPredictor, DELSEResult

from . import datasets as _  # noqa: F401  (only registration)

register_config(add_delse_config)
register_meta_architecture(
    "DELSE",
    build_train_loader=build_delse_train_loader,
    build_test_loader=build_delse_test_loader,
    build_evaluator=lambda cfg, dataset_name, output_folder: DELSEEvaluator(dataset_name, cfg, output_folder),
    # Pre-training leaves the motion-editing block out of the loss (it trains with the corrections).
    find_unused_parameters=True,
)

__all__ = [
    "get_cfg",
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
