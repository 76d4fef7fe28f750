"""Issue 15, item 3: the CUDA paths. Every test needs a CUDA device and skips without one; run them
with ``pytest -m gpu`` on a GPU machine.

Expected values do not come from the path under test: a CUDA result is compared with the same
computation on CPU (TF32 off, so the only differences are float32 summation order and kernels), or
with an invariant (finite losses, the wrapper and devices a run ends with).
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _configs import shared_cfg as _cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "LevelSetRCNN" / "tiny_levelset_rcnn_synthetic.yaml"
DELSE_DEMO = REPO / "configs" / "DELSE" / "demo_delse_synthetic.yaml"
DELSE_TINY = REPO / "configs" / "DELSE" / "tiny_delse_coco_sample.yaml"
WRN = REPO / "configs" / "LevelSetRCNN" / "Cityscapes" / "levelset_rcnn_WRN38_PANet_DCN_cityscapes.yaml"
# A few iterations of the tiny configs on the synthetic shapes.
TRAIN_OPTS = ["MODEL.DEVICE", "cuda", "DATASETS.TEST", [], "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 4,
              "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100000, "SEED", 0,
              "DATALOADER.NUM_WORKERS", 0]
# WRN-38 + DCN + PANet with its SyncBN, shrunk as in tests/test_backbone_configs.py.
TINY_WRN = ["MODEL.WRN.STRUCTURE", [1, 1, 1, 1, 1, 1], "MODEL.WRN.WIDTH_DIVISOR", 16, "MODEL.FPN.OUT_CHANNELS", 16,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 16, "MODEL.RPN.POST_NMS_TOPK_TEST", 16,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
            "MODEL.LEVELSET.EMBED_CHANNELS", 8, "MODEL.LEVELSET.EVOLUTION_RESOLUTION", 56,
            "MODEL.LEVELSET.HYPERPARAM_FC_DIM", 16, "TEST.DETECTIONS_PER_IMAGE", 10]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 convolutions and matmuls on CUDA, as on CPU (TF32 would cost ~3 digits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved




def _losses(trainer):
    """Per-iteration values of the losses the trainer logged."""
    return {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items()
            if k.startswith("loss") or k == "total_loss"}


def _image(seed=0, size=(96, 128)):
    """A BGR uint8 image with two bright shapes on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
    img[20:60, 15:70] = (200, 150, 100)
    img[50:85, 80:120] = (90, 210, 230)
    return img


# ------------------------------------------------------------------------------- Trainer on CUDA
def test_trainer_trains_on_cuda_through_launch(tmp_path):
    """train_net.py's path on one GPU: launch() with one process runs the Trainer, whose model is on
    CUDA (with one process there is no DDP wrapper; see the process-group tests below)."""
    from detectron2.engine import launch
    from levelset_d2.engine import Trainer

    result = {}

    def main(cfg):
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        result.update(device=str(next(trainer.model.parameters()).device), losses=_losses(trainer),
                      iteration=trainer.iter)

    launch(main, 1, args=(_cfg(TINY, *TRAIN_OPTS, "OUTPUT_DIR", str(tmp_path)),))
    assert result["device"] == "cuda:0" and result["iteration"] == 4  # MAX_ITER: one past the last
    assert {"loss_tsdf_initial", "loss_tsdf_final"} <= set(result["losses"])
    for name, values in result["losses"].items():
        assert len(values) == 4 and np.isfinite(values).all(), (name, values)


@pytest.mark.parametrize("config, opts", [
    (TINY, []),
    (DELSE_DEMO, ["MODEL.DELSE.PRETRAIN_ITERS", 2]),  # both phases: pre-training, then joint
], ids=["levelset_rcnn", "delse"])
def test_amp_training_has_finite_losses(tmp_path, config, opts):
    from detectron2.engine import AMPTrainer
    from levelset_d2.engine import Trainer

    cfg = _cfg(config, *TRAIN_OPTS, "SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", str(tmp_path), *opts)
    trainer = Trainer(cfg)
    assert isinstance(trainer.step_trainer, AMPTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = _losses(trainer)
    assert losses
    for name, values in losses.items():
        assert np.isfinite(values).all(), (name, values)
    assert len(losses["total_loss"]) == 4
    scale = trainer.step_trainer.grad_scaler.get_scale()
    assert np.isfinite(scale) and scale > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------- process groups
DRIVER = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, {repo!r})
    import torch
    import detectron2.utils.comm as comm
    from detectron2.engine import launch
    from detectron2.engine.launch import _distributed_worker
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    import delse, levelset_rcnn  # noqa: F401  (registration)
    from levelset_d2 import engine
    from levelset_d2.config import get_cfg

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def load(config, opts):
        cfg = get_cfg()
        cfg.merge_from_file(config)
        cfg.merge_from_list(opts)
        return cfg

    def train(out, config, opts):
        cfg = load(config, opts)
        trainer = engine.Trainer(cfg)
        if comm.get_world_size() == 1:
            # create_ddp_model leaves a one-process model unwrapped; wrap it with the arguments the
            # Trainer gives it in N > 1 processes.
            trainer.model = DistributedDataParallel(trainer.model, **engine.ddp_kwargs(cfg, trainer.model))
        model = trainer.model
        trainer.resume_or_load(resume=False)
        trainer.train()
        if comm.is_main_process():
            losses = {{k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items()
                      if k.startswith("loss") or k == "total_loss"}}
            json.dump({{"wrapper": type(model).__name__, "device_ids": getattr(model, "device_ids", None),
                       "world_size": comm.get_world_size(), "losses": losses}}, open(out, "w"))

    def syncbn(out, config, opts):
        cfg = load(config, opts)
        torch.manual_seed(0)
        model = build_model(cfg)
        norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        before = norms[0].running_mean.clone()
        g = torch.Generator().manual_seed(0)
        from detectron2.structures import BitMasks, Boxes, Instances
        masks = torch.zeros(2, 64, 96, dtype=torch.bool)
        masks[0, 8:40, 10:50] = True
        masks[1, 30:60, 55:90] = True
        inst = Instances((64, 96))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 8, 50, 40], [55, 30, 90, 60]]))
        inst.gt_classes = torch.tensor([0, 1])
        inst.gt_masks = BitMasks(masks)
        image = torch.rand(3, 64, 96, generator=g) * 255
        model.train()
        with EventStorage():
            losses = model([{{"image": image, "instances": inst, "height": 64, "width": 96}}])
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            pred = model([{{"image": image, "height": 64, "width": 96}}])[0]["instances"]
        json.dump({{"num_syncbn": len(norms), "world_size": comm.get_world_size(),
                   "device": str(norms[0].weight.device),
                   "losses": {{k: float(v) for k, v in losses.items()}},
                   "grad_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()
                                      if p.grad is not None),
                   "running_mean_moved": not torch.equal(before, norms[0].running_mean),
                   "num_detections": len(pred), "masks_shape": list(pred.pred_masks.shape)}}, open(out, "w"))

    if __name__ == "__main__":
        mode, nproc, out, config, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
        main = {{"train": train, "syncbn": syncbn}}[mode]
        if nproc > 1:
            launch(main, nproc, dist_url="auto", args=(out, config, opts))
        else:  # what launch() runs in each of N > 1 processes, for a one-process NCCL group
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            _distributed_worker(0, main, 1, 1, 0, f"tcp://127.0.0.1:{{port}}", (out, config, opts))
""")


def _driver(tmp_path, mode, nproc, config, opts, timeout=300):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    out = tmp_path / f"{mode}_{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), mode, str(nproc), str(out), str(config), json.dumps(opts)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def _assert_trained(result, world_size):
    assert result["wrapper"] == "DistributedDataParallel" and result["device_ids"] == [0]
    assert result["world_size"] == world_size
    assert len(result["losses"]["total_loss"]) == 4
    for name, values in result["losses"].items():
        assert np.isfinite(values).all(), (name, values)


@pytest.mark.slow
@pytest.mark.parametrize("config, opts", [
    (TINY, []),
    (DELSE_DEMO, ["MODEL.DELSE.PRETRAIN_ITERS", 2]),  # DDP across the phase switch (fewer used params)
], ids=["levelset_rcnn", "delse"])
def test_ddp_with_device_ids_in_a_one_process_nccl_group(tmp_path, config, opts):
    result = _driver(tmp_path, "train", 1, config, [*TRAIN_OPTS, "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    _assert_trained(result, 1)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one process per GPU)")
def test_ddp_two_processes_through_launch(tmp_path):
    """train_net.py --num-gpus 2: the Trainer wraps each process's model in DDP with its GPU."""
    opts = [*TRAIN_OPTS, "SOLVER.IMS_PER_BATCH", 4, "OUTPUT_DIR", str(tmp_path / "out")]
    _assert_trained(_driver(tmp_path, "train", 2, TINY, opts), 2)


@pytest.mark.slow
def test_wrn_config_syncbn_builds_and_runs_in_a_one_process_group(tmp_path):
    opts = [*TINY_WRN, "MODEL.DEVICE", "cuda", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    result = _driver(tmp_path, "syncbn", 1, WRN, opts)
    assert result["world_size"] == 1 and result["device"] == "cuda:0"
    assert result["num_syncbn"] > 10  # every unit of the backbone
    assert {"loss_tsdf_initial", "loss_tsdf_final"} <= set(result["losses"])
    assert all(np.isfinite(v) for v in result["losses"].values()), result["losses"]
    assert result["grad_finite"] and result["running_mean_moved"]
    assert result["num_detections"] > 0 and result["masks_shape"][1:] == [64, 96]


# ------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("modulated", [True, False])
def test_deform_conv_cuda_equals_cpu(modulated):
    """levelset_rcnn's DeformConv2dPack (torchvision.ops.deform_conv2d, the DCN configs' layer) with
    non-zero offsets: forward and gradients on CUDA equal CPU's."""
    from levelset_rcnn.backbone import DeformConv2dPack

    torch.manual_seed(0)
    layer = DeformConv2dPack(8, 16, 3, padding=1, stride=1, bias=True, modulated=modulated)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)  # offsets of a few pixels, fractional
    torch.nn.init.normal_(layer.conv_offset.bias, std=0.5)
    x = torch.randn(2, 8, 20, 24)
    outputs = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(layer).to(device)
        # A fresh leaf per device: x.to('cpu') is x itself, and once x requires grad, x.to('cuda') is
        # not a leaf (its .grad stays None).
        xi = x.detach().to(device).clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        outputs[device] = [y, xi.grad, m.weight.grad, m.conv_offset.weight.grad]
    offset, _ = layer.offset_and_mask(x)
    assert offset.abs().max() > 0.5  # the sampling is really deformed
    for cpu, cuda in zip(outputs["cpu"], outputs["cuda"]):
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("truncation", [5.0, 8.0, 30.0])
def test_tsdf_cuda_equals_cpu(truncation):
    """mask_to_tsdf on CUDA uint8 masks equals CPU. Truncations 5 and 8 take the uint8 min-plus pass
    (cap^2 + window^2 <= 255), 30 the int16 one."""
    import levelset

    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 1, 12, 16, generator=g) > 0.5).float()
    masks = torch.nn.functional.interpolate(masks, size=(60, 80), mode="bilinear", align_corners=False)
    masks = (masks[:, 0] > 0.5).to(torch.uint8)  # blobs with curved boundaries, some touching the border
    masks[0] = 0  # empty
    masks[1] = 1  # full
    cpu = levelset.mask_to_tsdf(masks, truncation)
    cuda = levelset.mask_to_tsdf(masks.cuda(), truncation)
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    assert cpu[2:].min() < 0 < cpu[2:].max()
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- DELSE
def test_delse_on_cuda_predicts_like_cpu():
    """The predictor's four-click prediction and one drag with a random tiny DELSE model: the level
    sets on CUDA equal CPU's within float32 summation error of the convolutions and the evolution."""
    from detectron2.modeling import build_model
    from delse.predictor import DELSEPredictor

    cfg = _cfg(DELSE_TINY, "MODEL.DEVICE", "cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _image()
    clicks = [(15, 40), (69, 40), (40, 20), (40, 59)]
    results = {}
    for device in ("cpu", "cuda"):
        c = cfg.clone()
        c.defrost()
        c.MODEL.DEVICE = device
        predictor = DELSEPredictor(c, copy.deepcopy(model).to(device))
        first = predictor.predict(image, clicks)
        dragged = predictor.correct(from_point=(69, 40), to_point=(74, 42))
        results[device] = (first, dragged)
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert cpu.phi.shape == cuda.phi.shape and np.isfinite(cuda.phi).all()
        np.testing.assert_allclose(cuda.phi, cpu.phi, rtol=1e-3, atol=1e-3 * cfg.MODEL.DELSE.TSDF_TRUNCATION)
        # Pixels may flip only where phi is within the tolerance of zero.
        assert (cuda.mask != cpu.mask).mean() < 0.005


# ------------------------------------------------------------------------------- checkpoints
def test_cuda_checkpoint_loads_on_cpu_and_gives_the_same_outputs(tmp_path):
    """A model trained a step on CUDA, saved with its optimiser, loads on CPU with
    SafeDetectionCheckpointer (weights_only, map_location cpu): the CUDA model's weights and optimiser
    state, on CPU, and the outputs of the CUDA model moved to CPU in memory."""
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage
    from levelset_d2.checkpoint import SafeDetectionCheckpointer

    cfg = _cfg(TINY, "MODEL.DEVICE", "cuda", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    image = torch.as_tensor(_image(size=(128, 128)).transpose(2, 0, 1).copy()).float()
    inst = Instances((128, 128))
    inst.gt_boxes = Boxes(torch.tensor([[15.0, 20, 70, 60], [80, 50, 120, 85]]))
    inst.gt_classes = torch.tensor([0, 1])
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 20:60, 15:70] = masks[1, 50:85, 80:120] = True
    inst.gt_masks = BitMasks(masks)
    model.train()
    with EventStorage():
        sum(model([{"image": image, "instances": inst}]).values()).backward()
    optimizer.step()
    SafeDetectionCheckpointer(model, save_dir=str(tmp_path), optimizer=optimizer).save("cuda_model")

    cpu_cfg = cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(1)  # other initial weights: the load must replace them all
    cpu_model = build_model(cpu_cfg)
    cpu_optimizer = torch.optim.SGD(cpu_model.parameters(), lr=0.01, momentum=0.9)
    SafeDetectionCheckpointer(cpu_model, optimizer=cpu_optimizer).load(str(tmp_path / "cuda_model.pth"))
    assert next(cpu_model.parameters()).device.type == "cpu"
    for (name, p), q in zip(model.state_dict().items(), cpu_model.state_dict().values()):
        assert torch.equal(p.cpu(), q), name
    assert all(t.device.type == "cpu" for s in cpu_optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))

    # Reference outputs: the CUDA model copied to CPU in memory (no file, no checkpointer), run
    # with the same CPU kernels as the loaded model, so they must be identical.
    reference = copy.deepcopy(model).cpu().eval()
    inputs = [{"image": image, "height": 128, "width": 128}]
    with torch.no_grad():
        expected = reference(inputs)[0]["instances"]
        got = cpu_model.eval()(inputs)[0]["instances"]
        # And the loaded model computes what the CUDA one does (backbone features: no ranking ties).
        x = (image.cuda() - model.pixel_mean) / model.pixel_std
        gpu_features = model.eval().backbone(x[None])
        cpu_features = cpu_model.backbone(x.cpu()[None])
    assert len(got) == len(expected) > 0
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(got.get(field), expected.get(field)), field
    assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    for name, f in gpu_features.items():
        torch.testing.assert_close(cpu_features[name], f.cpu(), rtol=1e-3, atol=1e-4, msg=name)
