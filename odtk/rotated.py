"""Rotated boxes (ODTK's "Rotated ODTK"): anchors, IoU, encoding, target assignment, decode and NMS, as small pure
torch functions beside their axis-aligned twins in odtk.box.

A rotated box is a row (x1, y1, x2, y2, theta): the corners of the box before rotation, then its rotation in
radians about its centre. theta = 0 is exactly the axis-aligned box of odtk.box. On disk (COCO, ODTK's contract)
the same box is bbox = [x1, y1, w, h, theta], theta in [-pi/4, pi/4], segmentation = its 4 rotated corners.

The sign of theta is ODTK's (odtk/utils.py rotate_boxes): a corner at offset (dx, dy) from the centre goes to
(cos t * dx + sin t * dy, -sin t * dx + cos t * dy). In image coordinates (y pointing down) a positive theta turns
the box counter-clockwise as seen on screen. Example: the square bbox [0, 0, 2, 2, pi/4] (centre (1, 1)) has its
top-right corner (2, 0) at (1, 1 - sqrt 2), straight above the centre, and its top-left corner (0, 0) at
(1 - sqrt 2, 1), straight left of it.
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import box as B

# ODTK's angles for rotated models (its model.py): with its 3 ratios x 3 scales, 27 anchors per cell
DEFAULT_ANGLES = (-math.pi / 6, 0.0, math.pi / 6)
# pairs per step of the clipping: each holds ~1 KB (float32) to 1.6 KB (float64) of temporaries at the peak
PAIR_CHUNK = 1 << 15
# enclosing-box tests per step when finding the pairs that may overlap (~20 bytes each)
TEST_CHUNK = 1 << 22
# boxes NMS takes at a time (_greedy): fewer make more, smaller calls, which cost more than the pairs they save
GREEDY_BLOCK = 32


def centres(boxes: Tensor) -> Tensor:
    """Box centres [..., 2] (rotation keeps them)."""
    return (boxes[..., :2] + boxes[..., 2:4]) / 2


def _corners_xy(boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """corners() as x [..., 4] and y [..., 4]. Each corner moves from the unrotated one by (R - I) times its offset
    from the centre, with cos - 1 taken as -2 sin^2(theta / 2): exactly 0 at theta = 0, so the corners of unrotated
    boxes are the inputs themselves, without rounding."""
    x1, y1, x2, y2, theta = boxes.unbind(-1)
    x, y = torch.stack([x1, x2, x2, x1], dim=-1), torch.stack([y1, y1, y2, y2], dim=-1)
    dx, dy = x - ((x1 + x2) / 2)[..., None], y - ((y1 + y2) / 2)[..., None]
    cos_1, sin = (-2 * (theta / 2).sin() ** 2)[..., None], theta.sin()[..., None]
    return x + cos_1 * dx + sin * dy, y + cos_1 * dy - sin * dx


def corners(boxes: Tensor) -> Tensor:
    """The 4 corners [..., 4, 2] of rotated boxes [..., 5]: the unrotated box's top-left, top-right, bottom-right,
    bottom-left (in that order, so the polygon keeps one winding), each turned about the centre by theta."""
    return torch.stack(_corners_xy(boxes), dim=-1)


def enclosing_boxes(boxes: Tensor) -> Tensor:
    """The smallest axis-aligned boxes [..., 4] (x1, y1, x2, y2) holding rotated boxes [..., 5]."""
    points = corners(boxes)
    return torch.cat([points.amin(dim=-2), points.amax(dim=-2)], dim=-1)



def crop_reference(boxes: Tensor, width: int, height: int) -> Tensor:
    """The axis-aligned boxes a random crop's IoU rule measures: the boxes [N, 4] themselves, or for rotated ones
    [N, 5] their enclosing boxes shrunk about the centre to fit in the image (centred on the box's centre, as the
    crop's keep rule is, and inside the image, as DALI's fn.random_bbox_crop needs)."""
    if boxes.shape[1] == 4:
        return boxes
    outer = enclosing_boxes(boxes)
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2
    room = torch.minimum(centre, torch.tensor([width, height], dtype=boxes.dtype) - centre)
    half = torch.minimum((outer[:, 2:] - outer[:, :2]) / 2, room).clamp(min=0)
    return torch.cat([centre - half, centre + half], dim=1)

# -- anchors -------------------------------------------------------------------------------------------------------
def generate_anchors_rotated(stride: int, ratios: Sequence[float], scales: Sequence[float],
                             angles: Sequence[float] = DEFAULT_ANGLES) -> Tensor:
    """Cell anchors [len(angles) * len(scales) * len(ratios), 5] in ODTK's order: angle-major, then odtk.box's
    generate_anchors (scale, then ratio) at each angle; the angle is the anchor's theta."""
    base = B.generate_anchors(stride, ratios, scales)
    theta = torch.tensor(angles, dtype=base.dtype).repeat_interleave(base.shape[0])
    return torch.cat([base.repeat(len(angles), 1), theta[:, None]], dim=1)


def grid_anchors_rotated(cell_anchors: Tensor, stride: int, height: int, width: int) -> Tensor:
    """All rotated anchors of a feature map, ordered (y, x, anchor) -> [height * width * A, 5]."""
    boxes = B.grid_anchors(cell_anchors[:, :4].contiguous(), stride, height, width)
    return torch.cat([boxes, cell_anchors[:, 4].repeat(height * width)[:, None]], dim=1)


# -- IoU -----------------------------------------------------------------------------------------------------------
# The IoU works on x and y as separate [P, K] tensors: interleaved [..., 2] pairs cost a copy at every stack
def _in_frame(x: Tensor, y: Tensor, box: Tensor) -> Tuple[Tensor, Tensor]:
    """Offsets x, y [P, K] turned into the frame of `box` [P, 5] (the inverse of its rotation)."""
    cos, sin = box[:, 4, None].cos(), box[:, 4, None].sin()
    return cos * x - sin * y, sin * x + cos * y


def _slab(start: Tensor, step: Tensor, half: Tensor) -> Tuple[Tensor, Tensor]:
    """Liang-Barsky on one axis: the range (enter, leave) of t where -half <= start + t * step <= half; all t if
    the segment runs along the slab inside it, none (enter = inf) if outside."""
    moving = step != 0
    safe = torch.where(moving, step, torch.ones_like(step))
    ta, tb = (-half - start) / safe, (half - start) / safe
    inside = start.abs() <= half
    never, always = torch.full_like(ta, math.inf), torch.full_like(ta, -math.inf)
    enter = torch.where(moving, torch.minimum(ta, tb), torch.where(inside, always, never))
    leave = torch.where(moving, torch.maximum(ta, tb), torch.where(inside, never, always))
    return enter, leave


def _inside_parts(x: Tensor, y: Tensor, box: Tensor, tol: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The ends x, y [P, 8] of the parts of a quad's edges (corners x, y [P, 4], in order) that lie in `box`
    [P, 5], and which exist [P, 8].

    An edge parallel to a border of the box (to within `tol` [P, 1] over its length) is tested against that border
    moved out by `tol`, so that an edge lying on it stays in whatever the rounding (identical boxes). Borders the
    edge crosses are not moved: that would move every crossing, where rounding only costs an ulp.
    """
    step_x, step_y = x.roll(-1, dims=1) - x, y.roll(-1, dims=1) - y
    centre = centres(box)
    start_x, start_y = _in_frame(x - centre[:, :1], y - centre[:, 1:], box)
    along_x, along_y = _in_frame(step_x, step_y, box)
    half = (box[:, 2:4] - box[:, :2]).clamp(min=0) / 2
    half_x = half[:, :1] + torch.where(along_x.abs() <= tol, tol, 0)
    half_y = half[:, 1:] + torch.where(along_y.abs() <= tol, tol, 0)
    enter_x, leave_x = _slab(start_x, along_x, half_x)
    enter_y, leave_y = _slab(start_y, along_y, half_y)
    enter, leave = torch.maximum(enter_x, enter_y), torch.minimum(leave_x, leave_y)
    found = (enter <= leave) & (enter <= 1) & (leave >= 0)
    t0, t1 = enter.clamp(0, 1), leave.clamp(0, 1)
    ends_x = torch.cat([x + t0 * step_x, x + t1 * step_x], dim=1)
    ends_y = torch.cat([y + t0 * step_y, y + t1 * step_y], dim=1)
    return ends_x, ends_y, found.repeat(1, 2)


def _polygon_area(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Area [P] of the convex polygon whose vertices are the valid points x, y [P, K] (in any order, repeats
    allowed): sort them by angle about their mean, then the shoelace formula about that mean."""
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    x = x - (x * valid).sum(dim=1, keepdim=True) / count
    y = y - (y * valid).sum(dim=1, keepdim=True) / count
    order = torch.atan2(y, x).masked_fill(~valid, math.inf).argsort(dim=1)
    x, y, valid = x.gather(1, order), y.gather(1, order), valid.gather(1, order)
    # the missing points repeat the first one: the closing edges they add have no area
    x, y = torch.where(valid, x, x[:, :1]), torch.where(valid, y, y[:, :1])
    return (x * y.roll(-1, dims=1) - y * x.roll(-1, dims=1)).sum(dim=1).abs() / 2


def pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU [P] of the rotated boxes a [P, 5] and b [P, 5], row by row (one chunk of PAIR_CHUNK pairs at most).

    The intersection of two convex quads is a convex polygon whose vertices are the ends of the parts of each
    quad's edges inside the other (Liang-Barsky clipping: corners inside the other, crossings of edges); its area
    is the shoelace formula's once they are sorted by angle. Coordinates are taken from b's (x1, y1) rather than
    the image's origin, so float32 keeps its precision on large images, and unrotated corners are exact
    differences of the inputs (at theta = 0 this is torchvision's box_iou to float32 rounding). Zero-area boxes
    give 0, never NaN.
    """
    origin = b[:, :2].repeat(1, 2)
    a = torch.cat([a[:, :4] - origin, a[:, 4:]], dim=1)
    b = torch.cat([b[:, :4] - origin, b[:, 4:]], dim=1)
    (ax, ay), (bx, by) = _corners_xy(a), _corners_xy(b)
    # a few ulps of the pair's scale: more than the rounding of the frames, and adds at most slivers that thin
    scale = torch.cat([ax, ay, bx, by], dim=1).abs().amax(dim=1, keepdim=True)
    tol = scale * (4 * torch.finfo(a.dtype).eps)
    ends_ax, ends_ay, found_a = _inside_parts(ax, ay, b, tol)
    ends_bx, ends_by, found_b = _inside_parts(bx, by, a, tol)
    inter = _polygon_area(torch.cat([ends_ax, ends_bx], dim=1), torch.cat([ends_ay, ends_by], dim=1),
                          torch.cat([found_a, found_b], dim=1))
    area_a, area_b = B.box_area(a), B.box_area(b)
    inter = torch.minimum(inter, torch.minimum(area_a, area_b))     # rounding never makes IoU exceed 1
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(union))


def _overlapping(a: Tensor, b: Tensor) -> Tensor:
    """Which rows of a [N, 4] and b [M, 4] (axis-aligned) overlap with a positive area -> bool [N, M]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (lt < rb).all(dim=-1)


def _work(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """a and b in the dtype the IoU is computed in: float64 if either is, else float32 (float16 would round the
    corners of a large image by pixels)."""
    work = torch.promote_types(a.dtype, b.dtype)
    work = work if work == torch.float64 else torch.float32
    return a.to(work), b.to(work)


def _overlapping_pairs(enclose_a: Tensor, enclose_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Row indices (i, j) of the pairs of axis-aligned boxes enclose_a [N, 4] x enclose_b [M, 4] that overlap,
    tested TEST_CHUNK at a time."""
    rows = max(1, TEST_CHUNK // max(1, enclose_b.shape[0]))
    found_i, found_j = [], []
    for start in range(0, enclose_a.shape[0], rows):
        i, j = _overlapping(enclose_a[start:start + rows], enclose_b).nonzero(as_tuple=True)
        found_i.append(i + start)
        found_j.append(j)
    if not found_i:
        return enclose_a.new_zeros(0, dtype=torch.long), enclose_a.new_zeros(0, dtype=torch.long)
    return torch.cat(found_i), torch.cat(found_j)


def _paired(fn, a: Tensor, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """fn(a[i], b[j]) -> [len(i)], PAIR_CHUNK pairs at a time (fn: pair_iou or iou_bound)."""
    return torch.cat([fn(a[i[k:k + PAIR_CHUNK]], b[j[k:k + PAIR_CHUNK]]) for k in range(0, i.numel(), PAIR_CHUNK)]
                     or [a.new_zeros(0)])


@torch.no_grad()
def rotated_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix [N, M] of rotated boxes a [N, 5] and b [M, 5] (not differentiable).

    Only the pairs whose enclosing boxes overlap are clipped, PAIR_CHUNK at a time: the 147k anchors of a 512x512
    image (27 per cell) x 50 boxes peak near 120 MB. Computed in float64 if either input is, else in float32
    (float16 would round the corners of a large image by pixels).
    """
    a, b = _work(a, b)
    out = a.new_zeros(a.shape[0], b.shape[0])
    if out.numel() == 0:
        return out
    i, j = _overlapping_pairs(enclosing_boxes(a), enclosing_boxes(b))
    out[i, j] = _paired(pair_iou, a, b, i, j)
    return out


# a bound is compared with this much room: its rounding and the exact IoU's (float32, coordinates of large images)
BOUND_SLACK = 1e-3


def _frame_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Area [P] shared by box a [P, 5] and the axis-aligned box enclosing b [P, 5] in a's own frame (turned with
    a): at least the area a and b share."""
    bx, by = _corners_xy(b)
    centre = centres(a)
    x, y = _in_frame(bx - centre[:, :1], by - centre[:, 1:], a)
    half = (a[:, 2:4] - a[:, :2]).clamp(min=0) / 2
    w = torch.minimum(x.amax(dim=1), half[:, 0]) - torch.maximum(x.amin(dim=1), -half[:, 0])
    h = torch.minimum(y.amax(dim=1), half[:, 1]) - torch.maximum(y.amin(dim=1), -half[:, 1])
    return w.clamp(min=0) * h.clamp(min=0)


def iou_bound(a: Tensor, b: Tensor) -> Tensor:
    """An upper bound [P] of pair_iou(a, b) for rotated boxes a [P, 5] and b [P, 5], a few times cheaper: their
    intersection lies in each box and in each box's frame-aligned hull of the other (_frame_overlap), and the IoU
    grows with the intersection. Exact (to rounding) for boxes turned alike, theta = 0 included."""
    area_a, area_b = B.box_area(a), B.box_area(b)
    inter = torch.minimum(torch.minimum(_frame_overlap(a, b), _frame_overlap(b, a)), torch.minimum(area_a, area_b))
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(union))


def _coarse_iou(enclose_a: Tensor, area_a: Tensor, enclose_b: Tensor, area_b: Tensor) -> Tensor:
    """An upper bound of the IoU of rotated boxes from their enclosing boxes [..., 4] and areas [...]
    (broadcasting): the two share no more than their enclosing boxes do, nor than the smaller area. As cheap as
    odtk.box's IoU, and at theta = 0 that IoU itself, computed alike; 0 for boxes that cannot overlap."""
    overlap = (torch.minimum(enclose_a[..., 2:], enclose_b[..., 2:])
               - torch.maximum(enclose_a[..., :2], enclose_b[..., :2])).clamp(min=0)
    inter = torch.minimum(overlap[..., 0] * overlap[..., 1], torch.minimum(area_a, area_b))
    union = area_a + area_b - inter
    return torch.where(inter > 0, inter / torch.where(inter > 0, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


def _coarse_pairs(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The pairs (i, j) of rotated boxes a [N, 5] x b [M, 5] that may overlap, and their _coarse_iou [P]."""
    enclose_a, enclose_b = enclosing_boxes(a), enclosing_boxes(b)
    area_a, area_b = B.box_area(a), B.box_area(b)
    rows = max(1, TEST_CHUNK // max(1, b.shape[0]))
    found = []
    for start in range(0, a.shape[0], rows):
        bound = _coarse_iou(enclose_a[start:start + rows, None], area_a[start:start + rows, None], enclose_b[None],
                            area_b[None])
        i, j = bound.nonzero(as_tuple=True)
        found.append((i + start, j, bound[i, j]))
    return tuple(torch.cat(parts) for parts in zip(*found)) if found else (
        a.new_zeros(0, dtype=torch.long), a.new_zeros(0, dtype=torch.long), a.new_zeros(0))


def _unturned(a: Tensor, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Which pairs (a[i], b[j]) are both at theta 0: their coarse bound (_coarse_pairs) is their IoU, computed as
    odtk.box computes it (to the bit: an axis-aligned problem keeps its numbers, ties included)."""
    return (a[i, 4] == 0) & (b[j, 4] == 0)


def _refine(a: Tensor, b: Tensor, i: Tensor, j: Tensor, value: Tensor, level: Tensor, need: Tensor) -> None:
    """In place: each pair (a[i], b[j]) whose `value`, an upper bound of its IoU (`level` 0: coarse, 1:
    iou_bound), may still reach `need` gets the next tighter one, iou_bound then pair_iou (level 2: the IoU)."""
    for fn, tighter in ((iou_bound, 1), (pair_iou, 2)):
        pick = ((level < tighter) & (value >= need - BOUND_SLACK)).nonzero()[:, 0]
        value[pick] = _paired(fn, a, b, i[pick], j[pick])
        level[pick] = tighter


@torch.no_grad()
def matching_iou(anchors: Tensor, boxes: Tensor, floor: float) -> Tensor:
    """rotated_box_iou(anchors [A, 5], boxes [M, 5]) -> [A, M] where target matching reads it, at a fraction of the
    cost: exact for every pair that may reach `floor` (the background IoU) and, per box, every pair that may reach
    the box's best (low-quality matches). Pairs go from the cheapest bound (_coarse_pairs) to a tighter one
    (iou_bound) to the exact IoU only while they may still reach that (_refine); every other pair holds its last
    bound, below both, so B.match_anchors gives the same class targets, and the same box to every non-background
    anchor, as on the exact matrix. At theta = 0 every value is odtk.box's IoU, so matching is odtk.box's."""
    anchors, boxes = _work(anchors, boxes)
    out = anchors.new_zeros(anchors.shape[0], boxes.shape[0])
    i, j, value = _coarse_pairs(anchors, boxes)
    level = torch.where(_unturned(anchors, boxes, i, j), 2, 0).to(torch.uint8)
    need = torch.full_like(value, floor)
    for _ in range(2):   # the floor, then each box's best: a second pass finds every pair that may beat it
        _refine(anchors, boxes, i, j, value, level, need)
        exact = level == 2
        best = value.new_zeros(boxes.shape[0]).scatter_reduce(0, j[exact], value[exact], reduce="amax")
        need = torch.minimum(need, best[j])
    out[i, j] = value
    return out


def batched_rotated_box_iou(anchors: Tensor, boxes: Tensor) -> Tensor:
    """IoU of anchors [A, 5] with each image's boxes [B, M, 5] -> [B, A, M] (odtk.box.batched_box_iou's form)."""
    batch, count = boxes.shape[:2]
    iou = rotated_box_iou(anchors, boxes.reshape(-1, 5))
    return iou.view(anchors.shape[0], batch, count).transpose(0, 1)


# -- encoding and target assignment ------------------------------------------------------------------------------
def box2delta_rotated(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Encode rotated boxes [..., 5] as (dx, dy, log dw, log dh, sin dtheta, cos dtheta) relative to rotated anchors
    (broadcasting): odtk.box's deltas of the unrotated boxes, and the angle from the anchor's."""
    turn = boxes[..., 4] - anchors[..., 4]
    return torch.cat([B.box2delta(boxes[..., :4], anchors[..., :4]), turn.sin()[..., None], turn.cos()[..., None]],
                     dim=-1)


def delta2box_rotated(deltas: Tensor, anchors: Tensor, size: Tuple[float, float] = None) -> Tensor:
    """Inverse of box2delta_rotated -> [..., 5], theta = atan2(sin, cos) + the anchor's (not wrapped). With `size`
    (height, width), the centres are clipped into the image: clipping the corners would change a rotated shape."""
    boxes = B.delta2box(deltas[..., :4], anchors[..., :4])
    if size is not None:
        boxes = clip_centres(boxes, size)
    theta = torch.atan2(deltas[..., 4], deltas[..., 5]) + anchors[..., 4]
    return torch.cat([boxes, theta[..., None]], dim=-1)


def fold(boxes: Tensor) -> Tensor:
    """The same rotated rectangles [..., 5] with theta in [-pi/4, pi/4] (ODTK's range, odtk.convert.fold_angle's
    rule): k quarter turns taken off theta, width and height swapped when k is odd; boxes already there unchanged."""
    turns = torch.round(boxes[..., 4] / (math.pi / 2))
    half = (boxes[..., 2:4] - boxes[..., :2]) / 2
    half = torch.where((turns % 2 != 0)[..., None], half.flip(-1), half)
    ctr = centres(boxes)
    folded = torch.cat([ctr - half, ctr + half, (boxes[..., 4] - turns * (math.pi / 2))[..., None]], dim=-1)
    return torch.where((turns != 0)[..., None], folded, boxes)


def turned_like(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Rotated boxes [..., 5] written as the same rectangles turned at most pi/4 from their anchors [..., 5]
    (broadcasting; fold's rule on the difference of the angles): a tall anchor matched to
    a wide box turned 70 degrees from it regresses to the box's tall form 20 degrees away, not to swapped sides
    and a 70 degree turn. Unchanged when the difference is within pi/4 (theta = 0 included)."""
    turn = boxes[..., 4] - anchors[..., 4]
    relative = fold(torch.cat([boxes[..., :4], turn[..., None]], dim=-1))
    return torch.cat([relative[..., :4], (relative[..., 4] + anchors[..., 4])[..., None]], dim=-1)


def clip_centres(boxes: Tensor, size: Tuple[float, float]) -> Tensor:
    """Boxes [..., 4] or rotated [..., 5] moved so that their centres are in an image of `size` (height, width),
    size and theta kept: clipping the corners would change a rotated shape."""
    h, w = size
    ctr = centres(boxes)
    shift = torch.stack([ctr[..., 0].clamp(0, w), ctr[..., 1].clamp(0, h)], dim=-1) - ctr
    return boxes + torch.cat([shift, shift, torch.zeros_like(shift[..., :boxes.shape[-1] - 4])], dim=-1)


@torch.no_grad()
def assign_targets_rotated(anchors: Tensor, boxes: Tensor, labels: Tensor, *, fg_iou: float = 0.5,
                           bg_iou: float = 0.4, low_quality: bool = True) -> Tuple[Tensor, Tensor]:
    """odtk.box.assign_targets for rotated anchors [A, 5] and padded boxes [B, M, 5] (labels [B, M], -1 = padding),
    on the rotated IoU (matching_iou: exact where the matching reads it): class targets [B, A] (label, -1
    background, -2 ignored) and deltas [B, A, 6] to each box written turned_like its anchor (|turn| <= pi/4)."""
    batch, count = boxes.shape[0], anchors.shape[0]
    if boxes.shape[1] == 0:
        return (torch.full((batch, count), -1, dtype=torch.long, device=anchors.device),
                torch.zeros(batch, count, 6, device=anchors.device))
    iou = matching_iou(anchors, boxes.reshape(-1, 5), min(fg_iou, bg_iou)).view(count, batch, -1).transpose(0, 1)
    cls_target, best_box = B.match_anchors(iou, labels, fg_iou=fg_iou, bg_iou=bg_iou, low_quality=low_quality)
    matched = boxes.gather(1, best_box[..., None].expand(-1, -1, 5))
    return cls_target, box2delta_rotated(turned_like(matched, anchors[None]), anchors[None])


# -- inference ---------------------------------------------------------------------------------------------------
def decode_rotated(cls_heads: List[Tensor], box_heads: List[Tensor], anchors: List[Tensor], *,
                   threshold: float = 0.05, top_n: int = 1000, image_size: Tuple[int, int] = None,
                   sigmoid: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """odtk.box.decode for rotated heads: box heads [B, A*6, H, W], anchors [H*W*A, 5] per level -> flat (batch
    index, score, box [N, 5], class), in the same order as odtk.box.decode (`sigmoid` False: class heads that are
    probabilities already)."""
    return B.decode(cls_heads, box_heads, anchors, threshold=threshold, top_n=top_n, image_size=image_size,
                    box_channels=6, to_boxes=delta2box_rotated, sigmoid=sigmoid)


def _suppressions(boxes: Tensor, enclose: Tensor, area: Tensor, rows: Tensor, cols: Tensor,
                  iou_threshold: float) -> Tuple[Tensor, Tensor]:
    """The pairs (i, j) of rows x cols (indices into boxes [n, 5], with their enclosing boxes and areas), j > i,
    whose rotated IoU is over the threshold: clipped only where the bounds may pass it (_refine; pair_iou(boxes[i],
    boxes[j]), as rotated_box_iou(group, group) computes it), all in one go."""
    value = _coarse_iou(enclose[rows, None], area[rows, None], enclose[cols][None], area[cols][None])
    r, c = ((value > iou_threshold - BOUND_SLACK) & (cols[None] > rows[:, None])).nonzero(as_tuple=True)
    value, i, j = value[r, c], rows[r], cols[c]
    level = torch.where(_unturned(boxes, boxes, i, j), 2, 0).to(torch.uint8)
    _refine(boxes, boxes, i, j, value, level, torch.full_like(value, iou_threshold))
    hit = value > iou_threshold
    return i[hit], j[hit]


def _greedy(boxes: Tensor, iou_threshold: float, limit: int) -> Tensor:
    """Indices kept by greedy NMS of boxes [n, 5] visited in order, the first `limit` at most: each kept box drops
    the later boxes still in whose rotated IoU with it is over the threshold. The boxes still in are taken
    GREEDY_BLOCK at a time: the block settles which of its boxes stay (their IoU among themselves), then those drop
    the later boxes (their IoU with every later box still in): two vectorised steps a block, however many boxes
    it keeps."""
    boxes = _work(boxes, boxes)[0]
    enclose, area = enclosing_boxes(boxes), B.box_area(boxes)
    removed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep: List[int] = []
    start = 0
    while len(keep) < limit:
        rows = (~removed[start:]).nonzero()[:GREEDY_BLOCK, 0] + start
        if not rows.numel():
            break
        i, j = _suppressions(boxes, enclose, area, rows, rows, iou_threshold)
        kept: List[int] = []
        for row in rows.tolist():
            if removed[row]:
                continue
            kept.append(row)
            if len(keep) + len(kept) == limit:
                break
            removed[j[i == row]] = True
        keep += kept
        start = int(rows[-1]) + 1
        later = (~removed[start:]).nonzero()[:, 0] + start
        if later.numel() and len(keep) < limit:
            removed[_suppressions(boxes, enclose, area, rows.new_tensor(kept), later, iou_threshold)[1]] = True
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def nms_rotated(batch_idx: Tensor, scores: Tensor, boxes: Tensor, classes: Tensor, batch_size: int, *,
                iou_threshold: float = 0.5, detections: int = 100) -> Tuple[Tensor, Tensor, Tensor]:
    """odtk.box.nms on rotated boxes [N, 5]: per (image, class), visit by decreasing score (equal scores in input
    order), drop the later boxes whose rotated IoU with a kept one is over `iou_threshold` -> scores [B, D],
    boxes [B, D, 5], classes [B, D] (zero padded)."""
    keep = nms_rotated_keep(batch_idx, scores, boxes, classes, iou_threshold=iou_threshold, detections=detections)
    return B.per_image(keep, batch_idx, scores, boxes, classes, batch_size, detections)


def nms_rotated_keep(batch_idx: Tensor, scores: Tensor, boxes: Tensor, classes: Tensor, *,
                     iou_threshold: float = 0.5, detections: int = 100) -> Tensor:
    """The indices nms_rotated keeps, in its visiting order (at least each image's first `detections`)."""
    if scores.numel() == 0:
        return scores.new_zeros(0, dtype=torch.long)
    order = scores.argsort(descending=True, stable=True)                # the visiting order
    groups = (batch_idx * (int(classes.max()) + 1) + classes)[order]
    by_group = groups.argsort(stable=True)                              # positions in it, grouped
    counts = torch.unique_consecutive(groups[by_group], return_counts=True)[1]
    kept = []
    for pos in torch.split(by_group, counts.tolist()):
        # an image keeps its first `detections`: no group gives it more than that
        kept.append(pos[_greedy(boxes[order[pos]], iou_threshold, detections)])
    return order[torch.cat(kept).sort().values]                         # kept, in the visiting order
