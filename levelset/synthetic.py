"""A small synthetic instance-segmentation dataset in COCO format, for demos and tests.

The images contain the cases the two papers discuss as hard for a pixel-wise mask head and where a
region-based level set should help: objects with holes (``ring``), instances made of several
disconnected components (``pair``), smooth non-convex outlines (``blob``), textured interiors
(noise, stripes), an inhomogeneous background illumination and sensor noise.

Masks are exact: every pixel of an instance's *visible* mask is painted with that instance's
texture, and the annotation decodes to exactly that mask. Unoccluded discs, blobs and pairs are
stored as polygons (rasterised with pycocotools, so ``COCO.annToMask`` gives back the painted
pixels); rings (holes) and any occluded instance are stored as RLE. A dataset therefore mixes both
formats, so Detectron2 must load it with ``INPUT.MASK_FORMAT = "bitmask"``.

Register it with Detectron2 like any COCO json::

    json_file = generate_coco_dataset(root, num_images=200)
    register_coco_instances("synthetic_train", {}, str(json_file), str(json_file.with_suffix("")))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["SYNTHETIC_CATEGORIES", "generate_coco_dataset", "render_synthetic_image"]

# Bump when the rendering changes, so that a cached dataset is regenerated.
_VERSION = 1

SYNTHETIC_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "ring", "supercategory": "shape"},  # one hole
    {"id": 3, "name": "blob", "supercategory": "shape"},  # smooth star-shaped, non-convex
    {"id": 4, "name": "pair", "supercategory": "shape"},  # two disconnected components
]

# An instance whose visible part is smaller than this (pixels, or fraction of its full mask) after
# occlusion is removed from the image altogether, so that no pixel is painted without a label.
_MIN_VISIBLE_AREA = 24
_MIN_VISIBLE_FRACTION = 0.3


def _polygon_mask(polygons: List[List[float]], size: int) -> np.ndarray:
    """Rasterise COCO polygons exactly as ``COCO.annToMask`` does. Returns bool (size, size)."""
    rles = mask_utils.frPyObjects(polygons, size, size)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float,
                  *, wobble: float, num_vertices: int = 48) -> List[float]:
    """A closed polygon r(θ) = radius · (1 + Σ_k a_k cos(kθ + p_k)), k = 2..4 (a circle if
    wobble = 0).

    Returns the flat COCO list [x0, y0, x1, y1, ...] in pixel coordinates.
    """
    theta = np.linspace(0.0, 2.0 * np.pi, num_vertices, endpoint=False)
    r = np.ones_like(theta)
    if wobble > 0:
        for k in (2, 3, 4):
            r += rng.uniform(-wobble, wobble) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.4, None)
    xy = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    return [round(float(v), 2) for v in xy.reshape(-1)]


def _sample_shape(rng: np.random.Generator, category_id: int, size: int
                  ) -> Tuple[np.ndarray, Optional[List[List[float]]]]:
    """One object's full (unoccluded) mask, bool (size, size), and its polygons (None for rings)."""
    rmin, rmax = 0.08 * size, 0.2 * size
    radius = rng.uniform(rmin, rmax)
    margin = radius + 2
    cx, cy = rng.uniform(margin, size - margin, size=2)
    if category_id == 1:  # disc
        polygons = [_star_polygon(rng, cx, cy, radius, wobble=0.0)]
    elif category_id == 3:  # blob
        polygons = [_star_polygon(rng, cx, cy, radius, wobble=0.9)]
    elif category_id == 4:  # pair: two small blobs on either side of (cx, cy), a gap between them
        small = radius * rng.uniform(0.45, 0.6)
        angle = rng.uniform(0, np.pi)
        offset = small * rng.uniform(1.4, 1.8)
        dx, dy = offset * np.cos(angle), offset * np.sin(angle)
        polygons = [_star_polygon(rng, cx + s * dx, cy + s * dy, small, wobble=0.4)
                    for s in (-1, 1)]
    else:  # ring: an annulus, inner radius 40-65 % of the outer one
        yy, xx = np.mgrid[:size, :size]
        dist = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
        inner = radius * rng.uniform(0.4, 0.65)
        return (dist <= radius) & (dist >= inner), None
    return _polygon_mask(polygons, size), polygons


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A per-object texture, float32 (size, size, 3) in [0, 1]: flat, noisy or striped."""
    color = rng.uniform(0.15, 0.95, size=3).astype(np.float32)
    kind = rng.integers(3)
    tex = np.broadcast_to(color, (size, size, 3)).copy()
    if kind == 1:  # per-pixel noise
        tex += rng.normal(0.0, 0.08, size=(size, size, 1)).astype(np.float32)
    elif kind == 2:  # stripes of a second colour at a random angle and period
        yy, xx = np.mgrid[:size, :size].astype(np.float32)
        angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 10.0)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        stripes = (np.sin(2 * np.pi * phase / period) > 0)[..., None]
        second = rng.uniform(0.15, 0.95, size=3).astype(np.float32)
        tex = np.where(stripes, tex, second)
    return np.clip(tex, 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Background colour with mild noise, float32 (size, size, 3)."""
    color = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
    bg = np.broadcast_to(color, (size, size, 3)).copy()
    bg += rng.normal(0.0, 0.04, size=(size, size, 1)).astype(np.float32)
    return bg


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """A multiplicative illumination field, float32 (size, size, 1): a ramp plus a broad spot."""
    yy, xx = (np.mgrid[:size, :size].astype(np.float32) + 0.5) / size
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    sx, sy = rng.uniform(0, 1, size=2)
    spot = np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * rng.uniform(0.2, 0.5) ** 2))
    field = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5) + rng.uniform(0.0, 0.3) * (spot - 0.5)
    return field[..., None].astype(np.float32)


def render_synthetic_image(rng: np.random.Generator, image_size: int = 128,
                           *, max_instances: int = 6) -> Tuple[np.ndarray, List[Dict]]:
    """Render one image and its instances.

    Objects are painted back to front; each instance's mask is its *visible* part (its full mask
    minus every object painted after it). Instances left with too little visible area are removed
    before painting (removing an occluder only enlarges the others, so one pass suffices).

    Args:
        rng: the random generator; the result is a pure function of its state.
        image_size: side S of the square image.
        max_instances: at most this many objects (at least 2).

    Returns:
        image: uint8 (S, S, 3), RGB.
        instances: list of dicts with ``category_id``, ``mask`` (bool (S, S), visible pixels) and
            ``polygons`` (COCO polygons when the visible mask is exactly their raster, else None).
    """
    size = image_size
    num = int(rng.integers(2, max_instances + 1))
    shapes = []
    for _ in range(num):
        category_id = int(rng.integers(1, len(SYNTHETIC_CATEGORIES) + 1))
        full, polygons = _sample_shape(rng, category_id, size)
        shapes.append({"category_id": category_id, "full": full, "polygons": polygons,
                       "texture": _texture(rng, size)})

    def visible_masks(objs):
        covered = np.zeros((size, size), bool)
        out = []
        for obj in reversed(objs):  # front to back
            out.append(obj["full"] & ~covered)
            covered |= obj["full"]
        return out[::-1]

    visible = visible_masks(shapes)
    keep = [
        i for i, (obj, vis) in enumerate(zip(shapes, visible))
        if vis.sum() >= max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRACTION * obj["full"].sum())
    ]
    shapes = [shapes[i] for i in keep]
    visible = visible_masks(shapes)

    image = _background(rng, size)
    for obj in shapes:
        image = np.where(obj["full"][..., None], obj["texture"], image)
    image *= _illumination(rng, size)
    image += rng.normal(0.0, 0.02, size=image.shape).astype(np.float32)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    instances = []
    for obj, vis in zip(shapes, visible):
        occluded = not np.array_equal(vis, obj["full"])
        instances.append({
            "category_id": obj["category_id"],
            "mask": vis,
            "polygons": None if occluded else obj["polygons"],
        })
    return image, instances


def _annotation(instance: Dict, ann_id: int, image_id: int) -> Dict:
    rle = mask_utils.encode(np.asfortranarray(instance["mask"].astype(np.uint8)))
    area = float(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    if instance["polygons"] is not None:
        segmentation = instance["polygons"]
    else:
        segmentation = {"size": [int(s) for s in rle["size"]],
                        "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": instance["category_id"],
            "segmentation": segmentation, "area": area, "bbox": bbox, "iscrowd": 0}


def generate_coco_dataset(root, *, num_images: int, image_size: int = 128, seed: int = 0,
                          split: str = "train") -> Path:
    """Write a synthetic COCO instance-segmentation split and return the path of its json.

    Writes ``root/<split>/<image_id:06d>.png`` (RGB) and ``root/<split>.json`` (COCO "instances"
    format: ``images``, ``annotations`` with polygon or RLE ``segmentation``, XYWH ``bbox``,
    ``area`` and ``iscrowd`` 0, and ``categories`` = :data:`SYNTHETIC_CATEGORIES`). The image root
    to register
    is ``json_path.with_suffix("")``.

    Image ``i`` is rendered from ``np.random.default_rng([seed, i])``, so the output is a pure
    function of the arguments. The arguments are stored in the json's ``info["params"]``; if the
    json exists with the same parameters and all its images are present, nothing is rewritten.

    Args:
        root: output directory (created if missing).
        num_images: number of images N.
        image_size: side S of the square images, in pixels.
        seed: random seed; use different seeds for different splits.
        split: name of the split (file names only).

    Returns:
        Path to ``root/<split>.json``.
    """
    root = Path(root)
    json_path = root / f"{split}.json"
    image_dir = root / split
    params = {"num_images": int(num_images), "image_size": int(image_size), "seed": int(seed),
              "split": str(split), "version": _VERSION}
    if json_path.exists():
        try:
            with open(json_path) as f:
                existing = json.load(f)
            if existing.get("info", {}).get("params") == params and all(
                (image_dir / img["file_name"]).exists() for img in existing["images"]
            ):
                return json_path
        except (json.JSONDecodeError, KeyError):
            pass  # a partial or foreign file: regenerate

    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        image, instances = render_synthetic_image(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        _write_atomic(image_dir / file_name, cv2.imencode(".png", image[:, :, ::-1])[1].tobytes())
        images.append({"id": image_id, "file_name": file_name, "height": image_size,
                       "width": image_size})
        for inst in instances:
            annotations.append(_annotation(inst, len(annotations) + 1, image_id))

    dataset = {
        "info": {"description": "levelset.synthetic: discs, rings (holes), blobs, pairs "
                                "(two components), textured, uneven illumination",
                 "params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SYNTHETIC_CATEGORIES,
    }
    _write_atomic(json_path, json.dumps(dataset).encode())  # last: its presence means "complete"
    return json_path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a private temporary file and rename: a reader (or another worker generating
    the same split at the same time) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
