"""Signs that a run trains without learning, checked while it trains (issue 17): box regression that stays flat
after the warm-up, and detections that no longer depend on the image (the same top box in every image)."""
from collections import deque
from typing import Deque, List, Optional

import torch
from torch import Tensor

from . import box as box_ops
from . import rotated as rotated_ops

# box loss at 60% of the run (before the usual first lr decay), as a share of its first iterations' mean, above
# which regression "has not learnt": healthy runs are at 0.4-0.6 of it by then (BCCD, synthetic) or, on the large
# objects of issue 17's kangaroo set, 0.6-0.8 (they fall slowly until the lr decays: 0.82-0.90 at iteration 200 of
# 650 in runs that end at AP50 0.63-0.74); issue 17's failing run was still at 0.85 at its end
FLAT_BOX_LOSS = 0.85
CHECK_AT = 0.6
# mean IoU between the images' top boxes (in image-relative coordinates) above which they count as one box,
# when their ground truth's agrees far less (below COLLAPSE_GT_IOU)
COLLAPSE_IOU = 0.85
COLLAPSE_GT_IOU = 0.5
COLLAPSE_CHECKS = 3   # consecutive collapsed batches before saying so


def relative_boxes(boxes: Tensor, image_size) -> Tensor:
    h, w = image_size
    return boxes / boxes.new_tensor([w, h, w, h])


def mean_pairwise_iou(boxes: Tensor) -> float:
    """Mean IoU over the distinct pairs of boxes [N, 4] (1.0 for fewer than two)."""
    n = boxes.shape[0]
    if n < 2:
        return 1.0
    iou = box_ops.batched_box_iou(boxes, boxes[None])[0]
    return ((iou.sum() - iou.diagonal().sum()) / (n * (n - 1))).item()


def axis_aligned(boxes: Tensor) -> Tensor:
    """Boxes [..., 4] as they are, rotated ones [..., 5] as their enclosing boxes: what the checks compare."""
    return rotated_ops.enclosing_boxes(boxes) if boxes.shape[-1] == 5 else boxes


def top_boxes(model, heads, image_size) -> Tensor:
    """Each image's highest-scoring box [B, 4] (input pixels; a rotated model's enclosing box), before NMS: what a
    collapsed model repeats."""
    cls_heads, box_heads = heads
    cls_out, box_out = model.flatten([h.detach() for h in cls_heads], [h.detach() for h in box_heads])
    best = cls_out.amax(dim=2).argmax(dim=1)                               # [B] anchor index
    anchors = torch.cat(model.anchors(cls_heads))[best]
    deltas = box_out[torch.arange(best.shape[0], device=best.device), best].float()
    to_boxes = rotated_ops.delta2box_rotated if model.config.rotated else box_ops.delta2box
    return axis_aligned(to_boxes(deltas, anchors, image_size))


def largest_gt(boxes: Tensor, labels: Tensor) -> Tensor:
    """Each image's largest annotated box [B, 4] (a rotated one's enclosing box; a zero box when it has none)."""
    area = box_ops.box_area(boxes).masked_fill(labels < 0, -1.0)
    return axis_aligned(boxes[torch.arange(boxes.shape[0], device=boxes.device), area.argmax(dim=1)])


class TrainingHealth:
    """Feed it each step's box loss and, every `every` steps, the step's heads and targets; `warnings` says (once
    each) what looks wrong, with the likely causes to try."""

    def __init__(self, *, warmup: int, iters: int, every: int = 25):
        self.warmup, self.iters, self.every = warmup, iters, every
        self.first: List[float] = []
        self.recent: Deque[float] = deque(maxlen=50)
        self.collapsed = 0
        self.said: set = set()
        self.warnings: List[str] = []

    def _say(self, key: str, message: str) -> Optional[str]:
        if key in self.said:
            return None
        self.said.add(key)
        self.warnings.append(message)
        return message

    def box_loss(self, iteration: int, value: float) -> Optional[str]:
        """After each step: a warning when the box loss is still near its start well after the warm-up."""
        if len(self.first) < 20:
            self.first.append(value)
            return None
        self.recent.append(value)
        due = max(2 * self.warmup, self.warmup + 100, int(CHECK_AT * self.iters))
        if iteration < due or len(self.recent) < self.recent.maxlen or iteration % self.every:
            return None
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if now > FLAT_BOX_LOSS * start:
            return self._say("flat", (
                f"box loss has fallen only {100 * (1 - now / start):.0f}% since the start ({start:.3f} -> {now:.3f} "
                f"at iteration {iteration}): box regression is not learning. Check the anchor fit (odtk data ANNOTATIONS), or try --anchor-scales "
                f"auto, a lower --lr or a longer --warmup"))
        return None

    def heads(self, iteration: int, model, heads, boxes: Tensor, labels: Tensor, image_size) -> Optional[str]:
        """Every `every` steps, after the warm-up: a warning when the batch's images all get the same top box
        while their ground truth differs (the model predicts a prior, not the image)."""
        if iteration % self.every or iteration <= self.warmup or boxes.shape[0] < 2:
            return None
        predicted = mean_pairwise_iou(relative_boxes(top_boxes(model, heads, image_size), image_size))
        truth = mean_pairwise_iou(relative_boxes(largest_gt(boxes, labels), image_size))
        self.collapsed = self.collapsed + 1 if predicted > COLLAPSE_IOU and truth < COLLAPSE_GT_IOU else 0
        if self.collapsed >= COLLAPSE_CHECKS:
            return self._say("collapse", (
                f"the top detection is the same box in every image (mean IoU {predicted:.2f} between images whose "
                f"largest objects overlap {truth:.2f}) at iteration {iteration}: the model predicts a prior, not the "
                f"image. Check the anchor fit (odtk data ANNOTATIONS), or try --anchor-scales auto"))
        return None
