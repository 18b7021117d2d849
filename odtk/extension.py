"""odtk._C, the optional compiled extension: CUDA decode/NMS kernels (axis-aligned and rotated) and the rotated IoU
as torch ops and, when built with TensorRT, the Engine. Importing odtk never needs it; what needs it says why it is
missing in one line."""
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .utils import OdtkError

BUILD_HINT = "build it inside NVIDIA's NGC PyTorch container (see the README section 'GPU / TensorRT')"

_loaded: Optional[Tuple[Optional[ModuleType], str]] = None


def load() -> Tuple[Optional[ModuleType], str]:
    """(odtk._C or None, why it is missing); imported once."""
    global _loaded
    if _loaded is None:
        try:
            from . import _C
            _loaded = (_C, "")
        except ImportError as e:   # not built, or built against libraries this machine lacks
            _loaded = (None, str(e).splitlines()[0] if str(e) else e.__class__.__name__)
    return _loaded


def engine_class():
    """odtk._C.Engine, or an OdtkError saying in one line why TensorRT engines are not available."""
    ext, why = load()
    if ext is None:
        raise OdtkError(f"TensorRT engines need odtk's compiled extension, which is missing ({why[:120]}); "
                        f"{BUILD_HINT}")
    if not hasattr(ext, "Engine"):
        raise OdtkError(f"odtk was built without TensorRT (odtk._C has the CUDA kernels only); {BUILD_HINT}")
    return ext.Engine


def _kernel(name: str):
    """odtk._C's op `name`, or an OdtkError saying in one line why it is missing."""
    ext, why = load()
    if ext is None:
        raise OdtkError(f"odtk's CUDA kernels are not built ({why[:120]}); {BUILD_HINT}")
    if not hasattr(ext, name):   # an odtk._C built from an older odtk (before the rotated kernels)
        raise OdtkError(f"odtk's compiled extension has no {name} kernel (it was built from an older odtk): rebuild "
                        f"it; {BUILD_HINT}")
    return getattr(ext, name)


def cuda_kernels_available() -> bool:
    return torch.cuda.is_available() and load()[0] is not None


def _decode(op: str, cls_heads: Sequence[Tensor], box_heads: Sequence[Tensor], cell_anchors: Sequence[Tensor],
            strides: Sequence[int], threshold: float, top_n: int, image_size: Optional[Tuple[int, int]],
            sigmoid: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Every level through odtk._C's `op` (decode or decode_rotated), the levels concatenated per image."""
    kernel = _kernel(op)
    h, w = image_size if image_size is not None else (0, 0)
    levels = [kernel(cls.float().sigmoid() if sigmoid else cls.float(), box.float(),
                     cell.to(cls.device, torch.float32), float(stride), threshold, top_n, h, w)
              for cls, box, cell, stride in zip(cls_heads, box_heads, cell_anchors, strides)]
    return tuple(torch.cat([level[k] for level in levels], dim=1) for k in range(3))


def decode(cls_heads: Sequence[Tensor], box_heads: Sequence[Tensor], cell_anchors: Sequence[Tensor],
           strides: Sequence[int], *, threshold: float = 0.05, top_n: int = 1000,
           image_size: Optional[Tuple[int, int]] = None, sigmoid: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """odtk.box.decode on the CUDA kernels, from head logits (probabilities with sigmoid=False): per image, every
    level's top_n candidates concatenated -> scores [B, L*top_n] (0 = padding), boxes [B, L*top_n, 4],
    classes [B, L*top_n] (float)."""
    return _decode("decode", cls_heads, box_heads, cell_anchors, strides, threshold, top_n, image_size, sigmoid)


def decode_rotated(cls_heads: Sequence[Tensor], box_heads: Sequence[Tensor], cell_anchors: Sequence[Tensor],
                   strides: Sequence[int], *, threshold: float = 0.05, top_n: int = 1000,
                   image_size: Optional[Tuple[int, int]] = None, sigmoid: bool = True
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """odtk.rotated.decode_rotated on the CUDA kernels: decode() for box heads [B, A*6, H, W] and rotated cell anchors
    [A, 5] -> boxes [B, L*top_n, 5] (x1, y1, x2, y2, theta)."""
    return _decode("decode_rotated", cls_heads, box_heads, cell_anchors, strides, threshold, top_n, image_size,
                   sigmoid)


def nms(scores: Tensor, boxes: Tensor, classes: Tensor, *, iou_threshold: float = 0.5,
        detections: int = 100) -> Tuple[Tensor, Tensor, Tensor]:
    """odtk.box.nms on the CUDA kernel, on decode()'s padded output -> scores [B, D], boxes [B, D, 4],
    classes [B, D] (int64, as odtk.box.nms)."""
    out_scores, out_boxes, out_classes = _kernel("nms")(scores, boxes, classes, iou_threshold, detections)
    return out_scores, out_boxes, out_classes.long()


def nms_rotated(scores: Tensor, boxes: Tensor, classes: Tensor, *, iou_threshold: float = 0.5,
                detections: int = 100) -> Tuple[Tensor, Tensor, Tensor]:
    """odtk.rotated.nms_rotated on the CUDA kernel, on decode_rotated()'s padded output -> scores [B, D],
    boxes [B, D, 5], classes [B, D] (int64)."""
    out_scores, out_boxes, out_classes = _kernel("nms_rotated")(scores, boxes, classes, iou_threshold, detections)
    return out_scores, out_boxes, out_classes.long()


def rotated_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """odtk.rotated.rotated_box_iou on the CUDA kernel: boxes a [N, 5] and b [M, 5] on one GPU -> IoU [N, M]
    (float32)."""
    return _kernel("iou_rotated")(a.float(), b.float())


def detect(model, heads: Tuple[List[Tensor], List[Tensor]], image_size: Optional[Tuple[int, int]] = None, *,
           threshold: Optional[float] = None, nms_iou: Optional[float] = None, detections: Optional[int] = None
           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Model.detect (decode + NMS, the model's limits unless overridden) on the CUDA kernels, for heads on a GPU;
    a rotated model's on the rotated ones."""
    cfg = model.config
    to_boxes, suppress = (decode_rotated, nms_rotated) if cfg.rotated else (decode, nms)
    found = to_boxes(heads[0], heads[1], model.cell_anchors, model.strides,
                     threshold=cfg.threshold if threshold is None else threshold, top_n=cfg.top_n,
                     image_size=image_size)
    return suppress(*found, iou_threshold=cfg.nms if nms_iou is None else nms_iou,
                    detections=cfg.detections if detections is None else detections)
