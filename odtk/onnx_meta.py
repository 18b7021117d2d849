"""odtk's metadata in ONNX models (and TensorRT plans): preprocessing, classes and thresholds under one key, so
inference needs nothing but the model file. Needs onnx only to read or write a file."""
import json
import os
from typing import TYPE_CHECKING, Tuple

from .version import __version__
from .constants import category_ids_or_default
from .utils import OdtkError

if TYPE_CHECKING:   # the model type for annotations only: reading metadata must not import the network code
    from .model import Model

METADATA_KEY = "odtk"


def metadata(model: "Model", size: Tuple[int, int], flavour: str, *, dynamic: bool = False,
             preprocess: Tuple[int, int] = (800, 1333)) -> dict:
    """What inference needs to run `model` exported at input `size` (height, width) as `flavour` (raw, end2end,
    plan): preprocessing, classes, thresholds and the anchor geometry. `dynamic`: the graph takes any height and
    width (multiples of size_divisible; `size` is only where it was traced), and inference resizes each image as
    a .pth does, shorter side to `resize` capped by `max_size` (`preprocess`). A rotated model's also holds its
    anchor angles and top_n: ONNX Runtime decodes its raw heads after the graph (odtk.detector.RawHeadsDecoder)."""
    mc = model.config
    resize, max_size = preprocess
    rotated = {"angles": list(mc.angles), "top_n": mc.top_n} if mc.rotated else {}
    return {"odtk_version": __version__, "flavour": flavour, "size": list(size), "dynamic": dynamic,
            "resize": resize, "max_size": max_size, "stride": max(model.strides),
            "size_divisible": mc.size_divisible, "mean": mc.mean, "std": mc.std, "num_classes": mc.num_classes,
            "category_ids": category_ids_or_default(mc.category_ids, mc.num_classes),
            "class_names": mc.class_names, "backbones": mc.backbones, "channels": mc.channels,
            "threshold": mc.threshold, "nms": mc.nms,
            "detections": mc.detections, "ratios": mc.ratios, "scales": mc.scales, "levels": len(model.strides),
            "strides": model.strides, "rotated": mc.rotated, **rotated}


def set_metadata(proto, meta: dict) -> None:
    """Store `meta` in an onnx.ModelProto, replacing any odtk metadata it had."""
    for p in list(proto.metadata_props):
        if p.key == METADATA_KEY:
            proto.metadata_props.remove(p)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)


def read_metadata(path: str) -> dict:
    """The odtk metadata of an ONNX file (its weights are not loaded), or an OdtkError saying why there is none."""
    import onnx
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise OdtkError(f"{path}: not a readable ONNX model ({e.__class__.__name__})") from None
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise OdtkError(f"{path}: no odtk metadata (export it with `odtk export model.pth {os.path.basename(path)}`)")
