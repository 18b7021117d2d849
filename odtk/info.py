"""`odtk info`: what a model file holds, without running it on data.

    >>> import odtk
    >>> odtk.info("model.pth")["gflops"]           # also .onnx and .plan
    >>> from odtk.info import format_info; print(format_info(odtk.info("model.pth")))   # the table

A checkpoint (.pth) gives its backbones, classes, anchors, parameters (total and trainable as training would train
them: frozen BatchNorm and stem are not trainable when the backbone is ImageNet-pretrained), GFLOPs at an input size,
the iteration reached, whether it holds EMA weights, and its training settings. GFLOPs are counted by
torch.utils.flop_counter.FlopCounterMode over one forward pass of the network (backbone, FPN and heads; decode and
NMS are not counted) on the meta device (shapes only: no memory, no arithmetic), and a multiply-add counts as
2 FLOPs. torchvision's model docs count a multiply-add as 1: their GFLOPS are half of this counter's (e.g.
retinanet_resnet50_fpn: 151.54 in their docs, 303.08 here, both at its 800x800 input).

An ONNX model gives its odtk metadata, opset, inputs and outputs, flavour and whether it is INT8; a TensorRT plan
its odtk header (metadata), which needs neither TensorRT nor a GPU.
"""
import json
import math
import os
import struct
import textwrap
from typing import List, Optional, Sequence, Tuple

import torch

from .constants import category_ids_or_default
from .onnx_meta import read_metadata
from .utils import OdtkError, log, padded

DEFAULT_SIZE = (800, 1333)     # torchvision's and ODTK's default resize / max size
FLOPS_CONVENTION = "a multiply-add counts as 2 FLOPs"

# the header odtk._C's Engine::save writes before the TensorRT engine (odtk/csrc/engine.cpp: keep both in step),
# little-endian, as the machines that build plans: magic, format and stride (uint32 each); from format 2 the dynamic
# flag and the input size profile (uint32 each: min height, width, opt height, width, max height, width); then the
# metadata length (uint64) and metadata JSON. Format 1 plans (fixed-size) are still read.
PLAN_MAGIC = b"ODTKPLAN"
PLAN_FORMAT = 2
PLAN_PREFIX = struct.Struct("<II")       # format, stride
PLAN_PROFILE = struct.Struct("<I6I")     # format 2: dynamic, size profile
PLAN_LENGTH = struct.Struct("<Q")

FLAVOURS = {"end2end": "end-to-end (decode + NMS inside, for ONNX Runtime)",
            "raw": "raw heads (no decode/NMS, for TensorRT)", "plan": "TensorRT engine with odtk's decode/NMS plugins"}

# training settings that describe the machine or the run's plumbing rather than the model: left out of the summary
PLUMBING = {"model", "verbose", "master", "nodes", "node_rank", "workers", "device", "override", "loader_workers",
            "logdir", "post_metrics"}


# -- sizes and counts -------------------------------------------------------------------------------------------
def input_size(size: Optional[Sequence[int]], train_config: Optional[dict], divisible: int
               ) -> Tuple[Tuple[int, int], str]:
    """The (height, width) to count FLOPs at, padded to `divisible` as the loaders pad, and where it comes from:
    --size (one value: square), else the training resize / max size (a landscape image at its largest), else
    800x1333."""
    if size:
        if len(size) not in (1, 2) or min(size) < 1:
            raise OdtkError(f"--size {' '.join(map(str, size))}: give one positive side (square) or height width")
        h, w = (size[0], size[0]) if len(size) == 1 else size
        source = "--size"
    elif train_config and train_config.get("resize") and train_config.get("max_size"):
        resize, max_size = int(train_config["resize"]), int(train_config["max_size"])
        h, w = min(resize, max_size), max_size
        source = f"training --resize {resize} --max-size {max_size}"
    else:
        (h, w), source = DEFAULT_SIZE, "default 800x1333"
    out = (padded(h, divisible), padded(w, divisible))
    if out != (h, w):
        source += f", padded to multiples of {divisible}"
    return out, source


def count_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs of one call of `module` (FlopCounterMode: a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def network_flops(config, size: Tuple[int, int]) -> int:
    """FLOPs of one forward pass of the network a ModelConfig describes at input (height, width), batch 1, counted
    on the meta device: only shapes are computed, so a 100-GFLOP network is counted in a second or two."""
    from .model import Model
    with torch.device("meta"):
        shell = Model(config=config)
    return count_flops(shell, torch.empty(1, 3, *size, device="meta"))


def parameter_counts(model: torch.nn.Module) -> Tuple[int, int]:
    """(all parameters, those training updates): frozen parts have requires_grad off from the model's build."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# -- one function per file type ---------------------------------------------------------------------------------
def info(path: str, size: Optional[Sequence[int]] = None) -> dict:
    """What the model file `path` (.pth checkpoint, .onnx or .plan) holds, as a dict (`format_info` prints it).
    `size` (height width, or one side) sets the input a checkpoint's GFLOPs are counted at; exported models
    have their own."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OdtkError(f"{path}: model file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".onnx", ".plan"):
        if size:
            log.warning(f"--size applies to .pth checkpoints: {path} has a fixed input size, shown below")
        return onnx_info(path) if ext == ".onnx" else plan_info(path)
    return checkpoint_info(path, size)


def checkpoint_info(path: str, size: Optional[Sequence[int]] = None) -> dict:
    from .model import Model
    model, state = Model.load(path, ema=False)   # the raw weights: the EMA's have the same shapes
    mc = model.config
    train_config = state.get("train_config") if isinstance(state.get("train_config"), dict) else None
    (h, w), source = input_size(size, train_config, mc.size_divisible)
    total, trainable = parameter_counts(model)
    ema = state.get("ema") if isinstance(state.get("ema"), dict) else None
    return {"path": path, "format": "checkpoint", "file_size": os.path.getsize(path),
            **_description(mc.backbones, mc.num_classes, mc.category_ids, mc.class_names, mc.ratios, mc.scales,
                           model.strides, mc.threshold, mc.nms, mc.detections,
                           angles=mc.angles if mc.rotated else None),
            "channels": mc.channels, "pretrained": mc.pretrained, "parameters": total, "trainable": trainable,
            "size": [h, w], "size_source": source, "gflops": network_flops(mc, (h, w)) / 1e9,
            "flops_convention": FLOPS_CONVENTION, "iteration": state.get("iteration"),
            "ema": {"decay": ema.get("decay"), "updates": ema.get("updates")} if ema else None,
            "train_config": train_config}


def onnx_info(path: str) -> dict:
    import onnx
    meta = read_metadata(path)     # a one-line error for a file that is not an odtk ONNX model
    proto = onnx.load(path, load_external_data=False)
    graph = proto.graph
    ops = {n.op_type for n in graph.node}
    weights = {i.name for i in graph.initializer}
    return {"path": path, "format": "onnx", "file_size": os.path.getsize(path), **_from_metadata(meta),
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
            "inputs": [_tensor(v) for v in graph.input if v.name not in weights],
            "outputs": [_tensor(v) for v in graph.output], "nodes": len(graph.node),
            "int8": meta.get("int8") or ("QuantizeLinear" in ops or "QLinearConv" in ops) or None,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip()}


def plan_info(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(len(PLAN_MAGIC))
        if magic != PLAN_MAGIC:
            raise OdtkError(f"{path}: not an odtk TensorRT plan (export one with `odtk export model.pth "
                            f"{os.path.basename(path)}`)")
        version, _ = _unpack(f, PLAN_PREFIX, path)
        if not 1 <= version <= PLAN_FORMAT:
            raise OdtkError(f"{path}: odtk plan format {version}, this odtk reads formats 1 to {PLAN_FORMAT} "
                            f"(upgrade odtk, or export the plan again)")
        dynamic, profile = False, None
        if version >= 2:
            dynamic, *sides = _unpack(f, PLAN_PROFILE, path)
            profile = [sides[0:2], sides[2:4], sides[4:6]]
        length, = _unpack(f, PLAN_LENGTH, path)
        text = f.read(length)
        header = f.tell()
    try:
        meta = json.loads(text.decode("utf-8")) if len(text) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise OdtkError(f"{path}: truncated or damaged odtk plan header (export it again)")
    return {"path": path, "format": "plan", "file_size": size, **_from_metadata(meta),
            "precision": meta.get("precision"), "engine_bytes": size - header, "dynamic": bool(dynamic),
            "size_profile": profile, "resize": meta.get("resize"), "max_size": meta.get("max_size"),
            "engine": "layers, max batch and device: need odtk._C built with TensorRT (Detector.load on a GPU)"}


def _unpack(f, layout: struct.Struct, path: str) -> tuple:
    """The next `layout` of an open plan, or a one-line error when the file ends first."""
    data = f.read(layout.size)
    if len(data) < layout.size:
        raise OdtkError(f"{path}: truncated odtk plan (export it again)")
    return layout.unpack(data)


def _description(backbones: List[str], num_classes: int, category_ids: Optional[List[int]],
                 class_names: Optional[List[str]], ratios: List[float], scales: List[float], strides: List[int],
                 threshold: float, nms: float, detections: int, angles: Optional[List[float]] = None) -> dict:
    """The fields a checkpoint and an exported model's metadata share; `angles`: a rotated model's anchor angles."""
    return {"backbones": list(backbones), "classes": num_classes,
            "category_ids": category_ids_or_default(category_ids, num_classes), "class_names": class_names,
            "rotated": angles is not None,
            "anchors": {"ratios": list(ratios), "scales": list(scales), "strides": list(strides),
                        "angles": list(angles or []), "per_cell": len(ratios) * len(scales) * len(angles or [0])},
            "limits": {"threshold": threshold, "nms": nms, "detections": detections}}


def _from_metadata(meta: dict) -> dict:
    """`_description` and the input size from odtk's metadata of an exported model."""
    return {**_description(meta.get("backbones", []), meta.get("num_classes", 0), meta.get("category_ids"),
                           meta.get("class_names"), meta.get("ratios", []), meta.get("scales", []),
                           meta.get("strides", []), meta.get("threshold"), meta.get("nms"), meta.get("detections"),
                           angles=meta.get("angles", []) if meta.get("rotated") else None),
            "channels": meta.get("channels"), "flavour": meta.get("flavour"), "size": meta.get("size"),
            "odtk_version": meta.get("odtk_version")}


def _tensor(value) -> dict:
    """Name, element type and shape (a name for a dynamic axis) of an ONNX graph input or output."""
    import onnx
    t = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": value.name, "type": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}


# -- the table --------------------------------------------------------------------------------------------------
def format_info(d: dict) -> str:
    """The table `odtk info` prints, from `info`'s dict."""
    rows = {"checkpoint": _checkpoint_rows, "onnx": _onnx_rows, "plan": _plan_rows}[d["format"]](d)
    return table(f"{d['path']}: {_KINDS[d['format']]}, {_megabytes(d['file_size'])}", rows)


def table(title: str, rows: Sequence[Tuple[str, str]]) -> str:
    """`title`, then one indented `label  value` line per row, long values wrapped under their column (`odtk
    info` and `odtk data` print these)."""
    width = max(len(label) for label, _ in rows) + 2
    wrap = 118 - width
    lines = [title]
    for label, value in rows:
        text = textwrap.wrap(str(value), wrap, break_on_hyphens=False) or [""]
        lines.append(f"  {label:<{width}}{text[0]}")
        lines += [f"  {'':<{width}}{more}" for more in text[1:]]
    return "\n".join(lines)


_KINDS = {"checkpoint": "odtk checkpoint", "onnx": "ONNX model", "plan": "TensorRT plan"}


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _shared_rows(d: dict) -> List[Tuple[str, str]]:
    a, lim = d["anchors"], d["limits"]
    return [("backbone", " + ".join(d["backbones"]) + (f", FPN and heads {d['channels']} wide" if d.get("channels")
                                                       else "")),
            ("classes", _classes(d)),
            ("anchors", f"{a['per_cell']} per cell: ratios {numbers(a['ratios'])}, scales {numbers(a['scales'])}, "
                        f"strides {numbers(a['strides'])}"
                        + (f", angles {numbers([math.degrees(t) for t in a['angles']])} degrees (rotated boxes)"
                           if d.get("rotated") else "")),
            ("post-processing", f"score > {lim['threshold']}, NMS IoU {lim['nms']}, {lim['detections']} "
                                f"detections per image")]


def _checkpoint_rows(d: dict) -> List[Tuple[str, str]]:
    h, w = d["size"]
    frozen = d["parameters"] - d["trainable"]
    rows = _shared_rows(d)
    rows.insert(1, ("pretrained", "yes: ImageNet backbone, frozen BatchNorm and stem" if d["pretrained"] else
                    "no: random initial weights, BatchNorm trainable"))
    rows += [("parameters", f"{d['parameters']:,} ({_millions(d['parameters'])}), trainable {d['trainable']:,}"
                            + (f" (frozen: {frozen:,})" if frozen else "")),
             ("GFLOPs", f"{d['gflops']:.2f} at {h}x{w}, batch 1 ({d['size_source']})"),
             ("", f"backbone + FPN + heads by torch.utils.flop_counter: {d['flops_convention']} "
                  f"(torchvision's docs count 1, half as many)"),
             ("iteration", "not saved" if d["iteration"] is None else f"{d['iteration']:,}"),
             ("EMA", f"yes (decay {d['ema']['decay']}, {d['ema']['updates'] or 0:,} updates; inference and export "
                     f"use it)" if d["ema"] else "no"),
             ("training", _compact(d["train_config"]) if d["train_config"] else "no settings saved")]
    return rows


def _onnx_rows(d: dict) -> List[Tuple[str, str]]:
    flavour = FLAVOURS.get(d["flavour"], str(d["flavour"]))
    if d["flavour"] == "raw" and d.get("rotated"):
        flavour = "rotated raw heads (for TensorRT, and ONNX Runtime: odtk decodes and runs rotated NMS after it)"
    rows = [("flavour", flavour),
            ("INT8", f"yes ({d['int8']})" if isinstance(d["int8"], str) else "yes" if d["int8"] else "no (FP32)"),
            ("opset", str(d["opset"]))]
    rows += [("input" if i == 0 else "", _shape(v)) for i, v in enumerate(d["inputs"])]
    rows += [("outputs" if i == 0 else "", _shape(v)) for i, v in enumerate(d["outputs"])]
    return rows + _shared_rows(d) + [("size", "x".join(map(str, d["size"] or []))),
                                     ("odtk", f"{d['odtk_version']}, {d['nodes']} nodes, {d['producer']}")]


def _plan_rows(d: dict) -> List[Tuple[str, str]]:
    return [("flavour", FLAVOURS["plan"]), ("precision", str(d["precision"])), ("size", _plan_size(d)),
            *_shared_rows(d),
            ("engine", f"{_megabytes(d['engine_bytes'])}; {d['engine']}"), ("odtk", str(d["odtk_version"]))]


def _plan_size(d: dict) -> str:
    """A fixed plan's input size, or a dynamic one's profile and the resize inference applies."""
    if not d.get("dynamic"):
        return "x".join(map(str, d["size"] or []))
    low, opt, high = ("x".join(map(str, s)) for s in d["size_profile"])
    return (f"dynamic: {low} to {high} (multiples of the stride), tuned for {opt}; images resized to "
            f"{d['resize']}, max {d['max_size']}")


def _classes(d: dict, shown: int = 8) -> str:
    ids, names = d["category_ids"], d["class_names"]
    contiguous = bool(ids) and ids == list(range(ids[0], ids[0] + len(ids)))
    id_text = (f"{ids[0]}-{ids[-1]}" if contiguous else numbers(ids) if len(ids) <= shown else
               f"{ids[0]}-{ids[-1]} with gaps")
    if not names:
        return f"{d['classes']}, no names (category ids {id_text})"
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return f"{d['classes']}: {', '.join(names[:shown])}{more} (category ids {id_text})"


def numbers(values: Sequence[float]) -> str:
    """`1 2 0.5`: floats to 3 decimals, as few digits as they need."""
    return " ".join(f"{round(v, 3):g}" if isinstance(v, float) else str(v) for v in values)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _shape(v: dict) -> str:
    return f"{v['name']} {v['type']} [{', '.join(map(str, v['shape']))}]"


def _compact(config: dict) -> str:
    """The training settings that say how the model was trained, `key=value` (None, off and plumbing left out)."""
    parts = []
    for key, value in config.items():
        if key in PLUMBING or value in (None, False, "", [], ()):
            continue
        if isinstance(value, dict):   # augment: only what is on
            value = ",".join(k if v is True else f"{k}:{v:g}" for k, v in value.items() if v)
        elif isinstance(value, (list, tuple)):
            value = ",".join(numbers(value).split())
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)

