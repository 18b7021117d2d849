"""ONNX export: raw heads (ODTK's TensorRT contract) or end-to-end (decode + NMS in standard ONNX ops), and TensorRT
plans (raw heads + odtk._C's decode/NMS plugins).

Both graphs take a normalised, padded float image batch `input_1` [B, 3, H, W] with a dynamic batch, and a fixed
H, W (--size) or, with --dynamic-size, symbolic ones: any multiple of size_divisible, so ONNX Runtime sees each
image resized as `odtk infer model.pth` does. A --dynamic-size plan takes H and W within its optimisation profile
(--dynamic-size-opts). Preprocessing and classes travel in the model's metadata under the key "odtk".
"""
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import box as box_ops
from .constants import DEFAULT_OPSET
from .checks import at_least, check_export, check_rotated_flag, check_writable
from .fuse import fused_copy
from .model import Model, training_resize
from .onnx_meta import metadata, read_metadata, set_metadata  # noqa: F401  (read_metadata: odtk.export's API)
from .progress import progress
from .utils import OdtkError, atomic_path, log, padded

Size = Tuple[int, int]                      # (height, width)
SizeOpt = Union[int, str, Sequence[int]]    # one --dynamic-size-opts entry: 640, "512x896" or (512, 896)
SIZE_OPT = re.compile(r"(\d+)(?:x(\d+))?")


@dataclass
class ExportConfig:
    model: str
    output: str
    size: Tuple[int, int] = (1280, 1280)
    batch: int = 2
    raw_heads: bool = False
    opset: int = DEFAULT_OPSET
    full_precision: bool = False
    int8: bool = False
    calibration_images: Optional[str] = None   # required with int8, unless calibration_table exists
    calibration_batches: int = 2
    calibration_table: str = ""
    dynamic_batch_opts: Optional[Tuple[int, int, int]] = None
    device: str = "auto"             # cpu refuses a .plan; ONNX is traced on the CPU either way
    verbose: bool = False
    dynamic_size: bool = False       # symbolic input height and width; ONNX: `size` is then the trace size
    resize: Optional[int] = None     # a dynamic graph's inference resize; default: the checkpoint's training values
    max_size: Optional[int] = None
    # a --dynamic-size plan's (min, opt, max) input size, each a side (square) or "HxW"; default: size_profile's
    dynamic_size_opts: Optional[Tuple[SizeOpt, SizeOpt, SizeOpt]] = None
    rotated_bbox: bool = False       # the model must be rotated (ODTK's flag; the checkpoint says so itself)

    def __post_init__(self) -> None:
        check_export(self)
        at_least("--resize", self.resize, 1)
        at_least("--max-size", self.max_size, 1)
        if (self.resize or self.max_size) and not self.dynamic_size:
            raise OdtkError("--resize/--max-size set how a --dynamic-size graph's images are resized; a fixed-size "
                            "graph fits them into --size: add --dynamic-size or drop them")
        if self.dynamic_size_opts is not None:
            if not self.output.lower().endswith(".plan"):
                raise OdtkError(f"{self.output}: --dynamic-size-opts is a TensorRT (.plan) profile; a --dynamic-size "
                                f"ONNX takes any size: drop it")
            if not self.dynamic_size:
                raise OdtkError("--dynamic-size-opts sets the input sizes a --dynamic-size plan takes: add "
                                "--dynamic-size (or drop it for a fixed --size plan)")
            self.dynamic_size_opts = parse_size_opts(self.dynamic_size_opts)


def parse_size_opts(values: Sequence[SizeOpt]) -> Tuple[Size, Size, Size]:
    """--dynamic-size-opts MIN OPT MAX -> three (height, width), each given as a side (square), "HEIGHTxWIDTH" or
    a pair; positive and ordered (multiples of the stride are checked with the model, in size_profile)."""
    if isinstance(values, str):
        values = values.split()
    shown = " ".join("x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v) for v in values)
    sizes = []
    for value in values:
        match = SIZE_OPT.fullmatch(value.strip().lower()) if isinstance(value, str) else None
        if match:
            sizes.append((int(match[1]), int(match[2] or match[1])))
        elif isinstance(value, int) and not isinstance(value, bool):
            sizes.append((value, value))
        elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            sizes.append((value[0], value[1]))
    if len(sizes) != 3 or len(values) != 3:
        raise OdtkError(f"--dynamic-size-opts {shown}: give three sizes MIN OPT MAX, each a side (square) or "
                        f"HEIGHTxWIDTH, e.g. 128 800x1344 1344")
    if min(min(size) for size in sizes) < 1:
        raise OdtkError(f"--dynamic-size-opts {shown}: sizes must be positive")
    if not all(a <= b for low, high in zip(sizes, sizes[1:]) for a, b in zip(low, high)):
        raise OdtkError(f"--dynamic-size-opts {shown}: need MIN <= OPT <= MAX in height and in width")
    return tuple(sizes)


def export_size(size: Sequence[int], divisible: int) -> Tuple[int, int]:
    """--size: one side (square) or height width, each a multiple of the model's stride."""
    if len(size) not in (1, 2):
        raise OdtkError(f"--size takes one value (square) or two (height width), got {len(size)}")
    h, w = (size[0], size[0]) if len(size) == 1 else tuple(size)
    if h % divisible or w % divisible or h <= 0 or w <= 0:
        raise OdtkError(f"--size {h} {w}: each side must be a positive multiple of {divisible}")
    return h, w


def preprocess_sizes(cfg: ExportConfig, state: dict) -> Tuple[int, int]:
    """(resize, max_size) that inference applies to a dynamic graph: --resize/--max-size, else the checkpoint's
    training values (what `odtk infer model.pth` and Detector.load use), else odtk's defaults."""
    resize, max_size = training_resize(state)
    return cfg.resize or resize, cfg.max_size or max_size


class RawHeads(nn.Module):
    """input_1 -> score_1..N (sigmoid class probabilities [B, A*C, H, W]) and box_1..N (deltas [B, A*4, H, W]; a
    rotated model's [B, A*6, H, W]).

    With `half` the network runs in FP16 between float32 input and outputs: TensorRT 11 builds strongly typed
    networks only, so an FP16 engine needs FP16 in the ONNX itself."""

    def __init__(self, model: Model, half: bool = False):
        super().__init__()
        self.model = model.half() if half else model
        self.half = half

    def forward(self, x: Tensor):
        cls_heads, box_heads = self.model(x.half() if self.half else x)
        heads = tuple(h.sigmoid() for h in cls_heads) + tuple(box_heads)
        return tuple(h.float() for h in heads) if self.half else heads


class _NMS(torch.autograd.Function):
    """Batched single-class NMS emitted as ONNX NonMaxSuppression; selected (batch, 0, index) rows."""

    @staticmethod
    def forward(ctx, boxes, scores, max_out: int, iou: float, threshold: float):
        from torchvision.ops import nms
        rows = []
        for b in range(boxes.shape[0]):
            keep = scores[b, 0] > threshold
            idx = keep.nonzero().flatten()
            sel = idx[nms(boxes[b, idx], scores[b, 0, idx], iou)][:max_out]
            rows.append(torch.stack([torch.full_like(sel, b), torch.zeros_like(sel), sel], 1))
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, max_out: int, iou: float, threshold: float):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float)),
                    g.op("Constant", value_t=torch.tensor([threshold], dtype=torch.float)))


class EndToEnd(nn.Module):
    """input_1 -> scores [B, D], boxes [B, D, 4], classes [B, D], as Model.predict. With a `size` (height, width)
    the graph takes that input only and its anchors are constants; with None, height and width are dynamic: each
    level's anchors are generated in the graph from its traced feature-map shape, and boxes clip to the traced
    input size."""

    def __init__(self, model: Model, size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.model = model
        self.size = size
        if size:
            for i, a in enumerate(model.anchors_for(size)):
                self.register_buffer(f"anchors_{i}", a.clone(), persistent=False)

    def _anchors(self, level: int, head: Tensor) -> Tensor:
        if self.size:
            return getattr(self, f"anchors_{level}")
        h, w = head.shape[-2:]   # traced as Shape ops: Range/meshgrid in the graph follow the input
        return box_ops.grid_anchors(self.model.cell_anchors[level], self.model.strides[level], h, w)

    def forward(self, x: Tensor):
        cfg = self.model.config
        c, a = cfg.num_classes, cfg.num_anchors
        size = self.size or tuple(x.shape[-2:])
        cls_heads, box_heads = self.model(x)
        all_scores, all_boxes, all_classes = [], [], []
        for i, (cls, box) in enumerate(zip(cls_heads, box_heads)):
            h, w = cls.shape[-2:]
            scores = box_ops.anchor_major(cls.sigmoid(), a).reshape(-1, h * w * a * c)
            deltas = box_ops.anchor_major(box, a)
            top, idx = scores.topk(_at_most(h * w * a * c, cfg.top_n), dim=1)
            anchor_idx = idx // c
            deltas = deltas.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
            anchors = self._anchors(i, cls)[anchor_idx]
            all_scores.append(top)
            all_boxes.append(box_ops.delta2box(deltas, anchors, size))
            all_classes.append(idx % c)
        scores, boxes, classes = torch.cat(all_scores, 1), torch.cat(all_boxes, 1), torch.cat(all_classes, 1)
        # class-aware NMS in one call: shift each class to its own region so classes never overlap
        offset = (classes.to(boxes.dtype) * (_longest(size) + 1)).unsqueeze(-1)
        selected = _NMS.apply(boxes + offset, scores.unsqueeze(1), cfg.detections, cfg.nms, cfg.threshold)
        b_idx, i_idx = selected[:, 0], selected[:, 2]
        kept = torch.zeros_like(scores).index_put((b_idx, i_idx), scores[b_idx, i_idx])
        # D zero rows after the candidates: tiny inputs have fewer candidates than outputs (always padded, as a
        # dynamic graph cannot branch on the count)
        d = cfg.detections
        kept = torch.cat([kept, kept.new_zeros(kept.shape[0], d)], 1)
        boxes = torch.cat([boxes, boxes.new_zeros(boxes.shape[0], d, 4)], 1)
        classes = torch.cat([classes, classes.new_zeros(classes.shape[0], d)], 1)
        out_scores, order = kept.topk(d, dim=1)
        valid = out_scores > 0
        out_boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)) * valid.unsqueeze(-1)
        out_classes = classes.gather(1, order) * valid
        return out_scores, out_boxes, out_classes


def _at_most(n, k: int):
    """min(n, k) for a Python int or a traced 0-d shape tensor (Python's min would bake the trace's value in)."""
    return torch.clamp(n, max=k) if isinstance(n, Tensor) else min(n, k)


def _longest(size):
    """The longer side of (height, width), ints or traced 0-d tensors."""
    h, w = size
    return torch.maximum(h, w).float() if isinstance(h, Tensor) else float(max(h, w))


def dynamic_axes(outputs: Sequence[str], raw_heads: bool, dynamic: bool) -> dict:
    """ONNX dynamic axes: the batch always; with `dynamic` the input's height and width, and the raw heads' own
    (each level's H and W follow the input)."""
    axes = {n: {0: "batch"} for n in ["input_1", *outputs]}
    if dynamic:
        axes["input_1"].update({2: "height", 3: "width"})
        if raw_heads:
            for name in outputs:
                axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    return axes


def export_onnx(model: Model, path: str, *, size: Tuple[int, int], raw_heads: bool = False, batch: int = 1,
                opset: int = DEFAULT_OPSET, half: bool = False, dynamic: bool = False,
                preprocess: Tuple[int, int] = (800, 1333)) -> None:
    """Write an ONNX graph with a dynamic batch axis and odtk metadata; onnx.checker must accept it. With `dynamic`
    the input's height and width are symbolic too (traced at `size`); `preprocess` (resize, max_size) is the
    resize that inference applies to a dynamic graph's images, recorded in the metadata."""
    import onnx
    model = fused_copy(model).float()   # BN folded into the convs (a copy: the caller's model is left as it is)
    levels = len(model.strides)
    if raw_heads:
        module = RawHeads(model, half)
        outputs = [f"score_{i + 1}" for i in range(levels)] + [f"box_{i + 1}" for i in range(levels)]
    else:
        module = EndToEnd(model, None if dynamic else size)
        outputs = ["scores", "boxes", "classes"]
    dummy = torch.zeros(max(1, batch), 3, *size)
    fd, tmp = tempfile.mkstemp(prefix="odtk-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the TorchScript exporter: it takes the custom NonMaxSuppression symbolic above
            torch.onnx.export(module, (dummy,), tmp, input_names=["input_1"], output_names=outputs,
                              dynamic_axes=dynamic_axes(outputs, raw_heads, dynamic),
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        proto = onnx.load(tmp)
    finally:
        os.unlink(tmp)
    log.debug(f"{path}: {len(proto.graph.node)} nodes, outputs {outputs}")
    save_checked(proto, path, metadata(model, size, "raw" if raw_heads else "end2end", dynamic=dynamic,
                                       preprocess=preprocess))


def save_checked(proto, path: str, meta: dict) -> None:
    """Set the odtk metadata, run onnx.checker, write to a temp file beside `path`, then rename."""
    import onnx
    set_metadata(proto, meta)
    onnx.checker.check_model(proto)
    with atomic_path(path, ".onnx") as tmp:
        onnx.save(proto, tmp)


class _CalibrationReader:
    """Feeds onnxruntime's calibrator batches of real images, resized and padded like inference."""

    def __init__(self, dataset, *, batch: int, batches: int, size_divisible: int = 32):
        from .data import make_loader
        self.loader = iter(make_loader(dataset, batch_size=batch, training=False, workers=0,
                                       size_divisible=size_divisible))
        self.left = batches
        self.bar = None

    def get_next(self):
        if self.bar is None:
            self.bar = progress(total=self.left, desc="calibrate", unit="batch")
        batch = next(self.loader, None) if self.left > 0 else None
        if batch is None:
            self.bar.close()
            return None
        self.left -= 1
        self.bar.update(1)
        return {"input_1": batch[0].numpy()}


def calibration_dataset(folder: str, size: Tuple[int, int], wanted: int, meta: dict):
    """The calibration images, preprocessed as inference will: fitted into `size`, or for a dynamic graph resized
    by the metadata's resize/max_size, each at its own size."""
    from .data import CocoDataset
    if not os.path.isdir(folder):
        raise OdtkError(f"{folder}: calibration images folder not found")
    resize = dict(resize=meta["resize"], max_size=meta["max_size"]) if meta.get("dynamic") else dict(fit=size)
    dataset = CocoDataset(folder, mean=meta["mean"], std=meta["std"], **resize)
    if len(dataset) < wanted:
        log.warning(f"{folder}: {len(dataset)} images, fewer than the {wanted} asked for "
                    f"(--calibration-batches x --batch); calibrating on those")
    return dataset


# Bodies that lose accuracy in INT8: MobileNetV2's depthwise convolutions and ReLU6 / linear bottlenecks
# (BCCD, fp32 AP 0.446: symmetric INT8 0.366 with the body quantized, 0.447 without; u8s8 reduce-range
# without it 0.447). They stay float; FPN and heads, most of the compute, are quantized.
FLOAT_BODIES = ("MobileNetV2FPN",)


# Ops quantized inside the network (ReLU/Clip and Add fold into QLinear kernels); the decode/NMS tail, outside
# the "/model/" scope, stays float whatever its ops.
QUANTIZED_OPS = ["Conv", "Relu", "Clip", "Add", "Resize", "MaxPool"]


def prepare_for_int8(path: str, output: str, backbones: Sequence[str]) -> List[str]:
    """Give every Conv its own weight and bias initializers: the class and box heads are shared by all levels,
    and the exporter dedups equal tensors behind Identity nodes, while the quantizer only quantizes a direct
    initializer, and only for its first user. Returns the nodes to keep float."""
    import onnx
    proto = onnx.load(path)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    seen = set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        for k, name in enumerate(node.input[1:], 1):
            if name in identity:
                name = node.input[k] = identity[name]
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name}"
                graph.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)
    onnx.save(proto, output)
    keep_float = [f"/{b}/body/" for b in backbones if b in FLOAT_BODIES]
    return [n.name for n in graph.node
            if not n.name.startswith("/model/") or any(k in n.name for k in keep_float)]


def quantize_int8(fp32: str, output: str, cfg: ExportConfig, size: Tuple[int, int], meta: dict) -> None:
    """Static post-training INT8 in QDQ format with MinMax calibration on real images; Q/DQ inside the network
    only (decode/NMS stay float). Raw heads, for TensorRT (symmetric INT8 only): symmetric INT8 activations and
    per-channel weights. End-to-end (or a rotated model's heads without --raw-heads), for ONNX Runtime on CPU:
    asymmetric UINT8 activations, so ReLU/ReLU6 fold
    into QLinearConv, and 7-bit (reduce_range) per-channel weights, which avoid the int16 saturation of U8S8
    kernels on CPUs without VNNI. Ranges are cached in --calibration-table."""
    symmetric = cfg.raw_heads
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    table = cfg.calibration_table or None
    reader = None
    if not (table and os.path.isfile(table)):
        wanted = cfg.calibration_batches * cfg.batch
        dataset = calibration_dataset(cfg.calibration_images, size, wanted, meta)
        # a dynamic graph sees each image at its own size: batches of one, so no padding skews the ranges
        batch, batches = (1, wanted) if meta.get("dynamic") else (cfg.batch, cfg.calibration_batches)
        reader = _CalibrationReader(dataset, batch=batch, batches=batches, size_divisible=meta["size_divisible"])
    else:
        log.info(f"reusing calibration table {table}")
    untied = os.path.splitext(output)[0] + "-untied.onnx"
    keep_float = prepare_for_int8(fp32, untied, meta["backbones"])
    quantize_static(untied, output, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, reduce_range=not symmetric,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=table,
                    nodes_to_exclude=keep_float,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    if table:
        log.info(f"calibration table: {table}")


def export(cfg: ExportConfig) -> None:
    import onnx
    check_writable(cfg.output, "the export output", "model.onnx")   # before the work, not after it
    ext = os.path.splitext(cfg.output)[1].lower()
    if ext == ".plan":
        return export_plan(cfg)
    if ext != ".onnx":
        raise OdtkError(f"{cfg.output}: unknown export target (use .onnx or .plan)")
    model, state = Model.load(cfg.model)
    check_rotated_flag(cfg.rotated_bbox, cfg.model, model.config.rotated, "export a rotated model")
    size = export_size(cfg.size, model.config.size_divisible)
    # ONNX has no rotated NMS: a rotated model's graph is its raw heads, which ONNX Runtime inference decodes after
    raw = cfg.raw_heads or model.config.rotated
    flavour = "raw" if raw else "end2end"
    preprocess = preprocess_sizes(cfg, state)
    shape = (f"dynamic height and width (traced at {size[0]}x{size[1]}; inference resizes to {preprocess[0]}, "
             f"max {preprocess[1]})" if cfg.dynamic_size else f"{size[0]}x{size[1]}")
    if not raw:
        kind = "end-to-end"
    elif model.config.rotated and not cfg.raw_heads:
        kind = "rotated raw heads (decode and rotated NMS run after the graph)"
    else:
        kind = "raw heads"
    log.info(f"exporting {cfg.model} -> {cfg.output} ({kind}, {shape}, opset {cfg.opset}"
             f"{', INT8' if cfg.int8 else ''})")
    with tempfile.TemporaryDirectory() as tmp, \
            progress(total=3 if cfg.int8 else 1, desc="export", unit="step") as bar:
        fp32 = os.path.join(tmp, "fp32.onnx")
        export_onnx(model, fp32 if cfg.int8 else cfg.output, size=size, raw_heads=raw, batch=cfg.batch,
                    opset=cfg.opset, dynamic=cfg.dynamic_size, preprocess=preprocess)
        bar.update(1)
        if not cfg.int8:
            return
        quantized = os.path.join(tmp, "int8.onnx")
        meta = metadata(model, size, flavour, dynamic=cfg.dynamic_size, preprocess=preprocess)
        quantize_int8(fp32, quantized, cfg, size, meta)
        bar.update(1)
        meta["int8"] = "s8s8 symmetric" if cfg.raw_heads else "u8s8 reduce-range"
        save_checked(onnx.load(quantized), cfg.output, meta)
        bar.update(1)


def batch_profile(cfg: ExportConfig) -> Tuple[int, int, int]:
    """TensorRT's (min, opt, max) batch: --dynamic-batch-opts, else 1..--batch tuned for --batch."""
    opts = tuple(cfg.dynamic_batch_opts) if cfg.dynamic_batch_opts else (1, cfg.batch, cfg.batch)
    if not 0 < opts[0] <= opts[1] <= opts[2]:
        raise OdtkError(f"--dynamic-batch-opts {' '.join(map(str, opts))}: need 0 < MIN <= OPT <= MAX")
    return opts


def size_profile(cfg: ExportConfig, divisible: int, preprocess: Tuple[int, int]) -> Tuple[Size, Size, Size]:
    """A --dynamic-size plan's (min, opt, max) input (height, width): --dynamic-size-opts, each side a multiple of
    `divisible`, else what inference at (resize, max_size) `preprocess` gives: from one stride up to the padded
    max_size square (resized images never exceed max_size on either side), tuned for a landscape image at the
    resize (the size `odtk info` counts GFLOPs at)."""
    if cfg.dynamic_size_opts is None:
        resize, max_size = preprocess
        top = padded(max_size, divisible)
        return (divisible, divisible), (padded(min(resize, max_size), divisible), top), (top, top)
    opts = cfg.dynamic_size_opts
    if any(side % divisible for size in opts for side in size):
        raise OdtkError(f"--dynamic-size-opts {' '.join(f'{h}x{w}' for h, w in opts)}: each side must be a multiple "
                        f"of {divisible} (the model's size_divisible: inputs are padded to it)")
    return opts


def export_plan(cfg: ExportConfig) -> None:
    """Raw-heads ONNX (FP16 network unless --full-precision; the Q/DQ INT8 graph with --int8) -> odtk._C.Engine
    with the decode/NMS plugins -> plan, written to a temp file and renamed. --dynamic-size: the ONNX has symbolic
    height and width, and the engine takes any within size_profile (traced at its opt)."""
    from .extension import engine_class
    engine = engine_class()   # fail in one line before minutes of work when TensorRT is absent
    opts = batch_profile(cfg)
    model, state = Model.load(cfg.model)
    check_rotated_flag(cfg.rotated_bbox, cfg.model, model.config.rotated, "export a rotated model")
    mc = model.config
    preprocess = preprocess_sizes(cfg, state)
    if cfg.dynamic_size:
        sizes = size_profile(cfg, mc.size_divisible, preprocess)
        size = sizes[1]
        shape = (f"dynamic {'x'.join(map(str, sizes[0]))} to {'x'.join(map(str, sizes[2]))}, tuned for "
                 f"{size[0]}x{size[1]}; inference resizes to {preprocess[0]}, max {preprocess[1]}")
    else:
        size = export_size(cfg.size, mc.size_divisible)
        sizes, shape = (size, size, size), f"{size[0]}x{size[1]}"
    fp16 = not cfg.full_precision and not cfg.int8
    precision = "INT8" if cfg.int8 else "FP16" if fp16 else "FP32"
    log.info(f"exporting {cfg.model} -> {cfg.output} (TensorRT {precision}, {shape}, batch "
             f"{opts[0]}/{opts[1]}/{opts[2]})")
    meta = metadata(model, size, "plan", dynamic=cfg.dynamic_size, preprocess=preprocess)
    meta.update(top_n=mc.top_n, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "raw.onnx")
        if cfg.int8:
            export(replace(cfg, output=onnx_path, raw_heads=True, size=size, dynamic_size_opts=None))
        else:
            export_onnx(model, onnx_path, size=size, raw_heads=True, batch=opts[1], opset=cfg.opset, half=fp16,
                        dynamic=cfg.dynamic_size, preprocess=preprocess)
        with open(onnx_path, "rb") as f:
            onnx_bytes = f.read()
        anchors = [cell.flatten().tolist() for cell in model.cell_anchors]
        try:
            built = engine.build(onnx_bytes, size_opts=[list(s) for s in sizes], dynamic_size=cfg.dynamic_size,
                                 anchors=anchors,
                                 strides=[float(s) for s in model.strides], score_threshold=mc.threshold,
                                 top_n=mc.top_n, nms_threshold=mc.nms, detections=mc.detections, fp16=fp16,
                                 int8=cfg.int8, batch_opts=list(opts), metadata=json.dumps(meta),
                                 verbose=cfg.verbose)
        except RuntimeError as e:
            raise OdtkError(f"{cfg.output}: TensorRT build failed: {str(e).splitlines()[0][:300]}") from None
        with atomic_path(cfg.output, ".plan") as partial:
            built.save(partial)
    log.info(f"{cfg.output}: TensorRT engine, max batch {built.max_batch}, {built.max_detections} detections")
