"""DELSE and the pixel-wise baseline under the standard interactive protocol, on any COCO-json set.

Every annotation of the json(s) is one object (crowd ones skipped), so sets that annotate only some
objects (COCO-MVal) are fine. Per object: the 4 exact extreme points of its mask (4 interactions; ties broken by a seed per annotation id), then
the simulated annotator's corrections (``delse.protocol``: the largest error region, a missed part
included), one per interaction, until the IoU reaches --stop-iou or --max-interactions are spent.
Reports per model: mIoU after 4 (the extreme points: DEXTR's and DELSE's number), 5, 6, 8, 10 and 20
interactions; NoC@85 / NoC@90 (the extreme points counted, at most 20) with the share of objects that
never reach the threshold; worst_step, the largest drop of the mIoU from one interaction to the next
(0: a correction never lowers it on average); boundary F at 1 and 2 px after the extreme points; median latency of the
extreme-point pass and of a correction. With two rows or more, every pair is also compared object
by object (IoU difference after 4, 5, 6, 8 and 20 interactions with a 95 % bootstrap interval).

    D=../shared/data/coco_mval
    .venv/bin/python tools/benchmarks/bench_delse_noc.py --json $D/train.json --json $D/dev.json --image-root $D/images \\
        --model "DELSE" configs/DELSE/delse_R_18_coco_mval.yaml output/delse_R_18_coco_mval/model_final.pth \\
        [--preview] [--max-objects 100] [--output output/noc/mval]

``--preview`` sends every correction through ``correct(preview=True)`` (the editing block and the
evolution on the last full pass's branches); its rows are named "... (preview)" and merge with the
same model's full-pass run, which pairs them object by object: the preview-vs-full gap.

Settings that differ between rows (``MODEL.DELSE.DRAG_EDIT result``) go in separate runs, each with
its ``--output``; ``--merge a.json b.json`` then tabulates and pairs them (same objects and settings,
or an error says which differs). Runs in separate processes also share the cores.

A model's corrections are drags: models that edit the motion field use the whole drag, the others
(``CORRECTION_MODE "clicks"``, the pixel-wise baseline) see its target as a click. Zero-shot numbers
need a model trained on other photos than the set's (COCO-MVal is on COCO val2017).
"""
import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

import delse  # noqa: F401  (registration)
from delse.data import extreme_points
from delse.predictor import DELSEPredictor
from delse.protocol import EXTREME_POINTS, run_protocol, summarize
from levelset.metrics import paired_difference
from levelset_d2.config import get_cfg

# Paired columns: the IoU after this many interactions (the extreme points counted).
PAIRED_AT = (4, 5, 6, 8, 20)
COLUMNS = ["mIoU@4", "mIoU@5", "mIoU@6", "mIoU@8", "mIoU@10", "mIoU@20", "NoC@85", "NoC@90", "failed@85",
           "failed@90", "worst_step", "F@1px", "F@2px", "predict_ms", "correct_ms"]


def load_objects(json_files, image_root, max_objects=0):
    """[(image path, coco, annotation)] of every non-crowd annotation, in file and id order;
    ``max_objects`` > 0 keeps that many, evenly spaced."""
    objects = []
    for path in json_files:
        coco = COCO(path)
        for ann_id in sorted(coco.getAnnIds()):
            ann = coco.loadAnns(ann_id)[0]
            if ann.get("iscrowd", 0):
                continue
            objects.append((Path(image_root) / coco.loadImgs(ann["image_id"])[0]["file_name"], coco, ann))
    if 0 < max_objects < len(objects):
        keep = np.unique(np.linspace(0, len(objects) - 1, max_objects).round().astype(int))
        objects = [objects[i] for i in keep]
    return objects


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--json", required=True, action="append", help="COCO json (repeat to pool files of one image folder)")
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--model", nargs=3, action="append", default=[], metavar=("NAME", "CONFIG", "WEIGHTS"))
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="per-object curves written by earlier runs (--output X: X.json) on the same objects and "
                         "settings, tabulated and compared with this run's (one model or override per process, then merge)")
    ap.add_argument("--max-interactions", type=int, default=20, help="the extreme points included (default: %(default)s)")
    ap.add_argument("--stop-iou", type=float, default=0.90, help="the annotator stops at this IoU (default: %(default)s)")
    ap.add_argument("--preview", action="store_true", help="corrections through correct(preview=True)")
    ap.add_argument("--max-objects", type=int, default=0, help="that many objects, evenly spaced (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--output", help="write the table (.md) and per-object IoU curves (.json) here (without suffix)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every model (KEY VALUE ...)")
    args = ap.parse_args(argv)

    objects = load_objects(args.json, args.image_root, args.max_objects)
    if not objects:
        raise SystemExit(f"no objects in {args.json}")
    ids = [ann["id"] for _, _, ann in objects]
    rows, curves, used_ids = {}, {}, {}
    for name, config_file, weights in args.model:
        cfg = get_cfg()
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(["MODEL.WEIGHTS", weights, "MODEL.DEVICE", args.device, *args.opts])
        predictor = DELSEPredictor(cfg)
        results, kept, t0 = [], [], time.perf_counter()
        for path, coco, ann in objects:
            image = cv2.imread(str(path))
            if image is None:
                raise SystemExit(f"cannot read image {path} (annotation {ann['id']})")
            gt = coco.annToMask(ann) > 0
            if not gt.any():
                print(f"annotation {ann['id']} of {path.name}: empty mask, skipped", flush=True)
                continue
            # Exact extremes; ties (several pixels on the extreme row/column) broken by a per-object seed.
            points = extreme_points(gt, 0, np.random.default_rng(ann["id"]))
            results.append(run_protocol(predictor, image, gt, points, max_interactions=args.max_interactions,
                                        stop_iou=args.stop_iou, preview=args.preview))
            kept.append(ann["id"])
        name += " (preview)" if args.preview else ""
        rows[name] = summarize(results, max_interactions=args.max_interactions)
        curves[name] = [r.ious for r in results]
        used_ids[name] = kept
        print(f"{name}: {len(results)} objects in {time.perf_counter() - t0:.0f} s", flush=True)

    # Rows that differ by --preview are comparable (the preview-vs-full gap): it is in the row's name.
    settings = {"json": args.json, "objects": ids, "max_interactions": args.max_interactions,
                "stop_iou": args.stop_iou}
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        for key, value in settings.items():
            if earlier.get(key) != value:
                raise SystemExit(f"{path} was measured with {key} = {str(earlier.get(key))[:200]}, not {str(value)[:200]}: "
                                 "only runs on the same objects and settings can be merged")
        rows.update(earlier["summary"])
        curves.update(earlier["ious"])
        used_ids.update(earlier["object_ids"])
    if not rows:
        raise SystemExit("nothing to tabulate: give --model and/or --merge")

    cols = [c for c in COLUMNS if c in next(iter(rows.values()))]
    preview_note = ("; rows marked (preview): corrections through correct(preview=True)"
                    if any(n.endswith(" (preview)") for n in rows) else "")
    lines = [f"{len(objects)} objects of {', '.join(args.json)}; extreme points + up to {args.max_interactions - 4} "
             f"corrections (annotator stops at IoU {args.stop_iou}){preview_note}. "
             "mIoU, failed (never reaching the IoU within the cap) and F in percent; NoC counts the 4 extreme points.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c.startswith("NoC") else f"{r[c]:.1f}" for c in cols) + " |")
    lines += paired_table(curves, used_ids, args.max_interactions)
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output + ".md").write_text(table + "\n")
        Path(args.output + ".json").write_text(json.dumps(
            {**settings, "preview": args.preview, "summary": rows, "ious": curves, "object_ids": used_ids}))


def paired_table(curves, object_ids, max_interactions, seed=0):
    """Markdown lines comparing every pair of rows object by object: B − A in IoU points after
    ``PAIRED_AT`` interactions, mean [95 % bootstrap interval]; objects skipped by either (an empty
    mask) are left out of that pair. No lines for a single row."""
    names = list(curves)
    at = [k for k in PAIRED_AT if k <= max_interactions]
    if len(names) < 2:
        return []
    rng = np.random.default_rng(seed)
    lines = ["", "Paired, object by object (B − A, IoU points after n interactions, mean [95 % bootstrap interval over "
             "objects]; helped / hurt: share of objects whose IoU after the first correction B raises / lowers):", "",
             "| A | B | " + " | ".join(f"@{k}" for k in at) + " | helped / hurt @5 |", "|---" * (len(at) + 3) + "|"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(object_ids[a]) & set(object_ids[b]))
            ia = {o: n for n, o in enumerate(object_ids[a])}
            ib = {o: n for n, o in enumerate(object_ids[b])}
            ca = np.array([curves[a][ia[o]] for o in common])
            cb = np.array([curves[b][ib[o]] for o in common])
            cells, share = [], "–"
            for k in at:
                d = paired_difference(100 * ca[:, k - EXTREME_POINTS], 100 * cb[:, k - EXTREME_POINTS], rng, tolerance=0.1)
                cells.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
                if k == 5:
                    share = f"{100 * d['helped']:.0f} % / {100 * d['hurt']:.0f} %"
            lines.append(f"| {a} | {b} | " + " | ".join(cells) + f" | {share} |")
    return lines


if __name__ == "__main__":
    main()
