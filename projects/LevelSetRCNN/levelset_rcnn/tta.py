"""Test-time augmentation of LevelSet R-CNN models (Table 1 "MS+F"): Detectron2's
``GeneralizedRCNNWithTTA`` that also works with the image crop (``MODEL.LEVELSET.IMAGE_FEATURES``
"raw") and keeps phi_N (``pred_tsdf``), so that the evaluator writes polygons."""
import torch
from fvcore.transforms import HFlipTransform

from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.modeling.postprocessing import detector_postprocess

from .roi_heads import with_image

__all__ = ["LevelSetRCNNWithTTA"]


class LevelSetRCNNWithTTA(GeneralizedRCNNWithTTA):
    """Boxes from every augmentation merged, then the masks of the merged boxes averaged over the
    augmentations, as Detectron2's TTA: ``pred_masks`` is the mean of H_eps(phi_N) and, where the model
    returns it (``MODEL.LEVELSET.RETURN_POLYGONS``), ``pred_tsdf`` the mean of phi_N (both flipped
    back first)."""

    def _batch_inference(self, batched_inputs, detected_instances=None):
        if detected_instances is None:
            return super()._batch_inference(batched_inputs)
        # GeneralizedRCNN.inference(detected_instances=...) gives the ROI heads no image, which the
        # image crop needs: run its given-boxes path with the image beside the features.
        model, outputs = self.model, []
        for i in range(0, len(batched_inputs), self.batch_size):
            images = model.preprocess_image(batched_inputs[i:i + self.batch_size])
            features = with_image(model.backbone(images.tensor), images)
            instances = [x.to(model.device) for x in detected_instances[i:i + self.batch_size]]
            outputs.extend(model.roi_heads.forward_with_given_boxes(features, instances))
        return outputs

    def _inference_one_image(self, input):
        orig_shape = (input["height"], input["width"])
        augmented_inputs, tfms = self._get_augmented_inputs(input)
        with self._turn_off_roi_heads(["mask_on", "keypoint_on"]):
            all_boxes, all_scores, all_classes = self._get_augmented_boxes(augmented_inputs, tfms)
        merged = self._merge_detections(all_boxes, all_scores, all_classes, orig_shape)
        if not self.cfg.MODEL.MASK_ON:
            return {"instances": merged}
        outputs = self._batch_inference(augmented_inputs, self._rescale_detected_boxes(augmented_inputs, merged, tfms))
        if all(o.has("pred_tsdf") for o in outputs):
            merged.pred_tsdf = _mean_unflipped([o.pred_tsdf for o in outputs], tfms)
        merged.pred_masks = self._reduce_pred_masks(outputs, tfms)
        return {"instances": detector_postprocess(merged, *orig_shape)}


def _mean_unflipped(maps, tfms):
    """Mean of (R, 1, S, S) RoI maps, each flipped back where its augmentation flipped the image."""
    return torch.stack([
        m.flip(dims=[3]) if any(isinstance(t, HFlipTransform) for t in tfm.transforms) else m
        for m, tfm in zip(maps, tfms)
    ]).mean(dim=0)
