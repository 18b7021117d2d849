"""RetinaNet losses: sigmoid focal loss and smooth-L1, normalised by the foreground count."""
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def _widened(t: Tensor) -> Tensor:
    """fp16/bf16 heads are summed in float32; float32 and float64 (the consistency reference) stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def focal_loss(logits: Tensor, cls_target: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss over non-ignored anchors. logits [N, C]; cls_target [N] (>=0 fg, -1 bg, -2 ignore)."""
    keep = cls_target >= -1
    logits = logits[keep]
    target = cls_target[keep]
    onehot = torch.zeros_like(logits)
    fg = target >= 0
    onehot[fg.nonzero(as_tuple=True)[0], target[fg]] = 1.0
    logits = _widened(logits)
    return sigmoid_focal_loss(logits, onehot.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="sum")


def box_loss(deltas: Tensor, box_target: Tensor, cls_target: Tensor, *, beta: float = 0.11) -> Tensor:
    """Summed smooth-L1 over foreground anchors."""
    fg = cls_target >= 0
    deltas = _widened(deltas[fg])
    return F.smooth_l1_loss(deltas, box_target[fg].to(deltas.dtype), beta=beta, reduction="sum")


def foreground_count(cls_target: Tensor, *, distributed: bool = False) -> Tensor:
    """Foreground anchors, at least 1. Distributed: the mean over ranks, so that DDP's averaged gradients equal
    one process's over the whole batch (sum of all losses / all foreground anchors)."""
    count = (cls_target >= 0).sum().float()
    if distributed:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1)


def retinanet_loss(cls_out: Tensor, box_out: Tensor, cls_target: Tensor, box_target: Tensor, *,
                   alpha: float = 0.25, gamma: float = 2.0, beta: float = 0.11,
                   distributed: bool = False) -> Dict[str, Tensor]:
    """cls_out [B, A, C], box_out [B, A, K], targets from box.assign_targets (K = 4) or
    rotated.assign_targets_rotated (K = 6: the angle's sin and cos regressed like the other deltas, as ODTK does).
    Losses are per foreground anchor."""
    num_classes, channels = cls_out.shape[-1], box_out.shape[-1]
    cls_target = cls_target.reshape(-1)
    num_fg = foreground_count(cls_target, distributed=distributed)
    cls = focal_loss(cls_out.reshape(-1, num_classes), cls_target, alpha=alpha, gamma=gamma)
    box = box_loss(box_out.reshape(-1, channels), box_target.reshape(-1, channels), cls_target, beta=beta)
    return {"cls": cls / num_fg, "box": box / num_fg}
