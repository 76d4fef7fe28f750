"""The Detectron2 layer shared by the level-set projects (LevelSet R-CNN, DELSE).

Between the pure-PyTorch core (``levelset``) and the projects: what every project needs from
Detectron2 and nothing specific to one of them. The projects import the core and this layer,
never each other.

- :mod:`levelset_d2.config`: ``get_cfg()`` with the keys of every installed project
  (``register_config``), ``check_registered_names``.
- :mod:`levelset_d2.datasets`: the synthetic, DSB2018 nuclei and COCO-sample datasets (registered
  on import), ``prepare_dataset``, ``shared_data_root``.
- :mod:`levelset_d2.robust_data`: bad samples skipped with a warning naming the file and the
  annotation id (``RobustDatasetMapper``, ``read_image``, robust loaders).
- :mod:`levelset_d2.checkpoint`: ``SafeDetectionCheckpointer`` (atomic saves, no pickle code on load).
- :mod:`levelset_d2.boundary_evaluation`, :mod:`levelset_d2.evaluation`: AF1/AF2/Boundary AP, the
  detection evaluators.
- :mod:`levelset_d2.engine`: the ``Trainer`` behind ``train_net.py``, with loaders and evaluators
  dispatched by meta-architecture (``register_meta_architecture``).
- :mod:`levelset_d2.label_studio_server`: the Label Studio ML-backend server both projects' backends
  run on (Flask on waitress, basic auth, limits, safe image fetching; not imported here).
"""
from . import datasets  # noqa: F401  (registers the datasets)
from .checkpoint import SafeDetectionCheckpointer
from .config import check_registered_names, get_cfg, register_config
from .robust_data import BadSampleError, RobustDatasetMapper, read_image, usable_images

__all__ = [
    "get_cfg",
    "register_config",
    "check_registered_names",
    "SafeDetectionCheckpointer",
    "RobustDatasetMapper",
    "BadSampleError",
    "read_image",
    "usable_images",
]
