"""Box ops and anchors against torchvision, and target assignment on hand-made cases."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, box_iou

from odtk import box as B


def test_anchors_match_torchvision():
    ratios, scales = [1.0, 2.0, 0.5], [4 * 2 ** (i / 3) for i in range(3)]
    stride = 16
    ours = B.grid_anchors(B.generate_anchors(stride, ratios, scales), stride, 3, 5)
    # torchvision: sizes in pixels, aspect = h / w, centred on the cell's corner; order (y, x, ratio, size)
    gen = AnchorGenerator(sizes=(tuple(stride * s for s in scales),), aspect_ratios=(tuple(ratios),))
    base = gen.generate_anchors(gen.sizes[0], gen.aspect_ratios[0])          # [ratio-major, 4], rounded
    shifts = torch.stack(torch.meshgrid(torch.arange(3) * stride, torch.arange(5) * stride, indexing="ij"), -1)
    shifts = shifts.reshape(-1, 2).flip(1).repeat(1, 2).float()
    # reorder torchvision's ratio-major base to our scale-major order
    base = base.view(len(ratios), len(scales), 4).transpose(0, 1).reshape(-1, 4)
    tv = (shifts[:, None] + base[None]).reshape(-1, 4) + stride / 2
    assert ours.shape == (3 * 5 * 9, 4)
    assert torch.allclose(ours, tv, atol=0.5)          # torchvision rounds its base anchors
    w, h = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    assert torch.allclose((h / w)[:3], torch.tensor(ratios), rtol=1e-5)
    assert torch.allclose((w * h).sqrt()[::3][:3], torch.tensor(scales) * stride, rtol=1e-5)


def test_batched_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 50 + 1], 1)
    xy = torch.rand(3, 7, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(3, 7, 2, generator=g) * 50 + 1], 2)
    iou = B.batched_box_iou(anchors, boxes)
    for i in range(3):
        assert torch.allclose(iou[i], box_iou(anchors, boxes[i]), atol=1e-6)


def test_deltas_match_torchvision_and_roundtrip():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 40 + 4], 1)
    xy = torch.rand(20, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 40 + 4], 1)
    deltas = B.box2delta(boxes, anchors)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    assert torch.allclose(deltas, coder.encode_single(boxes, anchors), atol=1e-5)
    assert torch.allclose(B.delta2box(deltas, anchors), boxes, atol=1e-4)
    assert torch.allclose(B.delta2box(deltas, anchors), coder.decode_single(deltas, anchors), atol=1e-4)


def test_delta2box_clips_to_image():
    anchors = torch.tensor([[90.0, 90.0, 110.0, 110.0]])
    boxes = B.delta2box(torch.tensor([[0.0, 0.0, 3.0, 3.0]]), anchors, size=(100, 120))
    assert boxes.min() >= 0 and boxes[0, 2] <= 120 and boxes[0, 3] <= 100


def test_assign_targets_by_hand():
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 4.5], [50, 50, 60, 60],
                            [100, 100, 110, 110]], dtype=torch.float32)
    # IoU of box 0 with anchors: 1.0, 0.8, 0.45, 0, 0 ; box 1 overlaps anchor 3 by 0.14 only
    boxes = torch.tensor([[[0, 0, 10, 10], [55, 55, 65, 65], [0, 0, 0, 0]]], dtype=torch.float32)
    labels = torch.tensor([[2, 1, -1]])
    cls, reg = B.assign_targets(anchors, boxes, labels, low_quality=False)
    assert cls.tolist() == [[2, 2, -2, -1, -1]]            # fg, fg, ignored (0.4<=iou<0.5), bg, bg
    assert torch.allclose(reg[0, 0], torch.zeros(4))
    cls, _ = B.assign_targets(anchors, boxes, labels, low_quality=True)
    assert cls.tolist() == [[2, 2, -2, 1, -1]]             # box 1 claims its best anchor despite IoU 0.14


def test_assign_targets_batch_equals_per_image():
    g = torch.Generator().manual_seed(2)
    anchors = B.grid_anchors(B.generate_anchors(8, [1, 2, 0.5], [2, 3]), 8, 6, 6)
    xy = torch.rand(4, 5, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(4, 5, 2, generator=g) * 20 + 4], 2)
    labels = torch.randint(0, 3, (4, 5), generator=g)
    labels[1, 3:] = -1
    cls, reg = B.assign_targets(anchors, boxes, labels)
    for i in range(4):
        n = int((labels[i] >= 0).sum())
        c, r = B.assign_targets(anchors, boxes[i:i + 1, :n], labels[i:i + 1, :n])
        assert torch.equal(c[0], cls[i])
        fg = c[0] >= 0
        assert torch.allclose(r[0][fg], reg[i][fg])


def test_assign_targets_no_boxes_is_background():
    anchors = torch.tensor([[0, 0, 10, 10.0]])
    cls, _ = B.assign_targets(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert cls.tolist() == [[-1], [-1]]


def test_decode_and_nms_by_hand():
    # one level 2x2, 1 anchor, 2 classes, 2 images. Image 0: class 1 at cells 0 and 1 (anchors of IoU 2/3: the
    # weaker goes), class 0 at cell 1 (another class: kept), class 1 at cell 2 (IoU 1/9 with cell 0: kept).
    # Image 1: one box, class 0 at cell 3. Everything else is below the threshold.
    anchors = [torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [0, 8, 10, 18], [20, 20, 30, 30.0]])]
    cls = torch.full((2, 2, 2, 2), -10.0)                 # [B, A*C, H, W]; cell = y * 2 + x
    cls[0, 1, 0, 0], cls[0, 1, 0, 1], cls[0, 0, 0, 1], cls[0, 1, 1, 0] = 3.0, 2.0, 1.0, 0.5
    cls[1, 0, 1, 1] = 4.0
    box = torch.zeros(2, 4, 2, 2)
    b, s, boxes, c = B.decode([cls], [box], anchors, threshold=0.05, top_n=10)
    assert b.tolist() == [0, 0, 0, 0, 1] and c.tolist() == [1, 1, 0, 1, 0]
    assert torch.allclose(s, torch.tensor([3.0, 2.0, 1.0, 0.5, 4.0]).sigmoid())
    assert torch.equal(boxes, anchors[0][[0, 1, 1, 2, 3]])  # zero deltas: the anchors themselves

    scores, kept, classes = B.nms(b, s, boxes, c, 2, iou_threshold=0.5, detections=3)
    sig = torch.tensor([3.0, 1.0, 0.5, 4.0]).sigmoid()
    assert torch.equal(scores, torch.tensor([[sig[0], sig[1], sig[2]], [sig[3], 0, 0]]))   # zero padded
    assert torch.equal(kept[0], anchors[0][[0, 1, 2]]) and torch.equal(kept[1, 0], anchors[0][3])
    assert classes.tolist() == [[1, 0, 1], [0, 0, 0]] and (kept[1, 1:] == 0).all()
    for i in range(2):                                    # torchvision's class-aware NMS keeps the same boxes
        m = b == i
        keep = batched_nms(boxes[m], s[m], c[m], 0.5)
        n = keep.numel()
        assert n == [3, 1][i] and torch.equal(scores[i, :n], s[m][keep]) and torch.equal(classes[i, :n], c[m][keep])


def test_nms_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 2], 1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, 4, (n,), generator=g)
    batch = torch.randint(0, 2, (n,), generator=g)
    s, bx, c = B.nms(batch, scores, boxes, classes, 2, iou_threshold=0.5, detections=50)
    for i in range(2):
        m = batch == i
        keep = batched_nms(boxes[m], scores[m], classes[m], 0.5)[:50]
        k = keep.numel()
        assert torch.allclose(s[i, :k], scores[m][keep])
        assert torch.allclose(bx[i, :k], boxes[m][keep])
        assert torch.equal(c[i, :k], classes[m][keep])
        assert (s[i, k:] == 0).all()


def _reference_order(row, k):
    """The k best of a row in odtk's order, by plain Python: score descending, then index ascending."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


@pytest.mark.parametrize("k", [1, 3, 5, 8, 12])
def test_top_k_breaks_ties_by_lower_index(k):
    # row 0: ties straddle every cut; row 1: no ties; row 2: all equal
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.2, 0.9, 0.5, 0.5, 0.1, 0.9, 0.5, 0.2, 0.5],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.05, 0.15, 0.25],
                           [0.3] * 12])
    values, index = B.top_k(scores, k)
    for row, v, i in zip(scores.tolist(), values, index):
        expected = _reference_order(row, k)
        assert i.tolist() == expected
        assert v.tolist() == [row[j] for j in expected]


def test_top_k_random_fp16_ties_match_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(3, 5000, generator=g) * 0.5).sigmoid().half().float()   # fp16: thousands of ties
    assert scores[0].unique().numel() < 2000
    values, index = B.top_k(scores, 1000)
    ref_values, ref_index = scores.sort(dim=1, descending=True, stable=True)
    assert torch.equal(index, ref_index[:, :1000]) and torch.equal(values, ref_values[:, :1000])


def test_decode_and_nms_order_ties_by_anchor_index():
    """Equal scores everywhere: decode keeps the lowest flat (y, x, a, c) indices, and NMS keeps the first of two
    equal-score boxes of one class that overlap (odtk._C's kernels do the same; torchvision alone would not say)."""
    anchors = [B.grid_anchors(B.generate_anchors(8, [1.0], [1.0, 1.5]), 8, 2, 3)]    # 2 anchors per cell
    cls = torch.zeros(1, 2 * 2, 2, 3)                   # every logit 0: every score 0.5
    box = torch.zeros(1, 2 * 4, 2, 3)
    b, s, boxes, c = B.decode([cls], [box], anchors, threshold=0.05, top_n=5)
    flat = [0, 1, 2, 3, 4]                              # (y, x, a, c) with 2 classes: anchor = flat // 2
    assert c.tolist() == [f % 2 for f in flat] and torch.equal(boxes, anchors[0][[f // 2 for f in flat]])
    assert (s == 0.5).all()
    scores, kept, classes = B.nms(b, s, boxes, c, 1, iou_threshold=0.3, detections=10)
    # anchor 0 (8x8) and anchor 1 (12x12, same centre) overlap with IoU 4/9 > 0.3: the second of each class goes
    n = int((scores > 0).sum())
    assert n == 3 and classes[0, :n].tolist() == [0, 1, 0]
    assert torch.equal(kept[0, :n], anchors[0][[0, 0, 2]])


def test_top_k_below_the_floor_order_is_free_above_it_exact():
    """Ties at or below `floor` (decode's threshold drops them) need no exact cut; above it the order is exact."""
    scores = torch.tensor([[0.01] * 6 + [0.7, 0.3, 0.7, 0.01]])
    values, index = B.top_k(scores, 4, floor=0.05)
    assert index[0, :3].tolist() == [6, 8, 7] and values[0, 3] == pytest.approx(0.01)
    values, index = B.top_k(scores, 2, floor=0.05)
    assert index.tolist() == [[6, 8]]
