"""Every DELSE config merges into the repository's config and builds its model (CPU, no weights),
so that no key is misspelt and every registered name resolves."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs/DELSE").glob("*.yaml"))


def test_paper_configs_are_there():
    for name in ["delse_R_101_pascal_sbd.yaml", "delse_R_101_pascal_voc2012.yaml",
                 "delse_R_101_cityscapes_stretching.yaml", "delse_R_101_cityscapes_10cities.yaml",
                 "delse_R_101_cityscapes_hard.yaml", "delse_R_101_davis2016.yaml",
                 "delse_R_18_dsb2018.yaml", "delse_R_18_coco_sample.yaml"]:
        assert name in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    from detectron2.modeling import build_model

    import delse  # registers DELSE, its keys and datasets

    cfg = delse.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/DELSE" / name))
    cfg.MODEL.DEVICE = "cpu"
    from detectron2.data import DatasetCatalog

    for dataset in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:  # registered by the imports above
        assert dataset in DatasetCatalog.list(), dataset
    if cfg.MODEL.META_ARCHITECTURE == "DELSE":
        assert cfg.MODEL.DELSE.PHASE in ("pretrain", "joint")
        assert cfg.INPUT.DELSE.CROP_MODE in ("stretch", "square")
        if "R_101" in name:  # section 5's settings
            d = cfg.MODEL.DELSE
            assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.SOLVER.IMS_PER_BATCH == 12
            assert (d.EVOLUTION_STEPS, d.CURVATURE_WEIGHT, d.DIST_REG_WEIGHT, d.HEAVISIDE_EPS) == (5, 1.0, 0.04, 1.0)
            assert (d.EVOLUTION_LOSS_WEIGHT, d.DIRECTION_LOSS_WEIGHT, d.TSDF_TRUNCATION) == (100.0, 1.0, 30.0)
            assert cfg.SOLVER.BASE_LR == 3e-4 and cfg.SOLVER.GAMMA == 0.3
        if "R_101" in name and d.PRETRAIN_ITERS > 0:
            # 20 epochs of pre-training out of 80, lr decayed every 20 epochs.
            assert d.PRETRAIN_ITERS * 4 == cfg.SOLVER.MAX_ITER
            assert tuple(cfg.SOLVER.STEPS) == tuple(d.PRETRAIN_ITERS * k for k in (1, 2, 3))
    else:
        assert cfg.MODEL.ROI_MASK_HEAD.NAME == "DELSEMaskHead"
    with torch.random.fork_rng():
        model = build_model(cfg)
    # The model is the one the config describes (not just any model that builds).
    if cfg.MODEL.META_ARCHITECTURE == "DELSE":
        d = cfg.MODEL.DELSE
        assert type(model).__name__ == "DELSE"
        assert (model.evolution_steps, model.tsdf_truncation, model.pixel_wise) == (
            d.EVOLUTION_STEPS, d.TSDF_TRUNCATION, d.PIXEL_WISE)
        assert model.use_motion == (d.USE_MOTION and not d.PIXEL_WISE)
    else:
        assert type(model.roi_heads.mask_head).__name__ == cfg.MODEL.ROI_MASK_HEAD.NAME
