"""COCO evaluation with pycocotools: the standard summary plus a per-class AP table."""
import contextlib
import io
from typing import Any, Dict, List

import numpy as np

from .utils import log


def evaluate(annotations: str, detections: str) -> Dict[str, Any]:
    """COCOeval (bbox) of a detections JSON against a COCO file, printing nothing: AP, AP50, ... (floats),
    "per_class" (rows of per_class_ap), "table", the report for the caller to show (pycocotools' summary lines,
    the per-class table and an AP line), and for plots "precision" (area all, 100 detections: [T, R, K] over
    "iou_thresholds" x "recall_thresholds" x the per_class rows; -1 for a class without ground truth or
    detections)."""
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
    with open(detections) as f:
        dets = json.load(f)
    if not dets:
        log.warning("no detections: AP is 0")
        return {"AP": 0.0, "AP50": 0.0, "per_class": [], "table": "AP 0.0000  AP50 0.0000  (no detections)"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):   # pycocotools prints; keep its summary lines, not its progress chatter
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = [line for line in out.getvalue().splitlines() if line.startswith(" Average")]
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    results: Dict[str, Any] = {n: float(v) for n, v in zip(names, ev.stats)}
    rows = per_class_ap(ev, gt)
    results["per_class"] = rows
    results["precision"] = all_areas(ev)
    results["iou_thresholds"], results["recall_thresholds"] = ev.params.iouThrs, ev.params.recThrs
    footer = f"AP {results['AP']:.4f}  AP50 {results['AP50']:.4f}  ({len(ev.params.imgIds)} images)"
    results["table"] = "\n".join([*summary, format_table(rows), footer])
    return results


def all_areas(ev) -> np.ndarray:
    """The accumulated precision [T, R, K] for area 'all' and 100 detections (COCO's AP figures)."""
    return ev.eval["precision"][:, :, :, 0, -1]   # [T, R, K, A, M]


def per_class_ap(ev, gt) -> List[dict]:
    """AP (IoU .50:.95) and AP50 per category, area 'all', 100 detections."""
    precision = all_areas(ev)
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p50 = precision[0, :, k]
        ap = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        ap50 = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else float("nan")
        n = len(gt.getAnnIds(catIds=[cat_id], iscrowd=False))
        rows.append({"id": cat_id, "name": gt.cats[cat_id].get("name", str(cat_id)), "boxes": n,
                     "AP": ap, "AP50": ap50})
    return rows


def format_table(rows: List[dict]) -> str:
    width = max([len("class")] + [len(r["name"]) for r in rows])
    lines = [f"{'class':<{width}}  {'boxes':>6}  {'AP':>6}  {'AP50':>6}", "-" * (width + 26)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['boxes']:>6}  {r['AP']:>6.3f}  {r['AP50']:>6.3f}")
    return "\n".join(lines)
