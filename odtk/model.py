"""RetinaNet (arXiv 1708.02002) as ODTK builds it: FPN backbone(s), shared class and box heads."""
import math
import os
import pickle
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import box as box_ops
from . import extension
from . import rotated as rotated_ops
from .backbones import build_backbone
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .loss import retinanet_loss
from .utils import OdtkError, atomic_save, log

Heads = Tuple[List[Tensor], List[Tensor]]

# checkpoint layout version, stored under CHECKPOINT_KEY: raise it when a change would make an older odtk misread one
CHECKPOINT_KEY = "odtk_checkpoint"
CHECKPOINT_VERSION = 1

ANCHOR_CACHE_SIZE = 32   # anchor grids kept per model (one per padded input size and device; --jitter makes dozens)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""
    backbones: List[str] = field(default_factory=lambda: ["ResNet50FPN"])
    num_classes: int = 80
    ratios: List[float] = field(default_factory=lambda: [1.0, 2.0, 0.5])
    scales: List[float] = field(default_factory=lambda: [4 * 2 ** (i / 3) for i in range(3)])
    anchor_ious: List[float] = field(default_factory=lambda: [0.4, 0.5])   # background, foreground
    channels: int = 256               # FPN and head width (ODTK's); the heads are most of a MobileNet's compute
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
    rotated: bool = False             # rotated boxes (x1, y1, x2, y2, theta): anchors at `angles`, 6 box deltas
    angles: List[float] = field(default_factory=lambda: list(rotated_ops.DEFAULT_ANGLES))   # rotated models only

    @property
    def num_anchors(self) -> int:
        """Anchors per cell: ratios x scales, times the angles for a rotated model."""
        return len(self.ratios) * len(self.scales) * (len(self.angles) if self.rotated else 1)

    @property
    def box_channels(self) -> int:
        """Box deltas per anchor: (dx, dy, dw, dh), and (sin, cos) of the turn for a rotated model."""
        return 6 if self.rotated else 4


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
        self.backbones = nn.ModuleDict({name: build_backbone(name, pretrained=config.pretrained,
                                                             channels=config.channels)
                                        for name in config.backbones})
        self.strides = [s for b in self.backbones.values() for s in b.strides]
        self.cls_head = _head(config.num_anchors * config.num_classes, channels=config.channels)
        self.box_head = _head(config.num_anchors * config.box_channels, channels=config.channels)
        # prior probability 0.01 for every class: the focal loss starts near its equilibrium
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        if config.rotated:   # (sin, cos) = (0, 1): boxes start at their anchor's angle, not at a cos error of 1
            nn.init.constant_(self.box_head[-1].bias.view(-1, 6)[:, 5], 1.0)
        if config.rotated and not config.angles:
            raise OdtkError("a rotated model needs at least one anchor angle (ModelConfig.angles)")
        self._cell_anchors = [rotated_ops.generate_anchors_rotated(s, config.ratios, config.scales, config.angles)
                              if config.rotated else box_ops.generate_anchors(s, config.ratios, config.scales)
                              for s in self.strides]
        self._anchor_cache: "OrderedDict[tuple, List[Tensor]]" = OrderedDict()   # least recently used first

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Heads:
        """Raw head outputs per level: class logits [B, A*C, H, W] and box deltas [B, A*4, H, W] (A*6 rotated)."""
        features = [f for b in self.backbones.values() for f in b(x)]
        return [self.cls_head(f) for f in features], [self.box_head(f) for f in features]

    # -- anchors -------------------------------------------------------------------------------
    @property
    def cell_anchors(self) -> List[Tensor]:
        """Per level, the anchors of one cell [A, 4] (x1, y1, x2, y2 about the cell's origin), A = ratios x scales in
        the order of the heads' channels; a rotated model's [A, 5], theta last, A = angles x scales x ratios."""
        return list(self._cell_anchors)

    def anchors(self, heads: List[Tensor]) -> List[Tensor]:
        """Per level, every anchor [H*W*A, 4] ([H*W*A, 5] rotated; input pixels, anchor order y, x, a) of heads of
        these sizes."""
        return self._grid_anchors(tuple(tuple(h.shape[-2:]) for h in heads), heads[0].device)

    def anchors_for(self, image_size: Tuple[int, int], device: Optional[torch.device] = None) -> List[Tensor]:
        """`anchors` for a padded input of `image_size` (height, width) without running the network: every level
        of stride s is ceil(side / s) cells (each stride-2 step rounds up)."""
        h, w = image_size
        sizes = tuple((math.ceil(h / s), math.ceil(w / s)) for s in self.strides)
        return self._grid_anchors(sizes, torch.device(device or "cpu"))

    def _grid_anchors(self, sizes: Tuple[Tuple[int, int], ...], device: torch.device) -> List[Tensor]:
        key = (sizes, device)
        grids = self._anchor_cache.get(key)
        if grids is None:
            grid = rotated_ops.grid_anchors_rotated if self.config.rotated else box_ops.grid_anchors
            grids = [grid(cell.to(device), stride, h, w)
                     for cell, stride, (h, w) in zip(self._cell_anchors, self.strides, sizes)]
            self._anchor_cache[key] = grids
            if len(self._anchor_cache) > ANCHOR_CACHE_SIZE:
                self._anchor_cache.popitem(last=False)
        else:
            self._anchor_cache.move_to_end(key)
        return grids

    # -- training ------------------------------------------------------------------------------
    def flatten(self, cls_heads: List[Tensor], box_heads: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Heads -> [B, total anchors, C] and [B, total anchors, 4 (6 rotated)] in anchor order (y, x, a)."""
        a = self.config.num_anchors
        return (torch.cat([box_ops.anchor_major(h, a) for h in cls_heads], 1),
                torch.cat([box_ops.anchor_major(h, a) for h in box_heads], 1))

    def loss(self, heads: Heads, boxes: Tensor, labels: Tensor, *, low_quality: bool = True,
             distributed: bool = False) -> Dict[str, Tensor]:
        """Focal + smooth-L1 losses for padded targets boxes [B, M, 4] (a rotated model's [B, M, 5]), labels [B, M]
        (-1 = padding). `distributed`: normalise by the foreground count of all ranks (see loss.foreground_count)."""
        cls_heads, box_heads = heads
        anchors = torch.cat(self.anchors(cls_heads))
        if boxes.shape[-1] != anchors.shape[-1]:
            raise OdtkError(f"{'rotated' if self.config.rotated else 'axis-aligned'} model given boxes of "
                            f"{boxes.shape[-1]} values (it takes {anchors.shape[-1]}): load the dataset with "
                            f"rotated={self.config.rotated}")
        assign = rotated_ops.assign_targets_rotated if self.config.rotated else box_ops.assign_targets
        with torch.no_grad():
            bg, fg = self.config.anchor_ious
            cls_target, box_target = assign(anchors, boxes, labels, fg_iou=fg, bg_iou=bg, low_quality=low_quality)
        cls_out, box_out = self.flatten(cls_heads, box_heads)
        return retinanet_loss(cls_out, box_out, cls_target, box_target, distributed=distributed)

    # -- inference -----------------------------------------------------------------------------
    def detect(self, heads: Heads, image_size: Optional[Tuple[int, int]] = None, *, threshold: Optional[float] = None,
               nms: Optional[float] = None, detections: Optional[int] = None, kernels: Optional[bool] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
        """Decode + class-aware NMS -> scores [B, D], boxes [B, D, 4] (a rotated model's [B, D, 5]; input pixels),
        classes [B, D].
        `threshold`, `nms` and `detections` override the config's for this call. `kernels`: odtk._C's CUDA decode
        and NMS (same results as odtk.box, a few times faster); None uses them when built and the heads are on a GPU,
        False keeps odtk.box's PyTorch ops."""
        cls_heads, box_heads = heads
        if kernels is None:
            kernels = cls_heads[0].is_cuda and extension.cuda_kernels_available()
        if kernels:
            return extension.detect(self, heads, image_size, threshold=threshold, nms_iou=nms, detections=detections)
        cfg = self.config
        decode, suppress = ((rotated_ops.decode_rotated, rotated_ops.nms_rotated) if cfg.rotated
                            else (box_ops.decode, box_ops.nms))
        found = decode(cls_heads, box_heads, self.anchors(cls_heads),
                       threshold=cfg.threshold if threshold is None else threshold, top_n=cfg.top_n,
                       image_size=image_size)
        return suppress(*found, cls_heads[0].shape[0], iou_threshold=cfg.nms if nms is None else nms,
                        detections=cfg.detections if detections is None else detections)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.detect(self(x), tuple(x.shape[-2:]))

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str, **state) -> None:
        """The config, the weights and `state` (training state: plain values, tensors, state dicts), atomically."""
        atomic_save({CHECKPOINT_KEY: CHECKPOINT_VERSION, "config": asdict(self.config),
                     "state_dict": self.state_dict(), **state}, path)

    @classmethod
    def load(cls, path: str, *, ema: bool = True) -> Tuple["Model", dict]:
        """Model and the rest of the checkpoint (training state). With `ema` the model gets the checkpoint's EMA
        weights when it has them (inference, export); training resumes from the raw weights (ema=False)."""
        ckpt = read_checkpoint(path)
        model = cls(config=config_from_dict(ckpt.pop("config"), path))
        weights = ckpt.pop("state_dict")
        if ema and isinstance(ckpt.get("ema"), dict) and "state_dict" in ckpt["ema"]:
            weights = ckpt["ema"]["state_dict"]
            log.info(f"{path}: using the EMA weights (decay {ckpt['ema'].get('decay')})")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:   # the message lists every mismatching tensor: name the first
            detail = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
            raise OdtkError(f"{path}: its weights do not fit the model its config describes ({detail[:160]})"
                            ) from None
        return model, ckpt


def _safe_globals() -> list:
    """What odtk checkpoints hold beyond tensors and plain containers, for torch.load(weights_only=True): numpy's
    RNG state (np.random.get_state(), saved by training for exact resume) holds a uint32 ndarray: the array, its
    dtype and the dtype's class."""
    import numpy as np
    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    # numpy < 2.1 pickles _reconstruct under numpy.core, later ones under numpy._core: accept both spellings
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


def _unexpected_globals(path: str) -> List[str]:
    """The classes and functions a checkpoint would make the unpickler call that odtk never stores."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in _safe_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:   # not a checkpoint at all: the caller says so
        return []
    return [g for g in found if g not in allowed]


def training_resize(state: dict) -> Tuple[int, int]:
    """(resize, max_size) a checkpoint's model was trained at (its saved train_config), else ODTK's 800 / 1333:
    what inference and dynamic-size exports of it apply unless told otherwise."""
    trained = state.get("train_config") or {}
    return trained.get("resize", 800), trained.get("max_size", 1333)


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, its layout version checked and removed. torch.load(weights_only=True): a file that
    would make the unpickler call anything beyond what odtk stores is refused, never run."""
    if not os.path.isfile(path):
        raise OdtkError(f"{path}: model file not found")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unexpected = _unexpected_globals(path)
        if not unexpected:
            raise OdtkError(f"{path}: not a readable odtk checkpoint (UnpicklingError)") from None
        raise OdtkError(f"{path}: refused: it holds {', '.join(unexpected[:3])}, which odtk checkpoints never do, "
                        f"and unpickling it could run code (load it yourself with torch.load(weights_only=False) "
                        f"only if you trust its source)") from None
    except Exception as e:
        raise OdtkError(f"{path}: not a readable odtk checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "state_dict" not in ckpt:
        raise OdtkError(f"{path}: not an odtk checkpoint (no model config / state_dict)")
    version = ckpt.pop(CHECKPOINT_KEY, 0)   # 0: written before checkpoints had a version
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise OdtkError(f"{path}: written by a newer odtk (checkpoint version {version}; this odtk reads up to "
                        f"{CHECKPOINT_VERSION}): upgrade odtk to load it")
    return ckpt


def config_from_dict(config: dict, path: str) -> ModelConfig:
    """ModelConfig from a checkpoint's config: keys this odtk does not know are ignored with a warning (a newer
    odtk's options), missing ones take their defaults (an older odtk's checkpoint), which is logged."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(config) - known)
    missing = sorted(known - set(config))
    if unknown:
        log.warning(f"{path}: ignoring config keys this odtk does not know: {', '.join(unknown)} "
                    f"(a checkpoint from a newer odtk?)")
    if missing:
        defaults = ModelConfig()
        log.info(f"{path}: config keys missing (a checkpoint from an older odtk?), using the defaults: "
                 + ", ".join(f"{k}={getattr(defaults, k)!r}" for k in missing))
    return ModelConfig(**{k: v for k, v in config.items() if k in known})
