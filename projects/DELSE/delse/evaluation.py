"""Evaluation of crop-based annotation (DELSE section 5): IoU per class, boundary F at 1 and 2 px,
the DAVIS J/F statistics, the boundary-F curve over 1-10 px, IoU after simulated drags and,
optionally, the mIoU at the best mask threshold. All measures come from ``levelset.metrics`` and
are computed in image coordinates."""
import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from levelset import metrics

from .data import decode_mask, paste_scores

logger = logging.getLogger(__name__)

__all__ = ["DELSEEvaluator", "instance_scores", "threshold_ious", "search_threshold"]


def instance_scores(pred, gt, tolerances, void=None):
    """Per-instance measures of one (H, W) prediction against its (H, W) GT mask; the pixels of
    the optional (H, W) ``void`` mask are left out of the IoU (DEXTR's PASCAL protocol).

    Returns:
        dict: ``iou``, ``f_curve`` (F at each tolerance in pixels) and ``f_davis`` (F at DAVIS's
        official tolerance, 0.8 % of the image diagonal).
    """
    return {
        "iou": metrics.jaccard(pred, gt, void),
        "f_curve": metrics.boundary_f_curve(pred, gt, tolerances).tolist(),
        "f_davis": metrics.boundary_f_measure(pred, gt, metrics.DAVIS_TOLERANCE)[2],
    }


def threshold_ious(scores, gt, thresholds, void=None):
    """IoU of ``scores > t`` against ``gt`` for every threshold.

    Args:
        scores: (H, W) float array (phi_T or a probability, pasted onto the image); gt: (H, W)
        bool; thresholds: sequence of T floats; void: optional (H, W) bool, pixels left out.
    Returns:
        (T,) float array.
    """
    return np.array([metrics.jaccard(scores > t, gt, void) for t in thresholds])


def search_threshold(ious, thresholds):
    """The paper's threshold search (after DEXTR): the threshold whose mean IoU over all
    instances is the highest. Optimistic, as it is tuned on the data it is reported on.

    Args:
        ious: (N, T) IoU of each instance at each threshold; thresholds: (T,).
    Returns:
        (threshold, its mean IoU); the first such threshold on ties.
    """
    miou = np.asarray(ious, dtype=np.float64).mean(0)
    best = int(np.argmax(miou))
    return float(thresholds[best]), float(miou[best])


class DELSEEvaluator(DatasetEvaluator):
    """Scores the ``mask`` of every DELSE output against the instance's GT mask.

    Expects inputs from ``DELSEDatasetMapper(cfg, is_train=False)`` (they carry the annotation)
    and outputs of the DELSE model; ``corrections`` in an output (simulated drags) are scored too.
    Results are in percent, like Detectron2's COCO evaluator.

    With ``threshold_search`` (TEST.DELSE.THRESHOLD_SEARCH) it also reports ``mIoU@best_threshold``
    and ``best_threshold``: the threshold on phi_T (crop pixels), or on ``prob`` for the
    pixel-wise baseline, that maximises mIoU over the evaluated instances (no drags; boundary F
    and the drags stay at the default threshold). It is on by default for every model, so DELSE
    and the baselines are compared alike, each beside its default-threshold mIoU.

    On a video dataset (metadata ``video_sequences``: DAVIS 2016, image ids "<sequence>/<frame>"),
    J/F mean, recall and decay are the DAVIS toolkit's: per sequence over frames [1:-1], then
    averaged over sequences (:func:`levelset.metrics.davis_sequence_measures`); elsewhere they are
    over instances.
    """

    def __init__(self, dataset_name, cfg=None, output_dir=None, *, tolerances=None, distributed=True,
                 threshold_search=None, phi_thresholds=None, prob_thresholds=None):
        self.dataset_name = dataset_name
        if tolerances is None:
            tolerances = cfg.TEST.DELSE.BOUNDARY_TOLERANCES if cfg is not None else range(1, 11)
        self.tolerances = [float(t) for t in tolerances]
        for t in (1.0, 2.0):
            if t not in self.tolerances:
                self.tolerances.append(t)
        self.output_dir = output_dir
        self.distributed = distributed
        t = cfg.TEST.DELSE if cfg is not None else None
        self.threshold_search = bool(t.THRESHOLD_SEARCH if threshold_search is None and t is not None
                                     else threshold_search)
        self.thresholds = {
            "phi": list(phi_thresholds if phi_thresholds is not None else
                        (t.PHI_THRESHOLDS if t is not None else [x / 2.0 for x in range(-20, 21)])),
            "prob": list(prob_thresholds if prob_thresholds is not None else
                         (t.PROB_THRESHOLDS if t is not None else [x / 20.0 for x in range(1, 20)])),
        }
        meta = MetadataCatalog.get(dataset_name)
        self.by_sequence = bool(meta.get("video_sequences", False))
        names = meta.get("thing_classes", None)
        self.class_names = {i: n for i, n in enumerate(names)} if names else {}
        self.reset()

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            gt = decode_mask(x["annotation"]["segmentation"], x["height"], x["width"])
            void = (decode_mask(x["void_segmentation"], x["height"], x["width"])
                    if "void_segmentation" in x else None)  # PASCAL (delse.datasets)
            rec = {"instance_id": x.get("instance_id"), "image_id": x.get("image_id"),
                   "category_id": int(x.get("category_id", 0))}
            rec.update(instance_scores(out["mask"].cpu().numpy(), gt, self.tolerances, void))
            rec["corrections"] = [
                instance_scores(c["mask"].cpu().numpy(), gt, self.tolerances, void)
                for c in out.get("corrections", [])
            ]
            if self.threshold_search:
                kind = "prob" if "prob" in out else "phi"
                grid = self.thresholds[kind]
                scores = paste_scores(out[kind][0], x["crop_box"], x["height"], x["width"], min(grid) - 1.0)
                rec["threshold_kind"] = kind
                rec["threshold_ious"] = threshold_ious(scores, gt, grid, void).tolist()
            self._records.append(rec)

    def evaluate(self):
        records = self._records
        if self.distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(records, dst=0)))
            if not comm.is_main_process():
                return {}
        if not records:
            logger.warning(f"DELSEEvaluator: no predictions on {self.dataset_name}")
            return {}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "delse_instance_scores.json"), "w") as f:
                json.dump(records, f)
        res = self.summarize(records, self.tolerances, self.thresholds, by_sequence=self.by_sequence)
        by_class = defaultdict(list)
        for r in records:
            by_class[r["category_id"]].append(r["iou"])
        for c, ious in sorted(by_class.items()):
            res[f"mIoU-{self.class_names.get(c, c)}"] = 100 * float(np.mean(ious))
        logger.info(f"DELSE evaluation on {self.dataset_name} ({len(records)} instances):\n"
                    + "\n".join(f"  {k}: {v:.2f}" for k, v in res.items()))
        if self.output_dir:
            with open(os.path.join(self.output_dir, "delse_results.json"), "w") as f:
                json.dump({"num_instances": len(records), **res}, f, indent=1)
        return OrderedDict({"delse": res})

    @staticmethod
    def summarize(records, tolerances, thresholds=None, by_sequence=False):
        """Per-instance scores -> the paper's summary numbers (percent; best_threshold in its
        own units). ``thresholds``: {"phi": [...], "prob": [...]}, the grids searched;
        ``by_sequence``: DAVIS J/F per sequence (image ids "<sequence>/<frame>")."""
        ious = np.array([r["iou"] for r in records])
        curve = np.array([r["f_curve"] for r in records])  # (N, T)
        res = OrderedDict()
        res["mIoU"] = 100 * float(ious.mean())
        res["F@1px"] = 100 * float(curve[:, tolerances.index(1.0)].mean())
        res["F@2px"] = 100 * float(curve[:, tolerances.index(2.0)].mean())
        if by_sequence:
            seq_j, seq_f = defaultdict(list), defaultdict(list)
            for r in sorted(records, key=lambda r: str(r["image_id"])):  # frame order in a sequence
                seq = str(r["image_id"]).split("/")[0]
                seq_j[seq].append(r["iou"])
                seq_f[seq].append(r["f_davis"])
            davis = metrics.davis_sequence_measures(seq_j, seq_f)
        else:
            davis = metrics.davis_measures(ious, [r["f_davis"] for r in records])
        for k, v in davis.items():
            res[k] = 100 * v
        for t, f in zip(tolerances, curve.mean(0)):
            res[f"F_curve@{t:g}px"] = 100 * float(f)
        num = max((len(r["corrections"]) for r in records), default=0)
        for k in range(1, num + 1):
            # An instance with fewer corrections (already perfect) keeps its last result.
            after = [r["corrections"][k - 1] if len(r["corrections"]) >= k else
                     (r["corrections"][-1] if r["corrections"] else r) for r in records]
            res[f"mIoU@{k}drag"] = 100 * float(np.mean([a["iou"] for a in after]))
            res[f"F@1px@{k}drag"] = 100 * float(np.mean([a["f_curve"][tolerances.index(1.0)] for a in after]))
            res[f"F@2px@{k}drag"] = 100 * float(np.mean([a["f_curve"][tolerances.index(2.0)] for a in after]))
            res[f"F_mean@{k}drag"] = 100 * float(np.mean([a["f_davis"] for a in after]))
        if thresholds and all("threshold_ious" in r for r in records):
            kind = records[0]["threshold_kind"]
            best, miou = search_threshold([r["threshold_ious"] for r in records], thresholds[kind])
            res["mIoU@best_threshold"] = 100 * miou
            res["best_threshold"] = best
            if best in (min(thresholds[kind]), max(thresholds[kind])):
                logger.warning(f"DELSE threshold search: the best threshold {best:g} is at the edge of "
                               f"the searched {kind} grid; widen TEST.DELSE.{kind.upper()}_THRESHOLDS")
        return res


def score_instances(cfg, weights, num_instances=0):
    """Per-instance scores of a DELSE model on ``cfg.DATASETS.TEST[0]`` (the benchmark tools).

    Args:
        cfg: the model's config; weights: path of its checkpoint; num_instances: evenly spaced
            instances of the test set to score (0: all).
    Returns:
        (records, evaluator): the DELSEEvaluator's per-instance records and the evaluator (its
        tolerances and threshold grids summarise them).
    """
    import torch

    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model
    from levelset_d2.checkpoint import SafeDetectionCheckpointer

    from .data import DELSEDatasetMapper, flatten_instances

    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(weights))
    model.eval()
    dataset = cfg.DATASETS.TEST[0]
    instances = flatten_instances(DatasetCatalog.get(dataset), cfg.INPUT.DELSE.MIN_AREA)
    if 0 < num_instances < len(instances):
        keep = np.unique(np.linspace(0, len(instances) - 1, num_instances).round().astype(int))
        instances = [instances[i] for i in keep]
    mapper = DELSEDatasetMapper(cfg, False)
    evaluator = DELSEEvaluator(dataset, cfg, distributed=False)
    with torch.no_grad():
        for i in range(0, len(instances), 8):
            inputs = [mapper(x) for x in instances[i: i + 8]]
            evaluator.process(inputs, model(inputs))
    return evaluator._records, evaluator
