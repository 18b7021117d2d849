"""Anchors, box encoding and target assignment: small pure functions on tensors."""
from typing import Callable, List, Sequence, Tuple

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms

# exp() of a larger log-ratio overflows fp16 and gives absurd boxes anyway
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def generate_anchors(stride: int, ratios: Sequence[float], scales: Sequence[float]) -> Tensor:
    """Cell anchors [len(scales) * len(ratios), 4] (x1, y1, x2, y2) centred on the first cell.

    Order is scale-major (for each scale, each ratio), as ODTK. `ratio` is height / width and
    `scale` multiplies the stride to give the side of the square anchor of the same area.
    """
    anchors = []
    for scale in scales:
        for ratio in ratios:
            size = stride * scale
            w = size / math.sqrt(ratio)
            h = size * math.sqrt(ratio)
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32) + stride / 2


def grid_anchors(cell_anchors: Tensor, stride: int, height: int, width: int) -> Tensor:
    """All anchors of a feature map, ordered (y, x, anchor) -> [height * width * A, 4]."""
    device = cell_anchors.device
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def batched_box_iou(anchors: Tensor, boxes: Tensor) -> Tensor:
    """IoU of anchors [A, 4] with each image's boxes [B, M, 4] -> [B, A, M] (torchvision's box_iou, batched)."""
    area_a = box_area(anchors)[None, :, None]
    area_b = box_area(boxes)[:, None, :]
    lt = torch.max(anchors[None, :, None, :2], boxes[:, None, :, :2])
    rb = torch.min(anchors[None, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def box2delta(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Encode boxes as (dx, dy, log dw, log dh) relative to anchors (broadcasting)."""
    anchors_wh = anchors[..., 2:] - anchors[..., :2]
    anchors_ctr = anchors[..., :2] + 0.5 * anchors_wh
    boxes_wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)
    boxes_ctr = boxes[..., :2] + 0.5 * boxes_wh
    return torch.cat([(boxes_ctr - anchors_ctr) / anchors_wh, torch.log(boxes_wh / anchors_wh)], dim=-1)


def delta2box(deltas: Tensor, anchors: Tensor, size: Tuple[float, float] = None) -> Tensor:
    """Inverse of box2delta; clips to `size` (height, width) when given."""
    anchors_wh = anchors[..., 2:] - anchors[..., :2]
    ctr = anchors[..., :2] + 0.5 * anchors_wh + deltas[..., :2] * anchors_wh
    wh = torch.exp(deltas[..., 2:].clamp(max=BBOX_XFORM_CLIP)) * anchors_wh
    boxes = torch.cat([ctr - 0.5 * wh, ctr + 0.5 * wh], dim=-1)
    if size is not None:
        h, w = size
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    return boxes


def assign_targets(anchors: Tensor, boxes: Tensor, labels: Tensor, *, fg_iou: float = 0.5,
                   bg_iou: float = 0.4, low_quality: bool = True) -> Tuple[Tensor, Tensor]:
    """Match anchors [A, 4] to padded ground truth (boxes [B, M, 4], labels [B, M], -1 = padding).

    Returns class targets [B, A] (label >= 0 foreground, -1 background, -2 ignored) and box delta
    targets [B, A, 4]. Vectorised over the whole batch. With `low_quality`, every box also claims
    the anchors it overlaps best (as torchvision's RetinaNet), so small objects get a positive.
    """
    batch = boxes.shape[0]
    if boxes.shape[1] == 0:
        return (torch.full((batch, anchors.shape[0]), -1, dtype=torch.long, device=anchors.device),
                torch.zeros(batch, anchors.shape[0], 4, device=anchors.device))
    cls_target, best_box = match_anchors(batched_box_iou(anchors, boxes), labels, fg_iou=fg_iou, bg_iou=bg_iou,
                                         low_quality=low_quality)
    matched_boxes = boxes.gather(1, best_box[..., None].expand(-1, -1, 4))
    box_target = box2delta(matched_boxes, anchors[None])
    return cls_target, box_target


def match_anchors(iou: Tensor, labels: Tensor, *, fg_iou: float, bg_iou: float, low_quality: bool
                  ) -> Tuple[Tensor, Tensor]:
    """assign_targets' matching, on any anchor/box IoU [B, A, M] (M >= 1) and labels [B, M] (-1 = padding):
    class targets [B, A] (label, -1 background, -2 ignored) and the index of each anchor's box [B, A]."""
    valid = labels >= 0
    iou = iou.masked_fill(~valid[:, None, :], -1.0)
    best_iou, best_box = iou.max(dim=2)                         # [B, A]
    if low_quality:
        best_for_box = iou.max(dim=1, keepdim=True).values      # [B, 1, M]
        claims = (iou == best_for_box) & (best_for_box > 0) & valid[:, None, :]
        claimed = claims.any(dim=2)
        # among the boxes an anchor is best for, keep the one with the highest IoU
        best_claim = torch.where(claims, iou, torch.full_like(iou, -1.0)).argmax(dim=2)
        best_box = torch.where(claimed, best_claim, best_box)
    matched_labels = labels.gather(1, best_box)
    cls_target = torch.where(best_iou >= fg_iou, matched_labels, torch.full_like(matched_labels, -2))
    cls_target = torch.where(best_iou < bg_iou, torch.full_like(cls_target, -1), cls_target)
    if low_quality:
        cls_target = torch.where(claimed, matched_labels, cls_target)
    return cls_target, best_box


def anchor_major(head: Tensor, num_anchors: int) -> Tensor:
    """A head output [B, A*K, H, W] (channel = anchor * K + k) -> [B, H*W*A, K], rows in anchor order (y, x, a)."""
    _, ak, h, w = head.shape
    k = ak // num_anchors
    return head.reshape(-1, num_anchors, k, h, w).permute(0, 3, 4, 1, 2).reshape(-1, h * w * num_anchors, k)


def top_k(scores: Tensor, k: int, *, floor: float = -math.inf) -> Tuple[Tensor, Tensor]:
    """Per row of `scores` [B, N], the k best (values, indices) in odtk's one order: score descending, then index
    ascending. torch.topk leaves the order of equal scores (and which of them make the cut) unspecified, and fp16
    heads tie often; odtk._C's kernels sort the same way, so both keep the same boxes in the same order. Scores at
    or below `floor` are the caller's to drop: which of them make the cut is left to torch.topk (cheaper)."""
    if k >= scores.shape[1]:
        return scores.sort(dim=1, descending=True, stable=True)
    top, index = scores.topk(k, dim=1)
    kth = top[:, -1:]
    if bool((kth > floor).any()):
        above, tied = scores > kth, scores == kth
        need = k - above.sum(1, keepdim=True)
        if bool(((tied.sum(1, keepdim=True) > need) & (kth > floor)).any()):   # ties straddle the cut
            tied &= tied.cumsum(1) <= need                                      # keep the lowest indices
            index = (above | tied).nonzero()[:, 1].view(scores.shape[0], k)     # ascending within each row
    index = index.sort(dim=1).values
    values, order = scores.gather(1, index).sort(dim=1, descending=True, stable=True)
    return values, index.gather(1, order)


def decode(cls_heads: List[Tensor], box_heads: List[Tensor], anchors: List[Tensor], *,
           threshold: float = 0.05, top_n: int = 1000, image_size: Tuple[int, int] = None,
           box_channels: int = 4, to_boxes: Callable[..., Tensor] = delta2box, sigmoid: bool = True
           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-level score threshold and top-n, then deltas -> boxes.

    Heads are [B, A*C, H, W] and [B, A*4, H, W] per level, anchors [H*W*A, 4]. Returns flat
    (batch index, score, box, class) over all levels; within a level and image, candidates come in `top_k`'s order
    (score descending, then flat anchor index (y, x, a, c) ascending). `box_channels` deltas per anchor, turned
    into boxes by `to_boxes(deltas, anchors, image_size)` (odtk.rotated.decode_rotated passes its own).
    `sigmoid` False: the class heads are probabilities already (a raw-heads graph's score outputs).
    """
    out_b, out_s, out_box, out_c = [], [], [], []
    for cls_head, box_head, level_anchors in zip(cls_heads, box_heads, anchors):
        b = cls_head.shape[0]
        num_anchors = box_head.shape[1] // box_channels
        num_classes = cls_head.shape[1] // num_anchors
        scores = anchor_major(cls_head.sigmoid() if sigmoid else cls_head, num_anchors).reshape(b, -1)  # (y, x, a, c)
        deltas = anchor_major(box_head, num_anchors)
        top_scores, top_idx = top_k(scores, min(top_n, scores.shape[1]), floor=threshold)
        keep = top_scores > threshold
        batch_idx = torch.arange(b, device=scores.device)[:, None].expand_as(keep)[keep]
        flat_idx = top_idx[keep]
        anchor_idx = flat_idx // num_classes
        out_b.append(batch_idx)
        out_s.append(top_scores[keep])
        out_c.append(flat_idx % num_classes)
        out_box.append(to_boxes(deltas[batch_idx, anchor_idx].float(), level_anchors[anchor_idx], image_size))
    return torch.cat(out_b), torch.cat(out_s), torch.cat(out_box), torch.cat(out_c)


def nms(batch_idx: Tensor, scores: Tensor, boxes: Tensor, classes: Tensor, batch_size: int, *,
        iou_threshold: float = 0.5, detections: int = 100) -> Tuple[Tensor, Tensor, Tensor]:
    """Class-aware NMS per image -> scores [B, D], boxes [B, D, 4], classes [B, D] (zero padded).

    Candidates are visited by decreasing score, equal scores in input order (decode's: level, then flat anchor
    index), as odtk._C's kernel visits them: torchvision sorts equal scores in no set order, so it is given ranks.
    """
    order = scores.argsort(descending=True, stable=True)
    batch_idx, scores, boxes, classes = batch_idx[order], scores[order], boxes[order], classes[order]
    ranks = torch.arange(scores.numel(), 0, -1, device=scores.device, dtype=torch.float32)   # distinct, same order
    # one NMS call for the whole batch: offset groups so (image, class) pairs never interact
    groups = batch_idx * (int(classes.max()) + 1 if classes.numel() else 1) + classes
    keep = batched_nms(boxes, ranks, groups, iou_threshold)   # in rank order
    return per_image(keep, batch_idx, scores, boxes, classes, batch_size, detections)


def per_image(keep: Tensor, batch_idx: Tensor, scores: Tensor, boxes: Tensor, classes: Tensor, batch_size: int,
              detections: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The kept candidates (indices `keep`, in visiting order) as each image's first `detections`: scores [B, D],
    boxes [B, D, K], classes [B, D], zero padded."""
    out_scores = scores.new_zeros(batch_size, detections)
    out_boxes = boxes.new_zeros(batch_size, detections, boxes.shape[-1])
    out_classes = classes.new_zeros(batch_size, detections)
    for i in range(batch_size):
        k = keep[batch_idx[keep] == i][:detections]
        n = k.numel()
        out_scores[i, :n] = scores[k]
        out_boxes[i, :n] = boxes[k]
        out_classes[i, :n] = classes[k]
    return out_scores, out_boxes, out_classes
