"""ROI heads that also give the mask head each RoI's crop of the input image, or its features
pooled again at a finer resolution.

Detectron2's ``StandardROIHeads`` passes the mask head only the pooled FPN features (14 x 14 per
RoI). ``LevelSetMaskHead`` with ``MODEL.LEVELSET.IMAGE_FEATURES: "raw"`` also evolves on the RoI's
image at ``EVOLUTION_RESOLUTION`` (not in the paper; results in BENCHMARKS.md): this subclass pools
that crop from the normalised input (``images.tensor``) with the same boxes as the mask pooler.
With ``MODEL.LEVELSET.FEATURES_POOLER_RESOLUTION: P`` it also pools ``FEATURES_IN_FEATURE`` (p2)
at P x P for the Chan-Vese features head. With any other mask head it behaves exactly as
``StandardROIHeads`` (same parameters, same checkpoints).
"""
from typing import Dict, List

import torch
from torchvision.ops import roi_align

from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, ImageList, Instances

__all__ = ["LevelSetROIHeads", "pool_image_crops", "with_image"]

# Key under which the normalised input image rides along with the FPN features.
IMAGE_KEY = "_levelset_image"
# RoIAlign samples per bin and axis for the image crops. 1: one bilinear sample at each bin centre,
# i.e. the crop resampled bilinearly to S x S, as the embedding is upsampled. Exact for boxes up to S
# px; larger boxes are point-sampled (no anti-aliasing). 2 (the mask pooler's) takes 4x the samples,
# which dominated the option's cost (timings: BENCHMARKS.md).
CROP_SAMPLING_RATIO = 1


def with_image(features: Dict[str, torch.Tensor], images: ImageList) -> Dict[str, torch.Tensor]:
    """
    The backbone's features plus the normalised input, for calling
    ``roi_heads.forward_with_given_boxes(with_image(features, images), instances)`` yourself
    (Detectron2's ``GeneralizedRCNN.inference(detected_instances=...)`` passes no image). Other ROI
    heads ignore the extra key.
    """
    return dict(features, **{IMAGE_KEY: images.tensor})


def pool_image_crops(images: torch.Tensor, boxes: List[Boxes], resolution: int) -> torch.Tensor:
    """
    RoIAlign of the network's input image at ``resolution`` x ``resolution`` per box, one sample
    per bin (:data:`CROP_SAMPLING_RATIO`).

    Args:
        images: (N, 3, H, W) normalised input (``ImageList.tensor``: (pixel - PIXEL_MEAN) / PIXEL_STD).
        boxes: per image, XYXY boxes in the input's pixels.
        resolution: side of the crop (the evolution grid, 112).
    Returns:
        (R, 3, resolution, resolution) crops, RoIs of all images concatenated (the mask pooler's order).
    """
    return roi_align(images, [b.tensor for b in boxes], output_size=resolution, spatial_scale=1.0,
                     sampling_ratio=CROP_SAMPLING_RATIO, aligned=True)


@ROI_HEADS_REGISTRY.register()
class LevelSetROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose mask branch also receives the RoIs' image crops when the mask head
    asks for them (``mask_head.image_crop_resolution > 0``), and the RoIs pooled again from
    ``features_in_feature`` when it has a ``features_pooler_resolution > 0``."""

    @configurable
    def __init__(self, *, features_pooler: ROIPooler = None, features_in_feature: str = "p2", **kwargs):
        """
        Args:
            features_pooler: pools ``features_in_feature`` for the mask head's ``fine_features``
                (None: no such input).
            kwargs: arguments of ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        self.features_pooler = features_pooler
        self.features_in_feature = features_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ls = cfg.MODEL.LEVELSET
        resolution, name = ls.FEATURES_POOLER_RESOLUTION, ls.FEATURES_IN_FEATURE
        if cfg.MODEL.MASK_ON and resolution > 0:
            if name not in input_shape:
                raise ValueError(f"MODEL.LEVELSET.FEATURES_IN_FEATURE {name!r} is not a backbone output "
                                 f"({sorted(input_shape)})")
            ret["features_pooler"] = ROIPooler(
                output_size=resolution, scales=(1.0 / input_shape[name].stride,),
                sampling_ratio=cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
                pooler_type=cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE,
            )
            ret["features_in_feature"] = name
        return ret

    def _wants_image(self) -> bool:
        return self.mask_on and getattr(self.mask_head, "image_crop_resolution", 0) > 0

    def _wants_fine_features(self) -> bool:
        return (self.mask_on and self.features_pooler is not None
                and getattr(self.mask_head, "features_pooler_resolution", 0) > 0)

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor], proposals, targets=None):
        if self._wants_image():
            features = with_image(features, images)
        return super().forward(images, features, proposals, targets)

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        if not (self._wants_image() or self._wants_fine_features()):
            return super()._forward_mask(features, instances)
        if self._wants_image() and IMAGE_KEY not in features:
            raise ValueError(
                "MODEL.LEVELSET.IMAGE_FEATURES needs the input image: call roi_heads(images, features, ...) or "
                "forward_with_given_boxes(levelset_rcnn.roi_heads.with_image(features, images), ...); "
                "GeneralizedRCNN.inference(detected_instances=...) passes no image")
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        x, inputs = self.mask_head_inputs(features, boxes)
        return self.mask_head(x, instances, **inputs)

    def mask_head_inputs(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """
        What the mask head reads for these boxes (the analysis tools call it to rerun the head).

        Args:
            features: the backbone's features, with the image (:func:`with_image`) when the head uses crops.
            boxes: per image, XYXY boxes in the input's pixels.
        Returns:
            (x, inputs): x (R, C, P, P) the mask pooler's RoI features; inputs the head's keyword
            arguments: ``image_crops`` (R, 3, S, S) and / or ``fine_features`` (R, C, P', P') when it uses them.
        """
        x = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        inputs = {}
        if self._wants_image():
            inputs["image_crops"] = pool_image_crops(features[IMAGE_KEY], boxes, self.mask_head.image_crop_resolution)
        if self._wants_fine_features():
            inputs["fine_features"] = self.features_pooler([features[self.features_in_feature]], boxes)
        return x, inputs
