"""Bad input never crashes a long run: validate and repair dataset records before Detectron2 maps
them, and skip (or, with ``DATALOADER.STRICT``, refuse) a sample whose mapping fails, with a
message that names the image file and the annotation.

- :func:`read_image`: Detectron2's ``read_image`` that also takes 16-bit and float images (PIL
  would saturate them when converting to RGB) and brings them to 8 bits; grayscale and RGBA become
  3-channel like any other image. A missing or undecodable file raises :class:`BadSampleError`.
- :func:`repair_annotations`: clips boxes to the image and drops zero-area, inverted and
  out-of-image ones, polygons with fewer than 3 points and RLE/bitmasks whose size is not the
  image's, each with a log line naming the file and the annotation id. Crowd regions are kept
  (Detectron2's mapper ignores them for training, its evaluators use them).
- :class:`RobustDatasetMapper`: wraps any mapper. A sample that fails returns ``None`` — Detectron2's
  ``MapDataset`` then draws another index — after a warning; ``num_skipped`` counts them.

Test loaders must not retry another index (the evaluator would see an image twice), so
:func:`build_robust_test_loader` removes unreadable images when it builds the loader and maps
the rest strictly.
"""
import copy
import logging
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .resume import build_resumable_train_loader

logger = logging.getLogger(__name__)

__all__ = [
    "BadSampleError",
    "read_image",
    "repair_annotations",
    "RobustDatasetMapper",
    "LevelSetDatasetMapper",
    "build_robust_train_loader",
    "build_robust_test_loader",
]


class BadSampleError(ValueError):
    """A dataset sample (image file or annotation) that cannot be used."""


def _describe(record, ann=None) -> str:
    where = f"image {record.get('file_name', '<no file_name>')!r}"
    if record.get("image_id") is not None:
        where += f" (image_id {record['image_id']})"
    if ann is not None:
        where += f", annotation id {ann.get('id', '<none>')}"
    return where


# ------------------------------------------------------------------------------- images
def _open(file_name) -> Image.Image:
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: a truncated or corrupt file fails here, not in the model
    except FileNotFoundError as e:
        raise BadSampleError(f"image file not found: {file_name!r}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(f"cannot decode image file {file_name!r}: {e}") from e
    return image


def read_image(file_name, format="BGR"):
    """Detectron2's ``utils.read_image`` for any 8/16-bit or float, gray/RGB/RGBA file.

    Returns:
        (H, W, 3) uint8 array in ``format`` ("BGR" or "RGB"; other PIL modes as Detectron2 does).
    """
    image = ImageOps.exif_transpose(_open(file_name))  # upright as the camera held it, like Detectron2
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's convert("RGB") clips these at 255: rescale by the dtype's range instead.
        array = np.asarray(image)
        scale = 255.0 / 65535.0 if array.dtype.kind in "ui" and array.max() > 255 else 1.0
        if array.dtype.kind == "f":
            scale = 255.0 if array.max() <= 1.0 else 1.0
        logger.info(f"{file_name!r}: {image.mode} image ({array.dtype}) converted to 8-bit")
        image = Image.fromarray(np.clip(array.astype(np.float64) * scale, 0, 255).round().astype(np.uint8))
    elif image.mode != "RGB":
        logger.info(f"{file_name!r}: {image.mode} image converted to 3-channel {format}")
    return utils.convert_PIL_to_numpy(image, format)


def image_size(file_name):
    """(height, width) from the file's header; :class:`BadSampleError` if it cannot be opened."""
    try:
        with PathManager.open(file_name, "rb") as f:
            width, height = Image.open(f).size
    except FileNotFoundError as e:
        raise BadSampleError(f"image file not found: {file_name!r}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(f"cannot decode image file {file_name!r}: {e}") from e
    return height, width


# ------------------------------------------------------------------------------- annotations
def _segmentation_problem(segm, height, width) -> Optional[str]:
    """Repair a polygon list in place (drop parts with < 3 points); the reason to drop it, or None."""
    if isinstance(segm, list):
        kept = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if len(kept) < len(segm):
            segm[:] = kept
            if not kept:
                return "no polygon with at least 3 points"
        return None
    if isinstance(segm, dict):
        size = segm.get("size")
        if size is not None and tuple(size) != (height, width):
            return f"RLE size {tuple(size)} is not the image's {(height, width)}"
        return None
    if isinstance(segm, np.ndarray):
        if segm.shape[:2] != (height, width):
            return f"bitmask shape {segm.shape[:2]} is not the image's {(height, width)}"
        return None
    return f"unsupported segmentation type {type(segm).__name__}"


def repair_annotations(record, height, width):
    """Drop or clip the unusable annotations of a record (a copy is returned).

    Boxes are clipped to the image; those left with no area (zero-area, inverted, outside the
    image) are dropped, as are masks that cannot be used. Every change is logged with the file
    name and the annotation id.
    """
    record = copy.copy(record)
    kept = []
    for ann in record.get("annotations", []):
        ann = copy.deepcopy(ann)
        problem = None
        if "bbox" in ann:
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            x0, y0, x1, y1 = [float(v) for v in box]
            if not np.isfinite([x0, y0, x1, y1]).all():
                problem = f"non-finite box {list(ann['bbox'])}"
            elif x1 <= x0 or y1 <= y0:
                problem = f"box {list(ann['bbox'])} has no area (zero-size or inverted)"
            else:
                clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                           min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    problem = f"box {list(ann['bbox'])} lies outside the {width}x{height} image"
                elif clipped != [x0, y0, x1, y1]:
                    logger.info(f"{_describe(record, ann)}: box {list(ann['bbox'])} clipped to the image")
                    ann["bbox"], ann["bbox_mode"] = clipped, BoxMode.XYXY_ABS
        if problem is None and "segmentation" in ann:
            problem = _segmentation_problem(ann["segmentation"], height, width)
        if problem is not None:
            logger.warning(f"{_describe(record, ann)} dropped: {problem}")
            continue
        kept.append(ann)
    if "annotations" in record:
        record["annotations"] = kept
    return record


# ------------------------------------------------------------------------------- mappers
class LevelSetDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` reading images with :func:`read_image` (16-bit and float
    images are rescaled instead of saturated). Same augmentations and targets; no semantic
    segmentation or precomputed proposals, which these projects do not use."""

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict


class RobustDatasetMapper:
    """Wrap a mapper so that one bad sample is skipped with a warning (or, ``strict``, raises a
    :class:`BadSampleError` with the same message) instead of crashing the run.

    Before the mapper sees a record its annotations are repaired (:func:`repair_annotations`,
    when ``repair``); a record left without annotations is skipped if ``filter_empty`` (as
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` would have done) and kept as a negative otherwise.

    When the first ``max_failures_before_success`` samples all fail, the dataset itself is wrong
    (image root, file names) and it raises rather than retrying forever. Counts are per data
    loader worker.
    """

    def __init__(self, mapper: Callable, *, strict: bool = False, filter_empty: bool = True,
                 repair: bool = True, max_failures_before_success: int = 50):
        self.mapper = mapper
        self.strict = strict
        self.filter_empty = filter_empty
        self.repair = repair
        self.max_failures_before_success = max_failures_before_success
        self.num_skipped = 0
        self.num_mapped = 0

    def _fail(self, message, cause=None):
        if self.strict:
            raise BadSampleError(message + " (DATALOADER.STRICT is on)") from cause
        self.num_skipped += 1
        logger.warning(f"skipping sample ({self.num_skipped} so far): {message}")
        if self.num_mapped == 0 and self.num_skipped >= self.max_failures_before_success:
            raise BadSampleError(f"the first {self.num_skipped} samples all failed, the last with: {message}; "
                                 "check the dataset's image root and file names") from cause
        return None

    def __call__(self, record):
        ann = record.get("annotation")  # DELSE's per-instance records
        try:
            if self.repair and "annotations" in record:
                height, width = record.get("height"), record.get("width")
                if height is None or width is None:
                    height, width = image_size(record["file_name"])
                had = len(record["annotations"])
                record = repair_annotations(record, height, width)
                if had and not record["annotations"] and self.filter_empty:
                    return self._fail(f"{_describe(record)}: no usable annotation left")
            out = self.mapper(record)
        except Exception as e:  # one bad sample must not end a long run
            return self._fail(f"{_describe(record, ann)}: {type(e).__name__}: {e}", e)
        self.num_mapped += out is not None
        return out


def build_robust_train_loader(cfg, mapper=None):
    """The train loader of ``cfg.DATASETS.TRAIN`` with :class:`RobustDatasetMapper` around ``mapper``
    (default :class:`LevelSetDatasetMapper`) and a resumable ``TrainingSampler``
    (:func:`levelset_d2.resume.build_resumable_train_loader`)."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN = {cfg.DATALOADER.SAMPLER_TRAIN!r}: only TrainingSampler "
                         "is supported (a resume continues its stream)")
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    mapper = LevelSetDatasetMapper(cfg, True) if mapper is None else mapper
    robust = RobustDatasetMapper(mapper, strict=cfg.DATALOADER.STRICT,
                                 filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    return build_resumable_train_loader(dicts, mapper=robust, total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                                        num_workers=cfg.DATALOADER.NUM_WORKERS)


def usable_images(dataset_dicts, strict=False) -> List[dict]:
    """The records whose image file opens (header only); the others are logged, or raise."""
    out = []
    for record in dataset_dicts:
        try:
            image_size(record["file_name"])
        except BadSampleError as e:
            if strict:
                raise BadSampleError(f"{e} (DATALOADER.STRICT is on)") from e
            logger.warning(f"leaving out of evaluation: {e}")
            continue
        out.append(record)
    return out


def build_robust_test_loader(cfg, dataset_name, mapper=None):
    """``build_detection_test_loader`` over the images that open; each maps strictly (a test
    loader must not substitute another image) with a message naming the file."""
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dicts = usable_images(dicts, strict=cfg.DATALOADER.STRICT)
    mapper = LevelSetDatasetMapper(cfg, False) if mapper is None else mapper
    return build_detection_test_loader(
        dataset=dicts, mapper=RobustDatasetMapper(mapper, strict=True, repair=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
