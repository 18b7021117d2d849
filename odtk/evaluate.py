"""COCO evaluation with pycocotools: the standard summary plus a per-class AP table; rotated boxes (issue 13) by
the same COCOeval with the IoU of rotated boxes (RotatedCOCOeval)."""
import contextlib
import io
import json
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pycocotools.cocoeval import COCOeval

from .rotated import rotated_box_iou
from .utils import OdtkError, log


def evaluate(annotations: str, detections: str, *, rotated: bool = False) -> Dict[str, Any]:
    """COCOeval (bbox) of a detections JSON against a COCO file, printing nothing: AP, AP50, ... (floats),
    "per_class" (rows of per_class_ap), "table", the report for the caller to show (pycocotools' summary lines,
    the per-class table and an AP line), and for plots "precision" (area all, 100 detections: [T, R, K] over
    "iou_thresholds" x "recall_thresholds" x the per_class rows; -1 for a class without ground truth or
    detections) and "rotated".

    `rotated`: the boxes of either file may be rotated, bbox [x, y, w, h, theta] (a 4-value bbox is theta 0), and
    matching uses their IoU (RotatedCOCOeval); without it a rotated box is an error naming the fix."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
    with open(detections) as f:
        dets = json.load(f)
    if not dets:
        log.warning("no detections: AP is 0")
        return {"AP": 0.0, "AP50": 0.0, "per_class": [], "table": "AP 0.0000  AP50 0.0000  (no detections)",
                "rotated": rotated}
    check_bboxes(gt.dataset["annotations"], annotations, rotated=rotated)
    check_bboxes(dets, detections, rotated=rotated)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):   # pycocotools prints; keep its summary lines, not its progress chatter
        dt = gt.loadRes(dets)
        ev = (RotatedCOCOeval if rotated else COCOeval)(gt, dt, "bbox")
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
    results["rotated"] = rotated
    footer = f"AP {results['AP']:.4f}  AP50 {results['AP50']:.4f}  ({len(ev.params.imgIds)} images)"
    results["table"] = "\n".join([*summary, format_table(rows), footer])
    return results


def check_bboxes(rows: Sequence[dict], path: str, *, rotated: bool) -> None:
    """Every row's bbox is [x, y, w, h], or with `rotated` also [x, y, w, h, theta]: one line naming the fix."""
    for row in rows:
        size = len(row.get("bbox") or ())
        if size == 5 and not rotated:
            raise OdtkError(f"{path}: rotated boxes (bbox [x, y, w, h, theta]); evaluate them as rotated "
                            f"(rotated=True; odtk: --rotated-bbox)")
        if size not in (4, 5):
            raise OdtkError(f"{path}: bbox {row.get('bbox')} (image {row.get('image_id')}): needs [x, y, w, h]"
                            + (" or [x, y, w, h, theta]" if rotated else ""))


def box_rows(bboxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """COCO bboxes [x, y, w, h(, theta)] -> float64 rows [N, 5] (x1, y1, x2, y2, theta), theta 0 when absent."""
    out = np.zeros((len(bboxes), 5))
    for i, b in enumerate(bboxes):
        out[i, :len(b)] = b
    out[:, 2:4] += out[:, :2]
    return torch.from_numpy(out)


def coco_ious(dets: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], iscrowd: Sequence[int]
              ) -> np.ndarray:
    """COCOeval's IoU matrix [D, G] (pycocotools.mask.iou's) for bboxes that may be rotated: a crowd box's column
    is the intersection over the detection's area, as COCO's. A pair of unrotated boxes gets pycocotools' own box
    IoU, bit for bit (the polygon clipping agrees to ~1e-15, but an IoU lying exactly on a threshold, as whole
    pixel boxes often do, must fall on the same side); any other pair odtk.rotated.rotated_box_iou's, in float64.
    [] when either side is empty, as pycocotools returns."""
    if len(dets) == 0 or len(truth) == 0:
        return []
    plain = np.asarray(coco_mask.iou([list(b[:4]) for b in dets], [list(b[:4]) for b in truth], list(iscrowd)))
    d, g = box_rows(dets), box_rows(truth)
    turned = (d[:, 4] != 0)[:, None] | (g[:, 4] != 0)[None, :]
    if not bool(turned.any()):
        return plain
    return np.where(turned.numpy(), rotated_ious(d, g, iscrowd), plain)


def rotated_ious(dets: torch.Tensor, truth: torch.Tensor, iscrowd: Sequence[int]) -> np.ndarray:
    """The IoU [D, G] of rotated rows [D, 5] and [G, 5] (float64), a crowd box's column being the intersection over
    the detection's area. The intersection comes back out of the IoU: iou = I / (a + b - I), so
    I = iou (a + b) / (1 + iou), exact to float64 rounding."""
    iou = rotated_box_iou(dets, truth).numpy()
    area_d = ((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])).numpy()[:, None]
    area_g = ((truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])).numpy()[None, :]
    crowd = np.asarray(iscrowd, dtype=bool)[None, :]
    if crowd.any():
        inter = iou * (area_d + area_g) / (1 + iou)
        inside = np.divide(inter, area_d, out=np.zeros_like(inter), where=area_d > 0)
        iou = np.where(crowd, inside, iou)
    return iou


class RotatedCOCOeval(COCOeval):
    """pycocotools' bbox COCOeval on boxes that may be rotated (bbox [x, y, w, h, theta]): only the IoU changes
    (coco_ious); matching, crowd and area rules, accumulation and the summary are COCO's. Areas are the
    annotations' `area` for ground truth and w * h for detections (loadRes), as in COCO's segm evaluation of
    the corner polygons."""

    def computeIoU(self, imgId, catId):   # noqa: N802,N803 (COCOeval's names)
        """COCOeval.computeIoU's selection (the class's boxes, or all with useCats off; detections by decreasing
        score, stable, at most maxDets[-1]: evaluateImg indexes the rows in this order) with coco_ious."""
        p = self.params
        cats = [catId] if p.useCats else p.catIds
        gt = [g for c in cats for g in self._gts[imgId, c]]
        dt = [d for c in cats for d in self._dts[imgId, c]]
        if not gt and not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")[:p.maxDets[-1]]
        return coco_ious([dt[i]["bbox"] for i in order], [g["bbox"] for g in gt], [int(g["iscrowd"]) for g in gt])


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
