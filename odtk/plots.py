"""See what the model found: evaluation plots (precision-recall, confusion matrix, per-class AP and its CSV) and a
training run's results (CSV and curves). Drawing needs matplotlib, the optional extra odtk[plots]; the CSVs do not.
Figures are drawn without pyplot (no global state, no display needed) and saved atomically."""
import csv
import io
import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .utils import OdtkError, atomic_path, atomic_write_text, log

EXTRA = "pip install 'odtk[plots]'"
IOU_THRESHOLD = 0.5     # confusion matrix: a detection matches a ground-truth box at this IoU or more
SCORE_THRESHOLD = 0.3   # confusion matrix: detections scoring less are ignored (COCO AP uses them all)
PLOT_FILES = ("pr_curve.png", "confusion_matrix.png", "per_class_ap.png", "per_class.csv")
RESULT_COLUMNS = ("iteration", "loss/cls", "loss/box", "lr", "images_per_s", "val/AP", "val/AP50")


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(flag: str = "--plots") -> None:
    """One line instead of an ImportError, before any work is done."""
    if not has_matplotlib():
        raise OdtkError(f"{flag} needs matplotlib: {EXTRA}")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, path: str) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---------------------------------------------------------------- evaluation

def write_plots(annotations: str, detections: str, folder: str, *, results: Optional[Dict[str, Any]] = None,
                score_threshold: float = SCORE_THRESHOLD, rotated: bool = False) -> Dict[str, str]:
    """pr_curve.png, confusion_matrix.png, per_class_ap.png and per_class.csv in `folder` for a detections JSON
    against its COCO annotations; `results`: odtk.evaluate.evaluate's for them, when already computed, else
    evaluated here (`rotated`: as evaluate's). Returns {file name: path} ({} with a warning when there is no
    detection to plot). Boxes may be rotated (bbox [x, y, w, h, theta]): the confusion matrix matches them by
    their rotated IoU."""
    from .evaluate import evaluate
    require_matplotlib()
    results = evaluate(annotations, detections, rotated=rotated) if results is None else results
    if "precision" not in results:
        log.warning(f"{detections}: no detections, no plots written to {folder}")
        return {}
    with open(annotations) as f:
        coco = json.load(f)
    with open(detections) as f:
        found = json.load(f)
    paths = {name: os.path.join(folder, name) for name in PLOT_FILES}
    rows = results["per_class"]
    _save_png(pr_figure(results), paths["pr_curve.png"])
    matrix, ids = confusion_matrix(coco, found, score_threshold=score_threshold)
    by_id = {c["id"]: c.get("name", str(c["id"])) for c in coco["categories"]}
    figure = confusion_figure(matrix, [by_id[i] for i in ids], score_threshold=score_threshold)
    _save_png(figure, paths["confusion_matrix.png"])
    _save_png(per_class_figure(rows), paths["per_class_ap.png"])
    atomic_write_text(per_class_csv(rows), paths["per_class.csv"])
    return paths


def per_class_csv(rows: Sequence[dict]) -> str:
    """class, boxes, AP, AP50: the per-class table's numbers at full precision (repr: no double rounding)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "boxes", "AP", "AP50"])
    for r in rows:
        writer.writerow([r["name"], r["boxes"], repr(float(r["AP"])), repr(float(r["AP50"]))])
    return out.getvalue()


def _masked_mean(precision: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` of the entries COCOeval filled (-1: no data), NaN where there is none."""
    valid = precision > -1
    total = np.where(valid, precision, 0).sum(axis=axis)
    count = valid.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_curve(precision: np.ndarray) -> np.ndarray:
    """The precision [T, R, K] averaged over IoUs and classes at each recall threshold, as COCO's AP averages it."""
    return _masked_mean(np.moveaxis(precision, 1, 0).reshape(precision.shape[1], -1), 1)


def pr_curves(results: Dict[str, Any]) -> List[dict]:
    """Per class: its precision over the recall thresholds at IoU 0.5 ("p50") and averaged over IoU 0.5:0.95 as
    COCO averages it ("p"), labelled with the per-class table's AP50 and AP (same rounding); NaN where the class
    has no data."""
    precision = results["precision"]   # [T, R, K]
    curves = []
    for k, r in enumerate(results["per_class"]):
        curves.append({"name": r["name"], "p50": mean_curve(precision[:1, :, k:k + 1]),
                       "p": mean_curve(precision[:, :, k:k + 1]),
                       "label50": f"{r['name']}  AP50 {r['AP50']:.3f}", "label": f"{r['name']}  AP {r['AP']:.3f}"})
    return curves


def pr_figure(results: Dict[str, Any]):
    """Two panels: precision-recall per class at IoU 0.5, and averaged over IoU 0.5:0.95."""
    recall = results["recall_thresholds"]
    fig = _figure(12, 5)
    left, right = fig.subplots(1, 2, sharey=True)
    for curve in pr_curves(results):
        left.plot(recall, curve["p50"], label=curve["label50"])
        right.plot(recall, curve["p"], label=curve["label"])
    for ax, key, title in ((left, "AP50", "IoU 0.5"), (right, "AP", "IoU 0.5:0.95 (COCO average)")):
        every = results["precision"][:1] if key == "AP50" else results["precision"]
        ax.plot(recall, mean_curve(every), color="black", linewidth=2.5, label=f"all classes  {key} {results[key]:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", title=f"precision-recall, {title}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    left.set_ylabel("precision")
    return fig


def confusion_matrix(coco: dict, detections: List[dict], *, iou_threshold: float = IOU_THRESHOLD,
                     score_threshold: float = SCORE_THRESHOLD) -> Tuple[np.ndarray, List[int]]:
    """Counts [true, predicted] over the categories (sorted by id) plus background, last: per image, detections
    scoring at least `score_threshold` are taken by descending score, each matching the unmatched ground-truth
    box (of any class) it overlaps most if that IoU >= `iou_threshold` (COCO's IoU, of rotated boxes for bbox
    [x, y, w, h, theta]: odtk.evaluate.coco_ious). An unmatched detection is a false alarm (true background), an
    unmatched box a miss (predicted background). Crowd boxes and detections of unknown categories are left out."""
    from .evaluate import coco_ious
    ids = sorted(c["id"] for c in coco["categories"])
    index = {c: i for i, c in enumerate(ids)}
    background = len(ids)
    truth, found = defaultdict(list), defaultdict(list)
    for a in coco["annotations"]:
        if not a.get("iscrowd") and a["category_id"] in index:
            truth[a["image_id"]].append(a)
    for d in detections:
        if d["score"] >= score_threshold and d["category_id"] in index:
            found[d["image_id"]].append(d)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    for image in coco["images"]:
        gts = truth[image["id"]]
        dts = sorted(found[image["id"]], key=lambda d: -d["score"])
        ious = np.zeros((len(dts), len(gts)))
        if dts and gts:
            ious = np.asarray(coco_ious([d["bbox"] for d in dts], [g["bbox"] for g in gts], [0] * len(gts)))
        free = np.ones(len(gts), dtype=bool)
        for i, d in enumerate(dts):
            overlap = np.where(free, ious[i], -1.0)   # a box matches one detection at most
            j = int(np.argmax(overlap)) if gts else None
            if j is not None and overlap[j] >= iou_threshold:
                free[j] = False
                matrix[index[gts[j]["category_id"]], index[d["category_id"]]] += 1
            else:
                matrix[background, index[d["category_id"]]] += 1
        for j in np.flatnonzero(free):
            matrix[index[gts[j]["category_id"]], background] += 1
    return matrix, ids


def confusion_figure(matrix: np.ndarray, names: Sequence[str], *, score_threshold: float = SCORE_THRESHOLD):
    labels = [*names, "background"]
    side = 3 + 0.6 * len(labels)
    fig = _figure(side + 2, side)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    high = matrix.max() / 2 if matrix.size else 0
    for (t, p), count in np.ndenumerate(matrix):
        if count:
            ax.text(p, t, str(count), ha="center", va="center", color="white" if count > high else "black")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"confusion matrix at IoU {IOU_THRESHOLD}, detections scoring >= {score_threshold}\n"
                 f"greedy by score, class-agnostic match\nbackground: false alarms (row), misses (column)",
                 fontsize="medium")
    return fig


def per_class_figure(rows: Sequence[dict]):
    """Bars of AP and AP50 per class."""
    fig = _figure(max(6.0, 1.2 * len(rows) + 2), 4.5)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for shift, key in ((-0.2, "AP"), (0.2, "AP50")):
        bars = ax.bar(x + shift, [r[key] for r in rows], width=0.4, label=key)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=45 if len(rows) > 8 else 0, ha="right" if len(rows) > 8
                  else "center")
    ax.set(ylim=(0, 1.08), ylabel="AP", title="AP (IoU 0.5:0.95) and AP50 per class")
    ax.legend()
    return fig


# ---------------------------------------------------------------- training results

def results_paths(model: str) -> Tuple[str, str]:
    """`<model stem>-results.csv` and `-results.png` beside the checkpoint."""
    stem = os.path.splitext(model)[0]
    return f"{stem}-results.csv", f"{stem}-results.png"


def _number(text: str) -> Optional[float]:
    return float(text) if text not in ("", None) else None


def read_results(path: str, *, until: int) -> List[Dict[str, Optional[float]]]:
    """The rows of a results CSV up to iteration `until` (later ones came after the checkpoint being resumed);
    [] with a warning when it cannot be read."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: _number(row.get(k)) for k in RESULT_COLUMNS} for row in csv.DictReader(f)]
    except (OSError, ValueError, csv.Error) as e:
        log.warning(f"{path}: cannot read the earlier rows ({e}); starting it afresh")
        return []
    return [r for r in rows if r["iteration"] is not None and r["iteration"] <= until]


class TrainingResults:
    """A training run's logged figures, as `<model stem>-results.csv` (always) and `-results.png` (loss, lr and
    AP curves; with matplotlib, else one warning). A resumed run keeps the earlier rows up to its iteration."""

    def __init__(self, *, model: str, resume_at: Optional[int] = None):
        self.csv, self.png = results_paths(model)
        self.rows = read_results(self.csv, until=resume_at) if resume_at is not None else []
        self.warned = False

    def add(self, iteration: int, values: Dict[str, float]) -> None:
        """The row of `iteration`, merged into the last one when it is the same iteration."""
        row = {k: values.get(k) for k in RESULT_COLUMNS}
        row["iteration"] = iteration
        if self.rows and self.rows[-1]["iteration"] == iteration:
            self.rows[-1].update({k: v for k, v in row.items() if v is not None})
        else:
            self.rows.append(row)

    def save(self, *, plot: bool) -> None:
        """Write the CSV, and redraw the PNG when `plot`; a failure is warned about (training matters more)."""
        try:
            atomic_write_text(results_csv(self.rows), self.csv)
            if plot and self._can_plot():
                _save_png(results_figure(self.rows), self.png)
        except OSError as e:
            log.warning(f"{self.csv}: cannot write the training results ({e}); training goes on")

    def _can_plot(self) -> bool:
        if has_matplotlib():
            return True
        if not self.warned:
            log.warning(f"{self.png}: not drawn, the plot needs matplotlib ({EXTRA}); {self.csv} is written")
            self.warned = True
        return False


def results_csv(rows: Sequence[Dict[str, Optional[float]]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for r in rows:
        writer.writerow([int(r["iteration"]), *("" if r[k] is None else repr(float(r[k])) for k in RESULT_COLUMNS[1:])])
    return out.getvalue()


def results_figure(rows: Sequence[Dict[str, Optional[float]]]):
    """Three panels over the iterations: the losses, the learning rate, validation AP and AP50."""
    fig = _figure(14, 4)
    losses, lr, ap = fig.subplots(1, 3)

    def series(key: str) -> Tuple[List[float], List[float]]:
        kept = [r for r in rows if r[key] is not None and math.isfinite(r[key])]
        return [r["iteration"] for r in kept], [r[key] for r in kept]

    for key in ("loss/cls", "loss/box"):
        losses.plot(*series(key), label=key)
    lr.plot(*series("lr"), color="tab:green")
    for key in ("val/AP", "val/AP50"):
        ap.plot(*series(key), marker="o", label=key)
    if not series("val/AP")[0]:
        ap.text(0.5, 0.5, "no validation yet\n(--val-annotations)", ha="center", va="center", transform=ap.transAxes)
    for ax, title in ((losses, "loss"), (lr, "learning rate"), (ap, "validation AP")):
        ax.set(xlabel="iteration", title=title)
        ax.grid(alpha=0.3)
    losses.legend()
    if series("val/AP")[0]:
        ap.legend()
    return fig
