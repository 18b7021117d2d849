"""Rotated box maths (odtk.rotated): corners and their sign, anchors, IoU against shapely and torchvision, encoding,
target assignment, decode and NMS against odtk.box and slow references."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from odtk import box as B
from odtk import rotated as R

SQ3 = math.sqrt(3)
DTYPES = [torch.float32, torch.float64]


def random_boxes(n: int, *, generator: torch.Generator, spread: float = 100.0, near: torch.Tensor = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n rotated boxes (x1, y1, x2, y2, theta), sides 0.5-60, theta in [-pi/2, pi/2]; centred within 30 px of
    the centres of `near` when given (so that most pairs overlap)."""
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 59.5 + 0.5
    if near is None:
        ctr = torch.rand(n, 2, generator=generator, dtype=torch.float64) * spread
    else:
        ctr = R.centres(near.double()) + (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * 60
    theta = (torch.rand(n, 1, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    return torch.cat([ctr - wh / 2, ctr + wh / 2, theta], dim=1).to(dtype)


def shapely_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of each pair of rows by shapely's polygon intersection (float64)."""
    shapely = pytest.importorskip("shapely", reason="shapely (the test extra) checks the IoU maths")
    pa = shapely.polygons(R.corners(a.double()).numpy())
    pb = shapely.polygons(R.corners(b.double()).numpy())
    inter = torch.from_numpy(shapely.area(shapely.intersection(pa, pb)))
    return inter / (torch.from_numpy(shapely.area(pa)) + torch.from_numpy(shapely.area(pb)) - inter)


# -- corners and anchors -------------------------------------------------------------------------------------------
def test_corners_by_hand_follow_odtk_rotate_boxes():
    """ODTK's rotate_boxes turns an offset (dx, dy) from the centre into (cos dx + sin dy, -sin dx + cos dy).
    COCO bbox [10, 20, 4, 2, pi/6]: centre (12, 21), offsets (-2, -1), (2, -1), (2, 1), (-2, 1); cos = sqrt3/2,
    sin = 1/2."""
    box = torch.tensor([[10.0, 20.0, 14.0, 22.0, math.pi / 6]], dtype=torch.float64)
    expected = torch.tensor([[12 - SQ3 - 0.5, 21 + 1 - SQ3 / 2],       # top-left
                             [12 + SQ3 - 0.5, 21 - 1 - SQ3 / 2],       # top-right
                             [12 + SQ3 + 0.5, 21 - 1 + SQ3 / 2],       # bottom-right
                             [12 - SQ3 + 0.5, 21 + 1 + SQ3 / 2]], dtype=torch.float64)
    got = R.corners(box)[0]
    assert torch.allclose(got, expected, atol=1e-12)
    # y points down: the right side went up, the left side down, i.e. counter-clockwise on screen
    assert got[1, 1] < 20 and got[3, 1] > 22
    assert torch.allclose(R.enclosing_boxes(box), torch.tensor([[12 - SQ3 - 0.5, 21 - 1 - SQ3 / 2,
                                                                 12 + SQ3 + 0.5, 21 + 1 + SQ3 / 2]],
                                                                dtype=torch.float64), atol=1e-12)


def test_corners_docstring_example():
    square = torch.tensor([0.0, 0.0, 2.0, 2.0, math.pi / 4], dtype=torch.float64)
    tl, tr = R.corners(square)[:2]
    assert torch.allclose(tr, torch.tensor([1, 1 - math.sqrt(2)], dtype=torch.float64))
    assert torch.allclose(tl, torch.tensor([1 - math.sqrt(2), 1], dtype=torch.float64))
    # the data side's example (odtk.convert.bbox_corners): COCO [51, 43, 20, 10, theta], sin 0.6, cos 0.8
    box = torch.tensor([51, 43, 71, 53, math.atan2(0.6, 0.8)], dtype=torch.float64)
    assert torch.allclose(R.corners(box), torch.tensor([[50, 50], [66, 38], [72, 46], [56, 58.0]],
                                                       dtype=torch.float64))


def test_unrotated_corners_and_enclosing_boxes_are_exact():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(50, generator=g, spread=1000)
    boxes[:, 4] = 0
    x1, y1, x2, y2 = boxes[:, :4].unbind(1)
    assert torch.equal(R.corners(boxes), torch.stack([torch.stack(p, 1) for p in
                                                      ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], 1))
    assert torch.equal(R.enclosing_boxes(boxes), boxes[:, :4])
    assert R.corners(boxes.view(5, 10, 5)).shape == (5, 10, 4, 2)       # batched


def test_rotated_anchors_in_odtk_order():
    ratios, scales = [1.0, 2.0, 0.5], [4 * 2 ** (i / 3) for i in range(3)]
    cell = R.generate_anchors_rotated(16, ratios, scales)
    assert cell.shape == (27, 5) and R.DEFAULT_ANGLES == (-math.pi / 6, 0.0, math.pi / 6)
    base = B.generate_anchors(16, ratios, scales)
    for k, angle in enumerate(R.DEFAULT_ANGLES):                        # angle-major, then odtk.box's order
        assert torch.equal(cell[9 * k:9 * (k + 1), :4], base)
        assert torch.allclose(cell[9 * k:9 * (k + 1), 4], torch.tensor(angle))
    grid = R.grid_anchors_rotated(cell, 16, 3, 4)
    assert grid.shape == (3 * 4 * 27, 5)
    assert torch.equal(grid[:, :4], B.grid_anchors(base.repeat(3, 1), 16, 3, 4))
    assert torch.equal(grid[:, 4], cell[:, 4].repeat(12))
    flat = R.generate_anchors_rotated(8, [1.0], [4.0], angles=[0.0])
    assert torch.equal(flat[:, :4], B.generate_anchors(8, [1.0], [4.0])) and (flat[:, 4] == 0).all()


# -- IoU -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_matches_shapely_on_random_pairs(dtype):
    g = torch.Generator().manual_seed(1)
    a = random_boxes(2500, generator=g, dtype=dtype)
    b = random_boxes(2500, generator=g, near=a, dtype=dtype)
    expected = shapely_iou(a, b)
    assert (expected > 0.05).sum() > 1000                               # mostly real overlaps, not zeros
    got = R.pair_iou(a, b)
    assert got.dtype == dtype and torch.allclose(got.double(), expected, atol=1e-4, rtol=0)
    if dtype == torch.float64:
        assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    # the matrix form (prefilter and chunks) gives the same pairs
    matrix = R.rotated_box_iou(a[:300], b[:200])
    assert torch.allclose(matrix.double(), shapely_iou(a[:300, None].expand(-1, 200, -1).reshape(-1, 5),
                                                       b[None, :200].expand(300, -1, -1).reshape(-1, 5)
                                                       ).view(300, 200), atol=1e-4, rtol=0)


def box_at(cx: float, cy: float, w: float, h: float, theta: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_special_cases(dtype):
    t = math.pi / 7
    big = box_at(20, 10, 40, 20, t, dtype)
    # its neighbour along its turned x axis (cos t, -sin t): they share an edge
    beside = box_at(20 + 40 * math.cos(t), 10 - 40 * math.sin(t), 40, 20, t, dtype)
    small = box_at(21, 9, 10, 10, t + 0.3, dtype)                          # well inside big
    flat = box_at(20, 10, 40, 20, 0.0, dtype)
    cases = {
        "identical": (big, big, 1.0),
        "nested": (big, small, 100 / 800),
        "nested, swapped": (small, big, 100 / 800),
        "touching": (big, beside, 0.0),
        "disjoint": (big, box_at(120, 10, 40, 20, t, dtype), 0.0),
        "zero width": (big, box_at(20, 10, 0, 20, 0.3, dtype), 0.0),
        "zero height": (box_at(20, 5, 40, 0, 0.0, dtype), big, 0.0),
        "both a point": (box_at(5, 5, 0, 0, 0.0, dtype), box_at(5, 5, 0, 0, 0.0, dtype), 0.0),
        "half overlap, unrotated": (flat, box_at(40, 10, 40, 20, 0.0, dtype), 1 / 3),
    }
    for name, (a, b, expected) in cases.items():
        got = R.pair_iou(a[None], b[None])
        matrix = R.rotated_box_iou(a[None], b[None])
        assert not got.isnan().any() and not matrix.isnan().any(), name
        assert got.item() == pytest.approx(expected, abs=1e-6), name
        assert matrix.item() == pytest.approx(expected, abs=1e-6), name
    # touching, axis-aligned: exactly 0
    assert R.rotated_box_iou(flat[None], box_at(60, 10, 40, 20, 0.0, dtype)[None]).item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_at_theta_zero_is_torchvision(dtype):
    g = torch.Generator().manual_seed(2)
    a = random_boxes(400, generator=g, dtype=dtype)
    b = random_boxes(300, generator=g, dtype=dtype)
    a[:, 4] = b[:, 4] = 0
    b[:50, :4] = a[:50, :4]                                             # identical ones too
    b[50:60, 0] = a[50:60, 2]                                           # and left edges on right edges
    expected = box_iou(a[:, :4], b[:, :4])
    got = R.rotated_box_iou(a, b)
    assert (expected > 0).sum() > 1000
    assert got.dtype == dtype and torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_iou_chunks_batches_and_half_precision(monkeypatch):
    g = torch.Generator().manual_seed(3)
    anchors = random_boxes(200, generator=g)
    boxes = random_boxes(3 * 7, generator=g, near=anchors[::9][:21]).view(3, 7, 5)
    whole = R.rotated_box_iou(anchors, boxes.view(-1, 5))
    monkeypatch.setattr(R, "PAIR_CHUNK", 7)
    monkeypatch.setattr(R, "TEST_CHUNK", 50)
    # vectorised sin/atan2 may round a chunk's last elements differently: not bit for bit
    assert torch.allclose(R.rotated_box_iou(anchors, boxes.view(-1, 5)), whole, atol=1e-6, rtol=0)
    assert (whole > 0).sum() > 200
    batched = R.batched_rotated_box_iou(anchors, boxes)
    assert batched.shape == (3, 200, 7)
    for i in range(3):
        assert torch.allclose(batched[i], whole[:, 7 * i:7 * (i + 1)], atol=1e-6, rtol=0)
    half = R.rotated_box_iou(anchors.half(), boxes.view(-1, 5).half())
    assert half.dtype == torch.float32 and torch.allclose(half, whole, atol=0.05)
    assert R.rotated_box_iou(anchors[:0], boxes.view(-1, 5)).shape == (0, 21)


# -- encoding and targets ----------------------------------------------------------------------------------------
def test_encode_decode_roundtrip_and_theta_zero_is_odtk_box():
    g = torch.Generator().manual_seed(4)
    anchors = random_boxes(100, generator=g, dtype=torch.float64)
    boxes = random_boxes(100, generator=g, near=anchors, dtype=torch.float64)
    deltas = R.box2delta_rotated(boxes, anchors)
    assert deltas.shape == (100, 6)
    assert torch.allclose(deltas[:, 4] ** 2 + deltas[:, 5] ** 2, torch.ones(100, dtype=torch.float64))
    decoded = R.delta2box_rotated(deltas, anchors)
    assert torch.allclose(decoded, boxes, atol=1e-9)                    # |theta_box - theta_anchor| < pi
    flat_a, flat_b = anchors.clone(), boxes.clone()
    flat_a[:, 4] = flat_b[:, 4] = 0
    flat = R.box2delta_rotated(flat_b, flat_a)
    assert torch.equal(flat[:, :4], B.box2delta(boxes[:, :4], anchors[:, :4]))
    assert (flat[:, 4] == 0).all() and (flat[:, 5] == 1).all()
    assert torch.equal(R.delta2box_rotated(flat, flat_a)[:, :4], B.delta2box(flat[:, :4], flat_a[:, :4]))
    # broadcasting as odtk.box: deltas [B, A, 6] against anchors [A, 5]
    assert R.delta2box_rotated(deltas.view(4, 25, 6), anchors.view(4, 25, 5)[0]).shape == (4, 25, 5)


def test_fold_keeps_the_rectangle_and_matches_convert():
    from odtk.convert import fold_angle
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(500, generator=g, dtype=torch.float64)
    boxes[:, 4] *= 3                                                    # up to 3 quarter turns either way
    folded = R.fold(boxes)
    assert (folded[:, 4].abs() <= math.pi / 4 + 1e-12).all()
    assert torch.allclose(R.corners(folded).sort(dim=1).values, R.corners(boxes).sort(dim=1).values, atol=1e-9)
    for box, got in zip(boxes[:20].tolist(), folded[:20].tolist()):
        w, h, theta = fold_angle(box[2] - box[0], box[3] - box[1], box[4])
        assert got[2] - got[0] == pytest.approx(w) and got[3] - got[1] == pytest.approx(h) and got[4] == theta
    inside = boxes[boxes[:, 4].abs() < math.pi / 4]
    assert torch.equal(R.fold(inside), inside)


def test_decode_clips_centres_and_log_sizes():
    anchors = torch.tensor([[90.0, 90.0, 110.0, 110.0, 0.5]])
    deltas = torch.tensor([[3.0, 0.0, 20.0, 0.0, 1.0, 0.0]])          # far right, huge width, +pi/2
    box = R.delta2box_rotated(deltas, anchors, size=(100, 120))[0]
    assert R.centres(box).tolist() == pytest.approx([120.0, 100.0])    # centre moved into the image
    assert (box[2] - box[0]).item() == pytest.approx(20 * math.exp(B.BBOX_XFORM_CLIP), rel=1e-5)
    assert (box[3] - box[1]).item() == pytest.approx(20.0)             # size kept, not cut by the border
    assert box[4].item() == pytest.approx(0.5 + math.pi / 2)


@pytest.mark.parametrize("low_quality", [False, True])
def test_assign_targets_at_theta_zero_is_odtk_box(low_quality):
    g = torch.Generator().manual_seed(5)
    anchors = B.grid_anchors(B.generate_anchors(8, [1, 2, 0.5], [2, 3]), 8, 6, 6)
    xy = torch.rand(4, 5, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(4, 5, 2, generator=g) * 20 + 4], 2)
    labels = torch.randint(0, 3, (4, 5), generator=g)
    labels[1, 3:] = -1
    boxes[1, 3:] = 0                                                    # padding as collate writes it
    cls, reg = B.assign_targets(anchors, boxes, labels, low_quality=low_quality)
    zero = torch.zeros(*boxes.shape[:2], 1)
    rcls, rreg = R.assign_targets_rotated(torch.cat([anchors, torch.zeros(len(anchors), 1)], 1),
                                          torch.cat([boxes, zero], 2), labels, low_quality=low_quality)
    assert torch.equal(rcls, cls) and (cls >= 0).any() and (cls == -2).any()
    assert rreg.shape == (4, len(anchors), 6)
    assert torch.allclose(rreg[..., :4], reg, atol=1e-6)
    assert (rreg[..., 4] == 0).all() and (rreg[..., 5] == 1).all()
    empty, deltas = R.assign_targets_rotated(anchors[:3, :4].new_zeros(3, 5), torch.zeros(2, 0, 5),
                                             torch.zeros(2, 0, dtype=torch.long))
    assert empty.tolist() == [[-1] * 3] * 2 and deltas.shape == (2, 3, 6)


def test_assign_targets_uses_the_rotated_overlap():
    """A box turned like an anchor matches it (IoU 1); the unturned anchor at the same place only overlaps it."""
    anchors = torch.tensor([[0, 0, 40, 10, 0.0], [0, 0, 40, 10, math.pi / 6], [100, 100, 110, 110, 0]])
    boxes = torch.tensor([[[0, 0, 40, 10, math.pi / 6]]])
    assert R.rotated_box_iou(anchors[:1], boxes[0]).item() < 0.4
    cls, deltas = R.assign_targets_rotated(anchors, boxes, torch.tensor([[3]]), low_quality=False)
    assert cls.tolist() == [[-1, 3, -1]]
    assert torch.allclose(deltas[0, 1], torch.tensor([0, 0, 0, 0, 0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matching_iou_matches_like_the_exact_matrix(low_quality):
    """The bounded IoU (exact only where matching reads it) gives the exact matrix's class targets and, to every
    anchor that is not background, its box; its other values are upper bounds below the background IoU."""
    g = torch.Generator().manual_seed(9)
    anchors = R.grid_anchors_rotated(R.generate_anchors_rotated(8, [0.3, 1.0, 3.3], [2.0, 3.0]), 8, 12, 12)
    boxes = random_boxes(4 * 6, generator=g, spread=90).view(4, 6, 5)
    boxes[..., :2] += 3                                                 # some tiny, some large, turned any way
    labels = torch.randint(0, 3, (4, 6), generator=g)
    labels[2, 4:] = -1
    boxes[2, 4:] = 0
    exact = R.batched_rotated_box_iou(anchors, boxes)
    bounded = R.matching_iou(anchors, boxes.reshape(-1, 5), 0.4).view(len(anchors), 4, 6).transpose(0, 1)
    assert (bounded >= exact - 1e-6).all()
    computed = (bounded - exact).abs() < 1e-6
    assert computed[exact > 0].float().mean() < 0.5                     # most overlapping pairs were only bounded
    assert (bounded[~computed] < 0.4).all()
    want = B.match_anchors(exact, labels, fg_iou=0.5, bg_iou=0.4, low_quality=low_quality)
    got = B.match_anchors(bounded, labels, fg_iou=0.5, bg_iou=0.4, low_quality=low_quality)
    assert torch.equal(got[0], want[0]) and (want[0] >= 0).sum() > 20 and (want[0] == -2).any()
    assigned = want[0] != -1
    assert torch.equal(got[1][assigned], want[1][assigned])
    cls, deltas = R.assign_targets_rotated(anchors, boxes, labels, low_quality=low_quality)
    assert torch.equal(cls, want[0])


def test_iou_bound_is_an_upper_bound_exact_for_boxes_turned_alike():
    g = torch.Generator().manual_seed(10)
    a = random_boxes(4000, generator=g)
    b = random_boxes(4000, generator=g, near=a)
    bound, iou = R.iou_bound(a, b), R.pair_iou(a, b)
    assert (bound >= iou - 1e-6).all() and (bound > iou + 0.05).any()
    alike = torch.cat([b[:, :4], a[:, 4:]], 1)
    assert torch.allclose(R.iou_bound(a, alike), R.pair_iou(a, alike), atol=1e-5)


def test_targets_turn_each_box_at_most_an_eighth_turn_from_its_anchor():
    """A tall anchor at 30 degrees is a wide one at -60: matched to a wide box at -40 degrees, its target is the
    box's tall form 20 degrees from it (sides as the anchor's), not a 70 degree turn with the sides swapped."""
    anchors = torch.tensor([[15.0, 0, 25, 40, math.radians(30)], [0, 15, 40, 25, 0]])
    boxes = torch.tensor([[[0.0, 15, 40, 25, math.radians(-40)]]])
    cls, deltas = R.assign_targets_rotated(anchors, boxes, torch.tensor([[1]]), low_quality=True)
    assert cls[0, 0] == 1
    turn = math.degrees(math.atan2(deltas[0, 0, 4], deltas[0, 0, 5]))
    assert turn == pytest.approx(20, abs=1e-4) and deltas[0, 0, :4].abs().max() < 1e-5
    decoded = R.delta2box_rotated(deltas[0, 0], anchors[0])
    assert torch.allclose(R.fold(decoded), boxes[0, 0], atol=1e-4)     # the same rectangle
    g = torch.Generator().manual_seed(12)
    many = random_boxes(200, generator=g)
    near = random_boxes(200, generator=g, near=many)
    assert torch.equal(R.turned_like(many, many), many)
    turned = R.turned_like(near, many)
    assert ((turned[:, 4] - many[:, 4]).abs() <= math.pi / 4 + 1e-6).all()
    assert torch.allclose(R.pair_iou(turned, near), torch.ones(200), atol=1e-4)


# -- decode and NMS ----------------------------------------------------------------------------------------------
def test_decode_rotated_is_odtk_box_decode_plus_angles():
    g = torch.Generator().manual_seed(6)
    cell = R.generate_anchors_rotated(8, [1.0, 2.0], [2.0])            # 6 anchors
    anchors = [R.grid_anchors_rotated(cell, 8, 4, 5)]
    cls = torch.randn(2, 6 * 3, 4, 5, generator=g)
    box = torch.randn(2, 6 * 6, 4, 5, generator=g) * 0.2
    b, s, boxes, c = R.decode_rotated([cls], [box], anchors, threshold=0.3, top_n=20, image_size=(32, 40))
    axis = box.view(2, 6, 6, 4, 5)[:, :, :4].reshape(2, 24, 4, 5)      # each anchor's 4 axis-aligned deltas
    b4, s4, boxes4, c4 = B.decode([cls], [axis], [anchors[0][:, :4]], threshold=0.3, top_n=20)
    assert torch.equal(b, b4) and torch.equal(s, s4) and torch.equal(c, c4) and len(b) > 10
    unclipped = R.decode_rotated([cls], [box], anchors, threshold=0.3, top_n=20)[2]
    assert torch.allclose(unclipped[:, :4], boxes4)
    assert torch.equal(boxes[:, 4], unclipped[:, 4])
    centre = R.centres(boxes)
    assert (centre >= 0).all() and (centre[:, 0] <= 40).all() and (centre[:, 1] <= 32).all()
    # the angle: atan2(sin, cos) of the deltas plus the anchor's
    flat = R.decode_rotated([torch.full((1, 6, 1, 1), -9.0).index_fill(1, torch.tensor([3]), 9.0)],
                            [torch.zeros(1, 36, 1, 1).index_fill(1, torch.tensor([3 * 6 + 4, 3 * 6 + 5]), 1.0)],
                            [R.grid_anchors_rotated(cell, 8, 1, 1)])
    assert flat[2].shape == (1, 5) and flat[2][0, 4].item() == pytest.approx(cell[3, 4].item() + math.pi / 4)


def reference_nms(batch_idx, scores, boxes, classes, batch_size, iou_threshold, detections):
    """Greedy NMS by plain Python loops: per image, visit by (score descending, input index), keep a box unless a
    kept box of its class overlaps it by more than the threshold."""
    out = []
    for image in range(batch_size):
        order = sorted((i for i in range(len(scores)) if batch_idx[i] == image), key=lambda i: (-scores[i], i))
        kept = []
        for i in order:
            if all(classes[k] != classes[i] or R.pair_iou(boxes[k:k + 1], boxes[i:i + 1]).item() <= iou_threshold
                   for k in kept):
                kept.append(i)
        out.append(kept[:detections])
    return out


def test_nms_rotated_matches_a_slow_loop():
    g = torch.Generator().manual_seed(7)
    n = 300
    centres = torch.rand(12, 2, generator=g) * 150                      # clusters of overlapping boxes
    ctr = centres[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    wh = torch.rand(n, 2, generator=g) * 30 + 10
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2, (torch.rand(n, 1, generator=g) - 0.5) * 1.5], 1)
    scores = (torch.rand(n, generator=g) * 20).floor() / 20 + 0.05     # many ties
    classes = torch.randint(0, 3, (n,), generator=g)
    batch = torch.randint(0, 2, (n,), generator=g)
    s, bx, c = R.nms_rotated(batch, scores, boxes, classes, 2, iou_threshold=0.3, detections=40)
    expected = reference_nms(batch, scores, boxes, classes, 2, 0.3, 40)
    for i, keep in enumerate(expected):
        k = len(keep)
        assert 10 < k < (batch == i).sum()
        assert torch.equal(s[i, :k], scores[keep]) and torch.equal(bx[i, :k], boxes[keep])
        assert torch.equal(c[i, :k], classes[keep]) and (s[i, k:] == 0).all() and (bx[i, k:] == 0).all()


def test_nms_rotated_at_theta_zero_is_odtk_box_nms():
    g = torch.Generator().manual_seed(8)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 2], 1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, 4, (n,), generator=g)
    batch = torch.randint(0, 2, (n,), generator=g)
    expected = B.nms(batch, scores, boxes, classes, 2, iou_threshold=0.5, detections=50)
    got = R.nms_rotated(batch, scores, torch.cat([boxes, torch.zeros(n, 1)], 1), classes, 2, iou_threshold=0.5,
                        detections=50)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert torch.equal(got[1][..., :4], expected[1]) and (got[1][..., 4] == 0).all()
    empty = R.nms_rotated(batch[:0], scores[:0], torch.zeros(0, 5), classes[:0], 2, detections=5)
    assert empty[0].shape == (2, 5) and empty[1].shape == (2, 5, 5) and (empty[0] == 0).all()
