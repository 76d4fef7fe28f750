"""DELSE data: one sample per object instance, cropped around its box (DEXTR protocol).

Works on any Detectron2 instance dataset: :func:`flatten_instances` turns image records into
instance records, :class:`DELSEDatasetMapper` crops one instance and builds the network input
(image crop + extreme-point heatmap) and the targets (GT mask, TSDF in pixels, direction field).

Coordinates: points are ``(x, y)`` in pixel-index units (pixel ``i`` has its centre at ``i``);
boxes are ``(x0, y0, x1, y1)`` in continuous units (pixel ``i`` covers ``[i, i + 1]``).
"""
import copy
import logging
import zlib

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_util

import levelset
from levelset.metrics import to_rle
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.build import get_detection_dataset_dicts
from levelset_d2.resume import build_resumable_train_loader
from levelset_d2.robust_data import RobustDatasetMapper, read_image, usable_images

logger = logging.getLogger(__name__)

__all__ = [
    "flatten_instances",
    "to_rle",
    "mask_area",
    "decode_mask",
    "extreme_points",
    "perturb_clicks",
    "points_heatmap",
    "crop_box_around",
    "crop_matrix",
    "warp_to_crop",
    "points_to_crop",
    "points_to_image",
    "paste_to_image",
    "paste_scores",
    "mask_box",
    "points_box",
    "DELSEDatasetMapper",
    "build_delse_train_loader",
    "build_delse_test_loader",
]


# ------------------------------------------------------------------------------- instances
def flatten_instances(dataset_dicts, min_area=0.0):
    """Image records -> one record per usable instance.

    Crowd instances and instances whose mask has fewer than ``min_area`` pixels are skipped; the
    counts are logged.

    Returns:
        list[dict]: the image record's fields (file_name, height, width, image_id) plus
        ``annotation`` (the instance's annotation dict) and ``instance_id`` ("<image_id>_<k>").
    """
    out, crowd, tiny = [], 0, 0
    for record in dataset_dicts:
        base = {k: v for k, v in record.items() if k != "annotations"}
        for k, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            if "segmentation" not in ann:
                continue
            if min_area > 0 and mask_area(ann["segmentation"], record["height"], record["width"]) < min_area:
                tiny += 1
                continue
            inst = dict(base)
            inst["annotation"] = ann
            inst["instance_id"] = f"{record.get('image_id', record['file_name'])}_{k}"
            out.append(inst)
    logger.info(
        f"DELSE: {len(out)} instances from {len(dataset_dicts)} images "
        f"(skipped {crowd} crowd, {tiny} with area < {min_area} px)"
    )
    return out


def mask_area(segmentation, height, width):
    """Pixel count of a COCO polygon list / RLE dict (without decoding it)."""
    if isinstance(segmentation, list) and len(segmentation) == 0:
        return 0
    return int(mask_util.area(to_rle(segmentation, height, width)))


def decode_mask(segmentation, height, width):
    """COCO polygon list / RLE dict (compressed or not) -> (H, W) bool array."""
    if isinstance(segmentation, list) and len(segmentation) == 0:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation, (list, dict)):
        return mask_util.decode(to_rle(segmentation, height, width)).astype(bool)
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    raise ValueError(f"unsupported segmentation type {type(segmentation)}")


def extreme_points(mask, jitter=0, rng=None):
    """Left-, right-most, top and bottom pixel of a mask, ties picked like DEXTR.

    Among the pixels within ``jitter`` pixels of each extreme (DEXTR's ``pert``; exact extremes
    for 0) one is chosen uniformly at random, which also breaks ties between equal extremes.

    Args:
        mask: (H, W) bool, not empty.
        jitter: int, pixels.
        rng: np.random.Generator (default: a fresh unseeded one).
    Returns:
        (4, 2) float32 array of (x, y): left, right, top, bottom.
    """
    rng = np.random.default_rng() if rng is None else rng
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("extreme points of an empty mask")
    candidates = [
        xs <= xs.min() + jitter,
        xs >= xs.max() - jitter,
        ys <= ys.min() + jitter,
        ys >= ys.max() - jitter,
    ]
    points = []
    for sel in candidates:
        idx = np.flatnonzero(sel)
        i = idx[rng.integers(len(idx))]
        points.append((xs[i], ys[i]))
    return np.asarray(points, dtype=np.float32)


def perturb_clicks(points, box, noise, rng, image_size=None):
    """A lazy annotator's clicks (DELSE Table 7): each coordinate moves by ``U[-noise, noise]``
    times the box side along it (x by the width, y by the height).

    Args:
        points: (P, 2) (x, y); box: (x0, y0, x1, y1); noise: fraction, e.g. 0.05 for +-5 %;
        rng: np.random.Generator; image_size: optional (H, W), clicks are kept inside the image.
    Returns:
        (P, 2) float32.
    """
    side = np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float64)
    points = np.asarray(points, dtype=np.float64) + rng.uniform(-1, 1, size=np.shape(points)) * noise * side
    if image_size is not None:
        points = np.clip(points, 0, np.array(image_size[::-1]) - 1)
    return points.astype(np.float32)


def points_heatmap(points, size, sigma):
    """Max over points of a Gaussian ``exp(-d^2 / (2 sigma^2))`` (DEXTR's 4th channel).

    Args:
        points: (P, 2) tensor/array of (x, y); size: (H, W); sigma: float or (P,) tensor.
    Returns:
        (H, W) float32 tensor in [0, 1] (zeros for no points), on the points' device.
    """
    H, W = size
    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    if len(points) == 0:
        return torch.zeros((H, W), device=points.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=points.device).clamp_min(1e-3)
    sigma = sigma.expand(len(points)).view(-1, 1, 1)
    ys = torch.arange(H, dtype=torch.float32, device=points.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32, device=points.device).view(1, 1, W)
    d2 = (xs - points[:, 0].view(-1, 1, 1)) ** 2 + (ys - points[:, 1].view(-1, 1, 1)) ** 2
    return torch.exp(-d2 / (2.0 * sigma**2)).amax(dim=0)


# ------------------------------------------------------------------------------- crops
def crop_box_around(box, margin, mode):
    """Crop box of an instance box: expanded by ``margin`` pixels on each side.

    ``"stretch"`` keeps the expanded box (it is later resized to the square input);
    ``"square"`` takes the square of side ``max(w, h) + 2 margin`` centred on the box.
    """
    x0, y0, x1, y1 = [float(v) for v in box]
    if mode == "stretch":
        return np.array([x0 - margin, y0 - margin, x1 + margin, y1 + margin], dtype=np.float64)
    if mode == "square":
        half = max(x1 - x0, y1 - y0) / 2.0 + margin
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        return np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float64)
    raise ValueError(f"unknown crop mode {mode!r}; expected 'stretch' or 'square'")


def crop_matrix(crop_box, size):
    """2x3 affine map from image pixel indices to crop pixel indices (cv2.warpAffine's ``M``)."""
    x0, y0, x1, y1 = crop_box
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    # Continuous coordinates u = s (x - x0) with pixel centres at index + 0.5.
    return np.array([[sx, 0.0, sx * (0.5 - x0) - 0.5], [0.0, sy, sy * (0.5 - y0) - 0.5]])


def rotate_and_scale(image, mask, degrees, scale):
    """DEXTR's ``ScaleNRotate`` training augmentation: the image and the instance mask rotated by
    ``degrees`` (counter-clockwise) and scaled by ``scale`` about the mask box's centre, on a canvas of
    the image's size (what leaves it is cut, in both alike; zeros come in).

    Args:
        image: (H, W, 3) uint8; mask: (H, W) bool, not empty; degrees: float; scale: float > 0.
    Returns:
        (image, mask) warped, same shapes and dtypes; the mask may be empty if the object left the canvas.
    """
    H, W = mask.shape
    x0, y0, x1, y1 = mask_box(mask)
    # Pixel indices: the box's centre in index units is its continuous centre minus 0.5.
    M = cv2.getRotationMatrix2D(((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5), float(degrees), float(scale))
    image = cv2.warpAffine(image, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(mask.astype(np.float32), M, (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0) >= 0.5
    return image, mask


def warp_to_crop(array, crop_box, size, interpolation=cv2.INTER_LINEAR):
    """Crop ``crop_box`` out of an (H, W[, C]) array and resize it to (size, size); zero outside."""
    return cv2.warpAffine(
        array, crop_matrix(crop_box, size), (size, size), flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def points_to_crop(points, crop_box, size):
    """(P, 2) image points -> crop points."""
    M = crop_matrix(crop_box, size)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (points @ M[:, :2].T + M[:, 2]).astype(np.float32)


def points_to_image(points, crop_box, size):
    """(P, 2) crop points -> image points (inverse of :func:`points_to_crop`)."""
    M = crop_matrix(crop_box, size)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return ((points - M[:, 2]) / np.diag(M[:, :2])).astype(np.float32)


def paste_to_image(level_set, crop_box, height, width):
    """Resample a crop's level set onto the image and threshold it at 0.

    Args:
        level_set: (S, S) float array/tensor on the crop grid, positive inside.
    Returns:
        (height, width) bool array; False outside the crop.
    """
    # Pad with a negative value so the zero level does not leak past the crop border.
    return paste_scores(level_set, crop_box, height, width, fill=-1.0) > 0


def paste_scores(scores, crop_box, height, width, fill):
    """Bilinearly resample an (S, S) map on the crop grid onto the image; ``fill`` outside.

    Returns:
        (height, width) float32 array.
    """
    if torch.is_tensor(scores):
        scores = scores.detach().float().cpu().numpy()
    size = scores.shape[-1]
    return cv2.warpAffine(
        scores.astype(np.float32), crop_matrix(crop_box, size), (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=float(fill),
    )


def mask_box(mask):
    """Tight continuous box (x0, y0, x1, y1) of a non-empty (H, W) bool mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def points_box(points):
    """Continuous box of clicked pixels (x, y): the box the annotator's extreme points span."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.array([points[:, 0].min(), points[:, 1].min(),
                     points[:, 0].max() + 1, points[:, 1].max() + 1])


def _stable_seed(key):
    return zlib.crc32(str(key).encode())


# ------------------------------------------------------------------------------- mapper
class DELSEDatasetMapper:
    """Instance record (from :func:`flatten_instances`) -> DELSE sample.

    Output dict (S = input size):
        image: (3, S, S) float32 crop in ``cfg.INPUT.FORMAT``, 0-255.
        extreme_heatmap: (1, S, S) float32 in [0, 1], Gaussians at the extreme points.
        extreme_points: (4, 2) float32 (x, y) in crop pixels.
        gt_mask: (S, S) bool. gt_tsdf: (1, S, S) TSDF in crop pixels, truncated at D, positive
        inside. gt_direction: (2, S, S) unit (vx, vy) towards the GT boundary (eq. 5).
        crop_box: (4,) float64 (x0, y0, x1, y1) in image pixels (of the rotated and scaled image
        when that training augmentation is on); plus file_name, height, width,
        image_id, instance_id, category_id and, at test time, the annotation.
    """

    @configurable
    def __init__(self, is_train, *, input_size, crop_margin, crop_mode, jitter, noise,
                 heatmap_sigma, tsdf_truncation, image_format, random_flip,
                 random_rotation=0.0, random_scale=(1.0, 1.0)):
        self.is_train = is_train
        self.input_size = int(input_size)
        self.crop_margin = float(crop_margin)
        self.crop_mode = crop_mode
        self.jitter = int(jitter) if is_train else 0
        self.noise = 0.0 if is_train else float(noise)
        self.heatmap_sigma = float(heatmap_sigma)
        self.tsdf_truncation = float(tsdf_truncation)
        self.image_format = image_format
        self.random_flip = bool(random_flip) and is_train
        self.random_rotation = float(random_rotation) if is_train else 0.0
        self.random_scale = tuple(float(v) for v in random_scale) if is_train else (1.0, 1.0)
        if len(self.random_scale) != 2 or not 0 < self.random_scale[0] <= self.random_scale[1]:
            raise ValueError(f"INPUT.DELSE.RANDOM_SCALE must be (min, max) with 0 < min <= max, got {random_scale}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        d = cfg.INPUT.DELSE
        return {
            "is_train": is_train,
            "input_size": d.INPUT_SIZE,
            "crop_margin": d.CROP_MARGIN,
            "crop_mode": d.CROP_MODE,
            "jitter": d.EXTREME_POINT_JITTER,
            "noise": d.EXTREME_POINT_NOISE,
            "heatmap_sigma": d.HEATMAP_SIGMA,
            "tsdf_truncation": cfg.MODEL.DELSE.TSDF_TRUNCATION,
            "image_format": cfg.INPUT.FORMAT,
            "random_flip": d.RANDOM_FLIP,
            "random_rotation": d.RANDOM_ROTATION,
            "random_scale": d.RANDOM_SCALE,
        }

    def __call__(self, record):
        record = copy.copy(record)
        ann = record["annotation"]
        image = read_image(record["file_name"], format=self.image_format)  # 16-bit, gray, RGBA -> 8-bit
        H, W = image.shape[:2]
        mask = decode_mask(ann["segmentation"], H, W)
        if not mask.any():
            raise ValueError(f"instance {record.get('instance_id')} has an empty mask")
        # Training draws fresh points every epoch; evaluation is deterministic per instance.
        # (numpy's global state, which Detectron2 seeds per worker, seeds the training draws).
        seed = np.random.randint(2**31) if self.is_train else _stable_seed(record.get("instance_id"))
        rng = np.random.default_rng(seed)
        if self.random_rotation > 0 or self.random_scale != (1.0, 1.0):
            warped = rotate_and_scale(image, mask, rng.uniform(-self.random_rotation, self.random_rotation),
                                      rng.uniform(*self.random_scale))
            if warped[1].any():  # else the object left the canvas: keep the sample as it is
                image, mask = warped
        points = extreme_points(mask, self.jitter, rng)
        box = mask_box(mask)
        if self.noise > 0:
            # As the predictor does, the crop follows the clicks (their box is mask_box without noise).
            points = perturb_clicks(points, box, self.noise, rng, (H, W))
            box = points_box(points)

        S = self.input_size
        crop_box = crop_box_around(box, self.crop_margin, self.crop_mode)
        crop = warp_to_crop(image, crop_box, S)
        crop_mask = warp_to_crop(mask.astype(np.float32), crop_box, S) >= 0.5
        crop_points = points_to_crop(points, crop_box, S)
        if self.random_flip and rng.random() < 0.5:
            crop, crop_mask = crop[:, ::-1], crop_mask[:, ::-1]
            crop_points[:, 0] = S - 1 - crop_points[:, 0]
            record["flipped"] = True
        if not crop_mask.any():  # sub-pixel instance in a large crop: keep its centre pixel
            c = points_to_crop(((box[:2] + box[2:]) / 2 - 0.5)[None], crop_box, S)[0]
            crop_mask = np.zeros((S, S), bool)
            crop_mask[int(np.clip(round(c[1]), 0, S - 1)), int(np.clip(round(c[0]), 0, S - 1))] = True

        gt_mask = torch.from_numpy(np.ascontiguousarray(crop_mask))
        D = self.tsdf_truncation
        record["image"] = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float()
        record["extreme_points"] = torch.from_numpy(crop_points)
        record["extreme_heatmap"] = points_heatmap(record["extreme_points"], (S, S), self.heatmap_sigma)[None]
        record["gt_mask"] = gt_mask
        record["gt_tsdf"] = levelset.mask_to_tsdf(gt_mask[None], D) * D  # pixels, in [-D, D]
        record["gt_direction"] = levelset.direction_field(gt_mask[None])[0]
        record["crop_box"] = crop_box
        record["category_id"] = ann.get("category_id", 0)
        if self.is_train:
            record.pop("annotation")
        return record


# ------------------------------------------------------------------------------- loaders
def build_delse_train_loader(cfg):
    """Infinite loader of DELSE samples from ``cfg.DATASETS.TRAIN`` (one sample per instance)."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    instances = flatten_instances(dicts, cfg.INPUT.DELSE.MIN_AREA)
    return build_resumable_train_loader(
        instances,
        # A bad instance (unreadable image, empty mask) is skipped with a warning, or DATALOADER.STRICT.
        mapper=RobustDatasetMapper(DELSEDatasetMapper(cfg, True), strict=cfg.DATALOADER.STRICT),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_delse_test_loader(cfg, dataset_name):
    """Loader over every usable instance of ``dataset_name``, one sample per batch."""
    # Images that do not open are left out (logged); a failing instance raises naming its file.
    images = usable_images(DatasetCatalog.get(dataset_name), strict=cfg.DATALOADER.STRICT)
    instances = flatten_instances(images, cfg.INPUT.DELSE.MIN_AREA)
    return build_detection_test_loader(
        dataset=instances,
        mapper=RobustDatasetMapper(DELSEDatasetMapper(cfg, False), strict=True),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
