"""How well a model's anchors fit a dataset's boxes, and anchors fitted to them (`odtk data`, `--anchor-scales auto`).

Boxes are taken as training sees them, scaled by the resize, in input pixels; a rotated box by its own sides (the
box before its turn), as if an anchor were turned like it: a rotated model's anchors turn too (by ModelConfig.angles),
so this is the fit at the best angle, which the nearest of the anchor angles approaches. A box's best IoU with the anchors is
computed analytically rather than on whole anchor grids: anchors of stride s are centred at (k + 1/2) s, and the
intersection of a box with an anchor of given sides is the product of the two axes' overlaps, each largest at the
grid centre nearest to the box's centre on that axis. So one anchor position per level gives the best IoU the
level offers, grid offset included (which matters for big objects on the coarse levels).
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backbones.fpn import FPN
from .box import generate_anchors
from .checks import anchor_setting, at_least, check_box_kind, ordered_range
from .data import CocoDataset, scale_boxes, scaled_size
from .info import numbers, table
from .model import ModelConfig
from .utils import OdtkError

AUTO = "auto"
Setting = Union[None, str, Sequence[float]]   # --anchor-scales / --anchor-ratios: not given, "auto", or values

LEVEL_STRIDES = FPN.strides   # P3-P7, the levels of every odtk backbone

# a fit below either is poor: many boxes then get a positive anchor only through low-quality matching
MIN_RECALL = 0.9
MIN_MEAN_IOU = 0.6
# a class with at least this many boxes is held to MIN_RECALL on its own: on BCCD ODTK's anchors reach recall 0.95
# over all boxes but 0.30 on the platelets (7% of the boxes), which a 25-minute run then never detected (AP 0)
MIN_CLASS_BOXES = 20
# more boxes than this with their best anchor on P6/P7 is fragile (issue 17): those levels come from freshly
# initialised convolutions on C5 and start out nearly the same for every image, so the head can only learn a prior
# box there until they learn to vary; on the kangaroo set one seed of three did not get there before the lr decay
MAX_COARSE_SHARE = 0.5

SCALES_PER_OCTAVE = 3        # fitted scales s0 * 2^(i/3): with strides doubling, the levels tile all sizes
NUM_RATIOS = 3
# s0 tried: 0.5 to 8 times the stride, 12 per octave. Above, the finest levels win by their denser grid alone, with
# anchors many times their stride, far from any layout detectors are tuned for
BASE_SCALES = [2 ** (k / 12) for k in range(-12, 37)]
RATIO_SPREADS = (0.25, 0.35, 0.45)   # fitted ratios: aspect quantiles 0.5 -/+ these (and ODTK's own set)
FIT_SAMPLE = 4000            # boxes the search scores (a fixed-seed sample): the search stays well under a second
FIT_SEED = 0
PERCENTILES = (5, 25, 50, 75, 95)


# -- the fit of given anchors ------------------------------------------------------------------------------------
@dataclass
class AnchorFit:
    """Of `boxes` boxes: the share with an anchor at IoU >= fg_iou (a positive without low-quality matching), the
    mean best IoU, and per level (LEVEL_STRIDES) the share of boxes whose best anchor is there."""
    recall: float
    mean_iou: float
    levels: List[float]
    fg_iou: float
    boxes: int
    worst_class: Optional[Tuple[str, float]] = None   # (name, recall) of the class of lowest recall (class_masks)

    @property
    def poor(self) -> bool:
        return self.recall < MIN_RECALL or self.mean_iou < MIN_MEAN_IOU or self.poor_class

    @property
    def poor_class(self) -> bool:
        return self.worst_class is not None and self.worst_class[1] < MIN_RECALL

    @property
    def coarse(self) -> float:
        """The share of boxes whose best anchor is on P6 or P7."""
        return float(sum(share for stride, share in zip(LEVEL_STRIDES, self.levels) if stride >= 64))


def anchor_sides(scales: Sequence[float], ratios: Sequence[float], stride: int) -> Tensor:
    """(width, height) [A, 2] of a level's anchors, in the model's order (generate_anchors')."""
    cell = generate_anchors(stride, ratios, scales)
    return cell[:, 2:] - cell[:, :2]


def level_ious(boxes: Tensor, scales: Sequence[float], ratios: Sequence[float],
               strides: Sequence[int] = LEVEL_STRIDES) -> Tensor:
    """IoU [N, L, A] of boxes [N, 4] (x1, y1, x2, y2, input pixels) with each of the A anchors of each level, at the
    grid position nearest to the box."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2])[:, None]                    # [N, 1, 2]
    per_level = []
    for stride in strides:
        # distance to the nearest anchor centre on each axis: the overlap is largest there (see the module's doc)
        offset = (centres - (torch.floor(centres / stride) + 0.5) * stride).abs()[:, None]
        anchors = anchor_sides(scales, ratios, stride)[None]           # [1, A, 2]
        overlap = torch.minimum(torch.minimum(anchors, sides), (anchors + sides) / 2 - offset).clamp(min=0)
        inter = overlap.prod(-1)
        per_level.append(inter / (anchors.prod(-1) + sides.prod(-1) - inter))
    return torch.stack(per_level, 1)


def best_anchor_ious(boxes: Tensor, scales: Sequence[float], ratios: Sequence[float],
                     strides: Sequence[int] = LEVEL_STRIDES) -> Tuple[Tensor, Tensor]:
    """For boxes [N, 4], the best IoU [N] of each with any anchor of the model's grids, and the index [N] of the
    level it is on."""
    return level_ious(boxes, scales, ratios, strides).amax(dim=2).max(dim=1)


def class_masks(labels: Tensor) -> Dict[int, Tensor]:
    """Per class index of `labels` [N] with at least MIN_CLASS_BOXES boxes, the mask [N] of its boxes."""
    return {c: labels == c for c in labels.unique().tolist() if int((labels == c).sum()) >= MIN_CLASS_BOXES}


def anchor_fit(boxes: Tensor, scales: Sequence[float], ratios: Sequence[float], *, fg_iou: float,
               strides: Sequence[int] = LEVEL_STRIDES, labels: Optional[Tensor] = None,
               names: Sequence[str] = ()) -> AnchorFit:
    """How well anchors of `scales` x `ratios` cover `boxes` [N, 4] (N > 0); with their class indices `labels` [N]
    (and the classes' `names`), also the class the anchors cover worst."""
    best, level = best_anchor_ious(boxes, scales, ratios, strides)
    counts = torch.bincount(level, minlength=len(strides)).double()
    hit = best >= fg_iou
    recalls = ({names[c]: float(hit[mask].double().mean()) for c, mask in class_masks(labels).items()}
               if labels is not None and len(names) > 1 else {})
    worst = min(recalls.items(), key=lambda item: item[1]) if recalls else None
    return AnchorFit(recall=float(hit.double().mean()), mean_iou=float(best.double().mean()),
                     levels=(counts / len(boxes)).tolist(), fg_iou=fg_iou, boxes=len(boxes), worst_class=worst)


# -- fitting -----------------------------------------------------------------------------------------------------
def scale_sets(count: int = SCALES_PER_OCTAVE) -> List[List[float]]:
    """The scale sets the fit tries: s0 * 2^(i / count) for each s0 of BASE_SCALES, rounded as they are stored."""
    return [[round(s0 * 2 ** (i / count), 2) for i in range(count)] for s0 in BASE_SCALES]


def ratio_sets(boxes: Tensor, count: int = NUM_RATIOS) -> List[List[float]]:
    """The ratio sets the fit tries: ODTK's [1, 2, 0.5] (spread alike for other counts), then quantiles of the
    boxes' aspect (height / width) around the median, rounded as they are stored; sets with repeats dropped."""
    log_aspect = ((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])).log().double()
    odtk = [1.0, 2.0, 0.5] if count == 3 else [round(2 ** (2 * i / (count - 1) - 1), 2) if count > 1 else 1.0
                                                 for i in range(count)]
    sets = [odtk]
    for spread in RATIO_SPREADS:
        levels = (torch.linspace(0.5 - spread, 0.5 + spread, count, dtype=torch.float64) if count > 1 else
                  torch.tensor([0.5], dtype=torch.float64))
        values = [round(math.exp(v), 2) for v in torch.quantile(log_aspect, levels).tolist()]
        if len(set(values)) == count and min(values) > 0 and values not in sets:
            sets.append(values)
    return sets


def fit_anchors(boxes: Tensor, *, scales: Optional[Sequence[float]] = None, ratios: Optional[Sequence[float]] = None,
                fg_iou: float, num_scales: int = SCALES_PER_OCTAVE, num_ratios: int = NUM_RATIOS,
                strides: Sequence[int] = LEVEL_STRIDES, labels: Optional[Tensor] = None
                ) -> Tuple[List[float], List[float]]:
    """Anchor scales and ratios that fit `boxes` [N, 4] best (recall at fg_iou, then mean best IoU; with class
    indices `labels` [N], the mean of the recalls of the classes of at least MIN_CLASS_BOXES boxes, so that a
    small class counts as much as a large one). Given `scales` or `ratios` are kept, None ones fitted;
    deterministic (a fixed-seed sample of FIT_SAMPLE boxes is scored)."""
    if len(boxes) > FIT_SAMPLE:
        pick = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(FIT_SEED))[:FIT_SAMPLE]
        boxes, labels = boxes[pick], None if labels is None else labels[pick]
    classes = [] if labels is None else list(class_masks(labels).values())
    scale_options = [list(scales)] if scales is not None else scale_sets(num_scales)
    ratio_options = [list(ratios)] if ratios is not None else ratio_sets(boxes, num_ratios)
    # every candidate set draws on the same few values: the IoUs of each (scale, ratio) pair once, [N, S, R]
    scale_values = sorted({v for option in scale_options for v in option})
    ratio_values = sorted({v for option in ratio_options for v in option})
    ious = level_ious(boxes, scale_values, ratio_values, strides).amax(dim=1).view(len(boxes), len(scale_values), -1)
    best, chosen = None, (scale_options[0], ratio_options[0])
    for r in ratio_options:
        by_ratio = ious[:, :, [ratio_values.index(v) for v in r]]
        for s in scale_options:
            top = by_ratio[:, [scale_values.index(v) for v in s]].flatten(1).amax(dim=1)
            hit = (top >= fg_iou).double()
            recall = sum(float(hit[c].mean()) for c in classes) / len(classes) if classes else float(hit.mean())
            score = (round(recall, 2), float(top.double().mean()))
            # recall first, to the percent, so that a box or two more above the threshold does not outweigh
            # a better mean
            if best is None or score > best:   # strictly: on a tie the earlier (ODTK's ratios) stays
                best, chosen = score, (s, r)
    return chosen


# -- the choice training makes -----------------------------------------------------------------------------------
@dataclass
class Anchors:
    scales: List[float]
    ratios: List[float]
    fit: AnchorFit

    def describe(self) -> str:
        """`scales 2 2.52 3.17, ratios 1 2 0.5: recall 0.41 at IoU 0.5, mean best IoU 0.52`."""
        worst = self.fit.worst_class
        return (f"scales {numbers(self.scales)}, ratios {numbers(self.ratios)}: recall {self.fit.recall:.2f} at "
                f"IoU {self.fit.fg_iou:g}, mean best IoU {self.fit.mean_iou:.2f}"
                + (f" (lowest: {worst[0]} {worst[1]:.2f})" if worst else ""))

    def flags(self) -> str:
        return f"--anchor-scales {numbers(self.scales)} --anchor-ratios {numbers(self.ratios)}"


@dataclass
class AnchorChoice:
    """The anchors a setting starts from (given, or ODTK's defaults) and, when fitted, the fitted ones; `switched`:
    neither flag was given and the defaults fit so poorly that they were fitted."""
    start: Anchors
    fitted: Optional[Anchors] = None
    switched: bool = False

    @property
    def final(self) -> Anchors:
        return self.fitted or self.start


def choose_anchors(boxes: Tensor, *, scales: Setting, ratios: Setting, fg_iou: float,
                   default_scales: Sequence[float], default_ratios: Sequence[float],
                   fit_poor_defaults: bool = False, labels: Optional[Tensor] = None,
                   names: Sequence[str] = ()) -> AnchorChoice:
    """The anchors for `boxes` [N, 4] under --anchor-scales/--anchor-ratios settings (None: the defaults, AUTO:
    fitted). With `fit_poor_defaults`, defaults that fit poorly (AnchorFit.poor, also for one class of `labels`)
    when neither is given are fitted."""
    def fit(s: List[float], r: List[float]) -> AnchorFit:
        return anchor_fit(boxes, s, r, fg_iou=fg_iou, labels=labels, names=names)

    start_scales = list(default_scales) if scales is None or scales == AUTO else list(scales)
    start_ratios = list(default_ratios) if ratios is None or ratios == AUTO else list(ratios)
    start = Anchors(start_scales, start_ratios, fit(start_scales, start_ratios))
    switched = fit_poor_defaults and scales is None and ratios is None and start.fit.poor
    fit_scales, fit_ratios = scales == AUTO or switched, ratios == AUTO or switched
    if not (fit_scales or fit_ratios):
        return AnchorChoice(start)
    new_scales, new_ratios = fit_anchors(boxes, scales=None if fit_scales else start_scales,
                                         ratios=None if fit_ratios else start_ratios, fg_iou=fg_iou,
                                         num_scales=len(start_scales), num_ratios=len(start_ratios),
                                         labels=labels if len(names) > 1 else None)
    fitted = Anchors(new_scales, new_ratios, fit(new_scales, new_ratios))
    return AnchorChoice(start, fitted, switched)


def poor_fit_warning(anchors: Anchors) -> str:
    """The warning for anchors that fit poorly, with the way out."""
    fit = anchors.fit
    if fit.recall < MIN_RECALL:
        why = f"recall {fit.recall:.2f} < {MIN_RECALL}"
    elif fit.mean_iou < MIN_MEAN_IOU:
        why = f"mean best IoU {fit.mean_iou:.2f} < {MIN_MEAN_IOU}"
    else:
        why = f"recall of the {fit.worst_class[0]} boxes {fit.worst_class[1]:.2f} < {MIN_RECALL}"
    return (f"the anchors (scales {numbers(anchors.scales)}, ratios {numbers(anchors.ratios)}) fit these boxes "
            f"poorly ({why}): try --anchor-scales auto (and --anchor-ratios auto)")


def fit_warning(anchors: Anchors) -> Optional[str]:
    """What is wrong with anchors for these boxes, with the way out: a poor fit, or most boxes on P6/P7."""
    if anchors.fit.poor:
        return poor_fit_warning(anchors)
    if anchors.fit.coarse > MAX_COARSE_SHARE:
        return (f"the anchors (scales {numbers(anchors.scales)}) put {100 * anchors.fit.coarse:.0f}% of the boxes on "
                f"P6/P7, whose features start out nearly the same for every image: training may learn a prior box "
                f"instead of the objects; try --anchor-scales auto, or a smaller --resize")
    return None


# -- the data ----------------------------------------------------------------------------------------------------
def resized_boxes(dataset: CocoDataset, *, resize: int, max_size: int) -> Dict[int, Tensor]:
    """Each image's boxes [M, 4] (rotated [M, 5]) scaled as the loader scales them for `resize`/`max_size`
    (per-axis, after scaled_size's rounding)."""
    out = {}
    for image_id in dataset.ids:
        height, width = dataset.original_size(image_id)
        (h, w), _ = scaled_size(height, width, resize=resize, max_size=max_size)
        out[image_id] = scale_boxes(dataset.boxes[image_id], w / width, h / height)
    return out


def level_name(stride: int) -> str:
    return f"P{int(math.log2(stride))}"


def _percentiles(values: Tensor) -> List[float]:
    return torch.quantile(values.double(), torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()


def data_report(dataset: CocoDataset, *, resize: int, max_size: int, scales: Setting = None, ratios: Setting = None,
                fg_iou: float = 0.5, fit_poor_defaults: bool = False) -> dict:
    """What `odtk data` prints (format_report): counts, box sizes after the resize and the anchor fit."""
    per_image = resized_boxes(dataset, resize=resize, max_size=max_size)
    boxes = torch.cat(list(per_image.values()))[:, :4]    # a rotated box's own sides (see the module's doc)
    if not len(boxes):
        raise OdtkError(f"{dataset.coco_path}: no boxes to report on")
    labels = torch.cat([dataset.labels[i] for i in per_image])
    counts = torch.tensor([len(b) for b in per_image.values()])
    sides = boxes[:, 2:] - boxes[:, :2]
    defaults = ModelConfig()
    names = [dataset.class_names.get(c, str(c)) for c in dataset.category_ids]
    choice = choose_anchors(boxes, scales=scales, ratios=ratios, fg_iou=fg_iou, default_scales=defaults.scales,
                            default_ratios=defaults.ratios, fit_poor_defaults=fit_poor_defaults, labels=labels,
                            names=names)
    classes = [(name, int((labels == i).sum())) for i, name in enumerate(names)]
    return {"path": dataset.coco_path, "resize": resize, "max_size": max_size, "images": len(per_image),
            "boxes": len(boxes), "classes": classes, "per_image": (float(counts.double().mean()), int(counts.max())),
            "empty": int((counts == 0).sum()), "width": _percentiles(sides[:, 0]), "height": _percentiles(sides[:, 1]),
            "side": _percentiles(sides.prod(1).sqrt()), "aspect": _percentiles(sides[:, 1] / sides[:, 0]),
            "choice": choice, "given": {"scales": scales, "ratios": ratios}, "rotated": dataset.rotated}


def describe_data(annotations: str, *, images: Optional[str] = None, resize: int = 800, max_size: int = 1333,
                  scales: Setting = None, ratios: Setting = None, anchor_ious: Tuple[float, float] = (0.4, 0.5),
                  rotated: bool = False) -> dict:
    """`odtk data`: data_report on a COCO file alone; the images in `images` are only read (headers) for sizes the
    file lacks. `rotated`: its boxes are rotated ones (--rotated-bbox)."""
    at_least("--resize", resize, 1)
    at_least("--max-size", max_size, 1)
    ordered_range("--anchor-ious", anchor_ious, low=0, high=1)
    anchor_setting("--anchor-scales", scales)
    anchor_setting("--anchor-ratios", ratios)
    dataset = CocoDataset(images or os.path.dirname(os.path.abspath(annotations)), annotations, require_boxes=True,
                          check_files=images is not None, rotated=rotated)
    check_box_kind(dataset, "--rotated-bbox" if rotated else "odtk data without --rotated-bbox",
                   "drop --rotated-bbox" if rotated else "add --rotated-bbox")
    return data_report(dataset, resize=resize, max_size=max_size, scales=scales, ratios=ratios,
                       fg_iou=anchor_ious[1])


def _spread(values: Sequence[float], digits: int = 0) -> str:
    return "  ".join(f"{p}% {v:.{digits}f}" for p, v in zip(PERCENTILES, values))


def _levels(fit: AnchorFit) -> str:
    return "  ".join(f"{level_name(s)} {100 * share:.0f}%" for s, share in zip(LEVEL_STRIDES, fit.levels))


def _start_label(d: dict) -> str:
    given = d["given"]
    if given["scales"] not in (None, AUTO) or given["ratios"] not in (None, AUTO):
        return "given"
    return "ODTK default"


def format_report(d: dict) -> str:
    """The table `odtk data` prints (and training with --verbose), a warning line last when the anchors fit
    poorly."""
    choice = d["choice"]
    classes = ", ".join(f"{name} {n:,}" for name, n in d["classes"])
    mean, most = d["per_image"]
    rows = [("images", f"{d['images']:,} ({d['empty']:,} without boxes)"),
            ("boxes", f"{d['boxes']:,}: {classes}"),
            ("boxes per image", f"mean {mean:.1f}, max {most:,}"),
            ("box width px", _spread(d["width"])),
            ("box height px", _spread(d["height"])),
            ("box side px", _spread(d["side"]) + "  (square root of the area)"),
            ("aspect h/w", _spread(d["aspect"], 2)),
            (f"anchors ({_start_label(d)})", choice.start.describe())]
    if choice.fitted:
        rows += [("anchors (fitted)", choice.fitted.describe()), ("", f"to keep them: {choice.fitted.flags()}")]
    rows.append(("best anchor level", _levels(choice.final.fit)))
    title = f"{d['path']}: at --resize {d['resize']} --max-size {d['max_size']}"
    if d.get("rotated"):
        title += " (rotated boxes: their own sides, before the turn)"
    text = table(title, rows)
    warning = fit_warning(choice.final)
    return text + (f"\nwarning: {warning}" if warning else "")


def short_report(d: dict) -> str:
    """One line on the data for training's log (format_report with --verbose)."""
    mean, most = d["per_image"]
    side = d["side"]
    return (f"{d['path']}: {d['images']:,} images, {d['boxes']:,} boxes ({mean:.1f} per image, max {most:,}), box "
            f"side 5/50/95%: {side[0]:.0f}/{side[2]:.0f}/{side[4]:.0f} px at --resize {d['resize']} --max-size "
            f"{d['max_size']}")
