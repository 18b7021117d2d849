"""RetinaNet (arXiv 1708.02002) as ODTK builds it: FPN backbone(s), shared class and box heads."""
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import box as box_ops
from .backbones import build_backbone
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .loss import retinanet_loss
from .utils import OdtkError, atomic_save, log

Heads = Tuple[List[Tensor], List[Tensor]]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""
    backbones: List[str] = field(default_factory=lambda: ["ResNet50FPN"])
    num_classes: int = 80
    ratios: List[float] = field(default_factory=lambda: [1.0, 2.0, 0.5])
    scales: List[float] = field(default_factory=lambda: [4 * 2 ** (i / 3) for i in range(3)])
    anchor_ious: List[float] = field(default_factory=lambda: [0.4, 0.5])   # background, foreground
    pretrained: bool = False          # frozen BatchNorm + frozen stem when started from ImageNet
    category_ids: Optional[List[int]] = None   # dataset category id of each class index
    class_names: Optional[List[str]] = None
    threshold: float = 0.05
    top_n: int = 1000
    nms: float = 0.5
    detections: int = 100
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    size_divisible: int = 32

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)


def _head(out_channels: int, *, channels: int = 256, depth: int = 4) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class Model(nn.Module):
    def __init__(self, *, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbones = nn.ModuleDict({name: build_backbone(name, pretrained=config.pretrained)
                                        for name in config.backbones})
        self.strides = [s for b in self.backbones.values() for s in b.strides]
        self.cls_head = _head(config.num_anchors * config.num_classes)
        self.box_head = _head(config.num_anchors * 4)
        # prior probability 0.01 for every class: the focal loss starts near its equilibrium
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        self._cell_anchors = [box_ops.generate_anchors(s, config.ratios, config.scales) for s in self.strides]
        self._anchor_cache: Dict[tuple, List[Tensor]] = {}

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Heads:
        """Raw head outputs per level: class logits [B, A*C, H, W] and box deltas [B, A*4, H, W]."""
        features = [f for b in self.backbones.values() for f in b(x)]
        return [self.cls_head(f) for f in features], [self.box_head(f) for f in features]

    def anchors(self, heads: List[Tensor]) -> List[Tensor]:
        sizes = tuple(tuple(h.shape[-2:]) for h in heads)
        key = (sizes, heads[0].device)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                box_ops.grid_anchors(cell.to(heads[0].device), stride, h, w)
                for cell, stride, (h, w) in zip(self._cell_anchors, self.strides, sizes)]
        return self._anchor_cache[key]

    # -- training ------------------------------------------------------------------------------
    def flatten(self, cls_heads: List[Tensor], box_heads: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Heads -> [B, total anchors, C] and [B, total anchors, 4] in anchor order (y, x, a)."""
        a = self.config.num_anchors
        return (torch.cat([box_ops.anchor_major(h, a) for h in cls_heads], 1),
                torch.cat([box_ops.anchor_major(h, a) for h in box_heads], 1))

    def loss(self, heads: Heads, boxes: Tensor, labels: Tensor, *, low_quality: bool = True,
             distributed: bool = False) -> Dict[str, Tensor]:
        """Focal + smooth-L1 losses for padded targets boxes [B, M, 4], labels [B, M] (-1 = padding).
        `distributed`: normalise by the foreground count of all ranks (see loss.foreground_count)."""
        cls_heads, box_heads = heads
        anchors = torch.cat(self.anchors(cls_heads))
        with torch.no_grad():
            bg, fg = self.config.anchor_ious
            cls_target, box_target = box_ops.assign_targets(anchors, boxes, labels, fg_iou=fg, bg_iou=bg,
                                                            low_quality=low_quality)
        cls_out, box_out = self.flatten(cls_heads, box_heads)
        return retinanet_loss(cls_out, box_out, cls_target, box_target, distributed=distributed)

    # -- inference -----------------------------------------------------------------------------
    def detect(self, heads: Heads, image_size: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Decode + class-aware NMS -> scores [B, D], boxes [B, D, 4] (input pixels), classes [B, D]."""
        cls_heads, box_heads = heads
        cfg = self.config
        found = box_ops.decode(cls_heads, box_heads, self.anchors(cls_heads), threshold=cfg.threshold,
                               top_n=cfg.top_n, image_size=image_size)
        return box_ops.nms(*found, cls_heads[0].shape[0], iou_threshold=cfg.nms, detections=cfg.detections)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.detect(self(x), tuple(x.shape[-2:]))

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str, **state) -> None:
        atomic_save({"config": asdict(self.config), "state_dict": self.state_dict(), **state}, path)

    @classmethod
    def load(cls, path: str, *, ema: bool = True) -> Tuple["Model", dict]:
        """Model and the rest of the checkpoint (training state). With `ema` the model gets the checkpoint's EMA
        weights when it has them (inference, export); training resumes from the raw weights (ema=False)."""
        if not os.path.isfile(path):
            raise OdtkError(f"{path}: model file not found")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise OdtkError(f"{path}: not a readable odtk checkpoint ({e.__class__.__name__})") from None
        if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
            raise OdtkError(f"{path}: not an odtk checkpoint (no model config / state_dict)")
        model = cls(config=ModelConfig(**ckpt.pop("config")))
        weights = ckpt.pop("state_dict")
        if ema and ckpt.get("ema"):
            weights = ckpt["ema"]["state_dict"]
            log.info(f"{path}: using the EMA weights (decay {ckpt['ema']['decay']})")
        model.load_state_dict(weights)
        return model, ckpt
