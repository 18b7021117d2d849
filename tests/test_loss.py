"""Loss values on hand-made cases."""
import math

import torch

from odtk.loss import box_loss, focal_loss, retinanet_loss


def _focal(p, y, alpha=0.25, gamma=2.0):
    pt = p if y else 1 - p
    a = alpha if y else 1 - alpha
    return -a * (1 - pt) ** gamma * math.log(pt)


def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0], [3.0, 3.0]])
    target = torch.tensor([1, -1, -2])              # fg class 1, background, ignored
    p = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
    expected = _focal(p[0][0], 0) + _focal(p[0][1], 1) + _focal(p[1][0], 0) + _focal(p[1][1], 0)
    assert math.isclose(focal_loss(logits, target).item(), expected, rel_tol=1e-5)


def test_smooth_l1_by_hand():
    deltas = torch.tensor([[0.05, -0.3, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    target = torch.zeros(2, 4)
    beta = 0.11
    # |x| < beta: 0.5 x^2 / beta ; else |x| - beta / 2 ; only the foreground row counts
    expected = 0.5 * 0.05 ** 2 / beta + (0.3 - beta / 2) + 0 + (1.0 - beta / 2)
    got = box_loss(deltas, target, torch.tensor([0, -1]), beta=beta)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_normalised_by_foreground_count():
    cls_out = torch.zeros(1, 4, 3)
    box_out = torch.ones(1, 4, 4)
    cls_target = torch.tensor([[0, 2, -1, -2]])
    box_target = torch.zeros(1, 4, 4)
    losses = retinanet_loss(cls_out, box_out, cls_target, box_target)
    p = 0.5
    fg_terms = 2 * _focal(p, 1) + 4 * _focal(p, 0)    # two fg anchors: 1 positive + 2 negatives each
    bg_terms = 3 * _focal(p, 0)
    assert math.isclose(losses["cls"].item(), (fg_terms + bg_terms) / 2, rel_tol=1e-5)
    assert math.isclose(losses["box"].item(), 2 * 4 * (1 - 0.11 / 2) / 2, rel_tol=1e-5)


def test_no_foreground_does_not_divide_by_zero():
    losses = retinanet_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 4), torch.tensor([[-1, -1]]),
                            torch.zeros(1, 2, 4))
    assert torch.isfinite(losses["cls"]) and losses["box"].item() == 0
