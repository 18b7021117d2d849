"""`odtk.Detector`: one object for every model format (.pth, .onnx, .plan) and every kind of image.

    >>> import odtk
    >>> detector = odtk.Detector.load("model.pth")            # or model.onnx / model.plan
    >>> found = detector("photo.jpg")                          # a path, PIL image, HWC uint8 array or CHW tensor
    >>> found.boxes, found.scores, found.labels, found.names   # xyxy in the photo's pixels, category ids
    >>> results = detector.predict(["a.jpg", "b.png"], batch_size=8, score_threshold=0.3)
    >>> results = detector.predict("list.txt")                 # also a folder, a glob ("imgs/*.jpg"), a video
    >>> frames = detector.predict_video("clip.mp4", output_video="seen.mp4")   # one Detections per frame

The detector owns resize, normalisation, padding and the mapping back to original pixels, with the very code that
`odtk infer` runs (`odtk infer` is a loop over `Detector.detect_batch`), so both give the same boxes.
"""
import glob
import itertools
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.ops import batched_nms

from . import rotated as rotated_ops
from .checks import check_box_kind
from .constants import category_ids_or_default
from .data import CocoDataset, collate, find_images, load_image, normalize_image, resize_image, scaled_size
from .draw import draw_detections
from .onnx_meta import read_metadata
from .utils import OdtkError, cpu_threads, log
from .video import is_video, read_frames, video_info, video_writer

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, Tensor]
Images = Union[ImageInput, Sequence[ImageInput]]
# scores [B, D], boxes [B, D, 4] (a rotated model's [B, D, 5]: x1, y1, x2, y2, theta; input pixels), classes [B, D]
Outputs = Tuple[Tensor, Tensor, Tensor]

GLOB_CHARS = ("*", "?", "[")
LIST_EXTENSIONS = (".txt",)        # a text file of image (or video) paths, one per line
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Detections:
    """What was found in one image: `boxes` [N, 4] x1 y1 x2 y2 in the image's own pixels, or for a rotated model
    [N, 5] x1 y1 x2 y2 theta (the box before its turn about its centre, radians; odtk.rotated), `scores` [N],
    `labels` [N] dataset category ids, `names` their class names; sorted by decreasing score."""
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: List[str]
    image_size: Tuple[int, int]          # (height, width) of the image as displayed
    source: Optional[str] = None         # the file, when the image came from one
    frame: Optional[int] = None          # a video frame's index (from 0) ...
    time: Optional[float] = None         # ... and time in seconds

    def __len__(self) -> int:
        return len(self.scores)

    def _shapes(self) -> List[dict]:
        """Per detection {"bbox": [x, y, w, h]} rounded as `odtk infer` writes it; a rotated box (ODTK's rotated
        output) {"bbox": [x, y, w, h, theta], "segmentation": [[x1, y1, ..., x4, y4]]}: theta to 5 decimals and
        the 4 corners of odtk.rotated.corners, to 2 like the coordinates."""
        shapes = [{"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2),
                            *(round(t, 5) for t in theta)]}
                  for x1, y1, x2, y2, *theta in self.boxes.tolist()]
        if self.boxes.shape[-1] == 5:
            for shape, points in zip(shapes, rotated_ops.corners(self.boxes.double()).flatten(1).tolist()):
                shape["segmentation"] = [[round(v, 2) for v in points]]
        return shapes

    def _rounded(self) -> Iterator[Tuple[dict, float, int, str]]:
        """(_shapes' bbox [and segmentation], score, category id, name) per detection, rounded as `odtk infer`
        writes them."""
        scores = [round(s, 5) for s in self.scores.tolist()]
        return zip(self._shapes(), scores, self.labels.tolist(), self.names)

    def to_coco(self, image_id: int) -> List[dict]:
        """COCO result rows (bbox x, y, w, h; rotated: x, y, w, h, theta and the corners as segmentation), rounded
        as `odtk infer` writes them."""
        return [{"image_id": image_id, "category_id": label, **shape, "score": score}
                for shape, score, label, _ in self._rounded()]

    def to_frame(self) -> dict:
        """A video frame's JSON line: {"frame", "time", "detections": [{"bbox", "score", "category_id", "name"}]}
        (rotated boxes: "segmentation" after "bbox", as in to_coco)."""
        return {"frame": self.frame, "time": None if self.time is None else round(self.time, 4),
                "detections": [{**shape, "score": score, "category_id": label, "name": name}
                               for shape, score, label, name in self._rounded()]}


@dataclass
class Thresholds:
    """Post-processing limits: score threshold, class-aware NMS IoU, detections kept per image."""
    score: float = 0.05
    nms: float = 0.5
    detections: int = 100

    def check(self) -> "Thresholds":
        for name, value in (("score_threshold", self.score), ("nms_iou", self.nms)):
            if not 0 <= value <= 1:
                raise OdtkError(f"{name} {value}: must be between 0 and 1")
        if self.detections < 1:
            raise OdtkError(f"max_detections {self.detections}: must be at least 1")
        return self


class Backend:
    """A model that maps a normalised, padded batch to (scores, boxes, classes) in input pixels, on the CPU.

    Attributes describe its preprocessing and classes; `fit` is the fixed (height, width) of a fixed-size model
    (images are scaled to fit inside it), None when it takes any size (multiples of `size_divisible`); `rotated`:
    its boxes are rotated ones (x1, y1, x2, y2, theta).
    """
    kind = "?"
    rotated: bool = False
    category_ids: List[int]
    class_names: Optional[List[str]] = None
    mean: List[float]
    std: List[float]
    size_divisible: int = 32
    fit: Optional[Tuple[int, int]] = None
    max_batch: Optional[int] = None
    defaults: Thresholds
    resize: int = 800
    max_size: int = 1333
    # batch portrait and landscape images apart (a dynamic-size TensorRT engine runs at each batch's padded size:
    # a mixed batch would pay for a near-square one)
    group_shapes: bool = False

    def __call__(self, images: Tensor, limits: Thresholds) -> Outputs:
        raise NotImplementedError


class TorchBackend(Backend):
    """A PyTorch `Model` on a device, fp32 or autocast fp16/bf16. The network runs channels-last (NHWC: tensor-core
    and oneDNN convolutions without layout changes); on a GPU decode + NMS run on odtk._C's kernels when built;
    `compile` runs it through torch.compile (a slow first batch per input size, faster ones after)."""
    kind = "PyTorch"

    def __init__(self, model, *, device: Optional[Union[str, torch.device]] = None, precision: Optional[str] = None,
                 resize: int = 800, max_size: int = 1333, compile: bool = False):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or ("fp16" if device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise OdtkError(f"precision '{precision}': use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and device.type != "cuda":
            raise OdtkError("precision fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        # channels-last (NHWC) on both: cuDNN's tensor cores and oneDNN's native layout take it without reorders
        # (ResNet50FPN on 2 CPU cores: 1.26x; MobileNetV2FPN: 1.03x; benchmarks/bench_model.py)
        self.model = model.to(device).eval()
        self.model.to(memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if compile else self.model
        self.device, self.precision = device, precision
        mc = model.config
        self.category_ids = category_ids_or_default(mc.category_ids, mc.num_classes)
        self.class_names, self.mean, self.std = mc.class_names, mc.mean, mc.std
        self.size_divisible, self.rotated = mc.size_divisible, mc.rotated
        self.defaults = Thresholds(mc.threshold, mc.nms, mc.detections)
        self.resize, self.max_size = resize, max_size

    @torch.inference_mode()
    def __call__(self, images: Tensor, limits: Thresholds) -> Outputs:
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            heads = self.network(images)
        heads = ([h.float() for h in heads[0]], [h.float() for h in heads[1]])
        out = self.model.detect(heads, tuple(images.shape[-2:]), threshold=limits.score, nms=limits.nms,
                                detections=limits.detections)
        return tuple(t.cpu() for t in out)


def _tighten(out: Outputs, limits: Thresholds, baked: Thresholds) -> Outputs:
    """Apply per-call limits to the output of a graph whose own limits are baked in (ONNX, TensorRT). They can
    only be made stricter: a higher score threshold, fewer detections, or a lower NMS IoU (a second class-aware
    NMS over what the graph kept)."""
    if limits.score < baked.score or limits.nms > baked.nms or limits.detections > baked.detections:
        raise OdtkError(f"this model's graph keeps score > {baked.score}, NMS IoU {baked.nms}, {baked.detections} "
                        f"detections: per-call limits can only be stricter (re-export from the .pth to loosen)")
    scores, boxes, classes = out
    scores = scores * (scores > limits.score)
    if limits.nms < baked.nms:
        for i in range(scores.shape[0]):
            valid = (scores[i] > 0).nonzero()[:, 0]
            keep = valid[_class_nms(scores[i, valid].float(), boxes[i, valid].float(), classes[i, valid],
                                    limits.nms)]
            dropped = torch.ones_like(scores[i], dtype=torch.bool)
            dropped[keep] = False
            scores[i, dropped] = 0
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    order = order[:, :limits.detections]
    return (scores[:, :limits.detections], boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, boxes.shape[-1])),
            classes.gather(1, order))


def _class_nms(scores: Tensor, boxes: Tensor, classes: Tensor, iou: float) -> Tensor:
    """The indices class-aware NMS keeps of one image's detections (rotated ones [N, 5] on the rotated IoU)."""
    if boxes.shape[-1] == 5:
        return rotated_ops.nms_rotated_keep(torch.zeros_like(classes), scores, boxes, classes, iou_threshold=iou,
                                            detections=len(scores))
    return batched_nms(boxes, scores, classes, iou)


class OnnxBackend(Backend):
    """An end-to-end ONNX graph (decode and NMS inside) in ONNX Runtime, or a rotated model's raw heads (ONNX has
    no rotated NMS) followed by odtk.rotated's decode_rotated and nms_rotated here, with the anchors its metadata
    describes (RawHeadsDecoder). A fixed-size graph fits every image into its size; a dynamic-size one (export
    --dynamic-size) takes each image resized and padded as TorchBackend does, by the resize/max_size of its
    metadata (what the model was trained at) unless the caller gives them."""
    kind = "ONNX Runtime"

    def __init__(self, path: str):
        meta = read_metadata(path)
        self.rotated = bool(meta.get("rotated"))
        if meta["flavour"] != "end2end" and not self.rotated:
            raise OdtkError(f"{path}: a raw-heads ONNX (for TensorRT) has no decode/NMS; export the default "
                            f"end-to-end graph for ONNX Runtime: odtk export model.pth model.onnx")
        self.session = onnx_session(path)
        _describe(self, meta)
        self.decoder = RawHeadsDecoder(meta) if self.rotated else None
        self.fit = None if meta.get("dynamic") else tuple(meta["size"])
        self.kind = f"ONNX Runtime {self.session.get_providers()[0]}{' INT8' if meta.get('int8') else ''}"

    def __call__(self, images: Tensor, limits: Thresholds) -> Outputs:
        out = tuple(torch.from_numpy(o) for o in self.session.run(None, {"input_1": np.ascontiguousarray(
            images.numpy())}))
        if self.decoder:
            return self.decoder(out, tuple(images.shape[-2:]), limits)
        return _tighten(out, limits, self.defaults)


class RawHeadsDecoder:
    """Decode and NMS after a raw-heads graph (score_1..N probabilities, box_1..N deltas) on odtk's PyTorch ops,
    as Model.detect runs them: a rotated ONNX model in ONNX Runtime. The anchors are rebuilt from the metadata
    (strides, ratios, scales, angles) for each level's head size, so any input size works."""

    def __init__(self, meta: dict):
        self.top_n = meta.get("top_n", 1000)
        self.strides = meta["strides"]
        self.cells = [rotated_ops.generate_anchors_rotated(s, meta["ratios"], meta["scales"], meta["angles"])
                      for s in self.strides]

    def __call__(self, heads: Sequence[Tensor], image_size: Tuple[int, int], limits: Thresholds) -> Outputs:
        levels = len(self.strides)
        cls_heads, box_heads = list(heads[:levels]), list(heads[levels:])
        anchors = [rotated_ops.grid_anchors_rotated(cell, stride, *head.shape[-2:])
                   for cell, stride, head in zip(self.cells, self.strides, cls_heads)]
        found = rotated_ops.decode_rotated(cls_heads, box_heads, anchors, threshold=limits.score, top_n=self.top_n,
                                           image_size=image_size, sigmoid=False)
        return rotated_ops.nms_rotated(*found, cls_heads[0].shape[0], iou_threshold=limits.nms,
                                       detections=limits.detections)


class PlanBackend(Backend):
    """A TensorRT engine (odtk._C.Engine with odtk's decode/NMS plugins), CUDA only. A fixed-size engine fits
    every image into its size; a dynamic-size one (export --dynamic-size) takes each image resized as a .pth is,
    by its metadata's resize/max_size unless the caller gives them, each batch padded to at least the smallest
    input of its size profile."""
    kind = "TensorRT"

    def __init__(self, engine, *, device: Union[str, torch.device] = "cuda"):
        import json
        self.engine, self.device = engine, torch.device(device)
        meta = json.loads(engine.metadata)
        _describe(self, meta)
        self.max_batch = engine.max_batch
        self.dynamic = bool(engine.dynamic_size)
        low, _, high = (tuple(size) for size in engine.size_profile)
        self.smallest, self.largest = low, high
        self.fit, self.group_shapes = (None, True) if self.dynamic else (tuple(engine.input_size), False)
        self.kind = f"TensorRT {meta.get('precision', '')}".strip()

    @classmethod
    def load(cls, path: str, *, verbose: bool = False) -> "PlanBackend":
        from .extension import engine_class
        engine_type = engine_class()
        if not torch.cuda.is_available():
            raise OdtkError(f"{path}: TensorRT engines run on a CUDA GPU and none is available")
        try:
            return cls(engine_type.load(path, verbose))
        except RuntimeError as e:
            raise OdtkError(f"{path}: {str(e).splitlines()[0][:300]}") from None

    def fitted(self, images: Tensor) -> Tensor:
        """A dynamic-size engine's batch, padded (zeros, bottom/right, as collate pads) up to the profile's min;
        one larger than its max is refused in one line."""
        h, w = images.shape[-2:]
        if h > self.largest[0] or w > self.largest[1]:
            raise OdtkError(f"a {h}x{w} batch is larger than this engine's largest input, "
                            f"{self.largest[0]}x{self.largest[1]}: infer with --max-size {min(self.largest)} or "
                            f"less, or export with a larger --dynamic-size-opts MAX")
        pad_h, pad_w = max(0, self.smallest[0] - h), max(0, self.smallest[1] - w)
        return torch.nn.functional.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    def __call__(self, images: Tensor, limits: Thresholds) -> Outputs:
        if self.dynamic:
            images = self.fitted(images)
        scores, boxes, classes = self.engine.infer(images.to(self.device, non_blocking=True).contiguous())
        return _tighten((scores.cpu(), boxes.cpu(), classes.long().cpu()), limits, self.defaults)


def onnx_session(path: str):
    """An ONNX Runtime session on CUDA when available, else on every CPU core."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OdtkError(f"{path}: ONNX inference needs onnxruntime (pip install 'odtk[onnx]')") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3       # errors only: ORT's graph clean-up notes are not the user's business
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:
        raise OdtkError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None


def _describe(backend: Backend, meta: dict) -> None:
    """Preprocessing, classes and baked-in limits of an exported model, from its odtk metadata."""
    backend.category_ids, backend.class_names = meta["category_ids"], meta.get("class_names")
    backend.mean, backend.std = meta["mean"], meta["std"]
    backend.size_divisible = meta.get("size_divisible", 32)
    backend.rotated = bool(meta.get("rotated"))
    backend.defaults = Thresholds(meta.get("threshold", 0.05), meta.get("nms", 0.5), meta.get("detections", 100))
    # a dynamic-size model's resize (what it was trained at); a fixed-size one fits images into its size instead
    backend.resize, backend.max_size = meta.get("resize", backend.resize), meta.get("max_size", backend.max_size)


# -- inputs -----------------------------------------------------------------------------------------------------
def expand_inputs(images: Images) -> List[ImageInput]:
    """A path, folder, glob, .txt list of paths or in-memory image, or a list of them -> a flat list of files
    (images and videos: a video stays one item, its frames are read as they are needed) and images."""
    if isinstance(images, (list, tuple)):
        return [item for image in images for item in expand_inputs(image)]
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            return [os.path.join(path, name) for name in find_images(path)]
        if is_list(path) and os.path.isfile(path):
            return read_list(path)
        if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
            found = sorted(glob.glob(path, recursive=True))
            if not found:
                raise OdtkError(f"{path}: no file matches this pattern")
            return found
        if not os.path.isfile(path):
            kind = "video" if is_video(path) else "list" if is_list(path) else "image"
            raise OdtkError(f"{path}: {kind} file not found")
        return [path]
    return [images]


def is_list(path: Union[str, "os.PathLike[str]"]) -> bool:
    """A text file of paths (by its extension)."""
    return os.fspath(path).lower().endswith(LIST_EXTENSIONS)


def read_list(path: str) -> List[str]:
    """The files a text file lists, one per line, relative to the text file's folder (absolute ones as they are);
    blank lines and lines starting with # are skipped."""
    folder, files = os.path.dirname(path), []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            file = os.path.join(folder, os.path.expanduser(entry))
            if not os.path.isfile(file):
                raise OdtkError(f"{path}, line {number}: {file}: file not found (paths are relative to the list's "
                                f"folder)")
            files.append(file)
    if not files:
        raise OdtkError(f"{path}: lists no files (give one image path per line)")
    return files


def decoded(items: Iterable[ImageInput]) -> Iterator[Tuple[Tensor, Optional[str], Optional[int], Optional[float]]]:
    """(uint8 [3, H, W], source file, frame index, time) for each image, and for each frame of each video, read
    only as they are consumed (a long video is never held in memory)."""
    for item in items:
        if is_video(item):
            for frame, (image, time) in enumerate(read_frames(os.fspath(item))):
                yield image, os.fspath(item), frame, time
        else:
            yield to_uint8(item), os.fspath(item) if isinstance(item, (str, os.PathLike)) else None, None, None


def to_uint8(image: ImageInput) -> Tensor:
    """Any supported image -> uint8 RGB [3, H, W] as displayed (EXIF orientation applied, as the loaders do)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(os.fspath(image))
        except Exception as e:
            raise OdtkError(f"{os.fspath(image)}: cannot read image ({e.__class__.__name__})") from None
    if isinstance(image, Image.Image):
        image = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise OdtkError(f"numpy image of shape {image.shape}: expected H x W x 3 (RGB)")
        image = torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)   # a copy: arrays may be read-only
    if not isinstance(image, Tensor):
        raise OdtkError(f"{type(image).__name__}: not an image (give a path, PIL image, numpy array or tensor)")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise OdtkError(f"tensor of shape {tuple(image.shape)}: expected C x H x W with 1 or 3 channels")
    if image.is_floating_point():      # 0-1 floats: back to the 8-bit grid the model was trained on
        image = image.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise OdtkError(f"tensor of dtype {image.dtype}: use uint8 (0-255) or float (0-1)")
    return image.cpu().expand(3, -1, -1).contiguous()


def shape_groups(sizes: Sequence[Tuple[int, int]], group: bool) -> List[List[int]]:
    """The indices of `sizes` (height, width) batched together: all at once, or with `group` the landscape (and
    square) ones apart from the portrait ones, so neither is padded to the other's shape; input order within."""
    if not group:
        return [list(range(len(sizes)))]
    portrait = [h > w for h, w in sizes]
    return [idx for idx in ([i for i, p in enumerate(portrait) if not p], [i for i, p in enumerate(portrait) if p])
            if idx]


def prepare(image: Tensor, *, resize: int, max_size: int, fit: Optional[Tuple[int, int]], mean: Sequence[float],
            std: Sequence[float]) -> Tuple[Tensor, float]:
    """uint8 [3, H, W] -> the normalised model input (unpadded) and its scale, as CocoDataset makes it."""
    size, ratio = scaled_size(image.shape[1], image.shape[2], resize=resize, max_size=max_size, fit=fit)
    return normalize_image(resize_image(image, size), mean, std), ratio


# -- the detector ---------------------------------------------------------------------------------------------------
class Detector:
    """Detect objects with a .pth, .onnx or .plan model; see the module docstring for an example."""

    def __init__(self, backend: Backend, *, score_threshold: Optional[float] = None, nms_iou: Optional[float] = None,
                 max_detections: Optional[int] = None):
        self.backend = backend
        d = backend.defaults
        self.limits = Thresholds(d.score if score_threshold is None else score_threshold,
                                 d.nms if nms_iou is None else nms_iou,
                                 d.detections if max_detections is None else max_detections).check()
        self._warned: set = set()

    @classmethod
    def load(cls, path: str, *, device: Optional[Union[str, torch.device]] = None, precision: Optional[str] = None,
             compile: bool = False, verbose: bool = False, **limits) -> "Detector":
        """A .pth checkpoint (EMA weights when it has them), an end-to-end .onnx (ONNX Runtime) or a .plan
        (TensorRT). `device`/`precision`/`compile` apply to .pth models (default: CUDA fp16 when present, else CPU
        fp32; compile: torch.compile the network)."""
        ext = os.path.splitext(os.fspath(path))[1].lower()
        if ext in (".onnx", ".plan") and not os.path.isfile(path):
            raise OdtkError(f"{path}: model file not found")
        if ext == ".onnx":
            return cls(OnnxBackend(path), **limits)
        if ext == ".plan":
            return cls(PlanBackend.load(path, verbose=verbose), **limits)
        from .fuse import fuse_conv_bn
        from .model import Model, training_resize
        model, state = Model.load(path)
        fuse_conv_bn(model)     # a fresh model, only ever run: fold its BatchNorms into the convolutions
        resize, max_size = training_resize(state)
        return cls(TorchBackend(model, device=device, precision=precision, resize=resize, max_size=max_size,
                                compile=compile), **limits)

    @classmethod
    def from_model(cls, model, **kwargs) -> "Detector":
        """A detector around a `Model` in memory (device, precision, resize, max_size and limits as keywords)."""
        limits = {k: kwargs.pop(k) for k in ("score_threshold", "nms_iou", "max_detections") if k in kwargs}
        return cls(TorchBackend(model, **kwargs), **limits)

    # -- what the model is ----------------------------------------------------------------------------------------
    @property
    def category_ids(self) -> List[int]:
        return self.backend.category_ids

    @property
    def class_names(self) -> List[str]:
        names = self.backend.class_names or [str(c) for c in self.category_ids]
        return list(names) + [str(i) for i in range(len(names), len(self.category_ids))]

    def __repr__(self) -> str:
        return (f"Detector({self.backend.kind}, {len(self.category_ids)} classes, "
                f"{'input %dx%d' % self.backend.fit if self.backend.fit else 'any input size'})")

    # -- predicting ---------------------------------------------------------------------------------------------
    def __call__(self, images: Images, **kwargs) -> Union[Detections, List[Detections]]:
        """`predict`; a single image (not in a list, nor a folder, glob, list file or video) gives a single result."""
        results = self.predict(images, **kwargs)
        many = isinstance(images, (str, os.PathLike)) and (
            not os.path.isfile(images) or is_video(images) or is_list(images))
        single = not isinstance(images, (list, tuple)) and len(results) == 1 and not many
        return results[0] if single else results

    def predict(self, images: Images, *, batch_size: int = 8, resize: Optional[int] = None,
                max_size: Optional[int] = None, **limits) -> List[Detections]:
        """One `Detections` per image, in input order. `resize` (shorter side) and `max_size` default to the
        model's training values; limits: score_threshold, nms_iou, max_detections."""
        return list(self.iter_predict(images, batch_size=batch_size, resize=resize, max_size=max_size, **limits))

    def iter_predict(self, images: Images, *, batch_size: int = 8, resize: Optional[int] = None,
                     max_size: Optional[int] = None, **limits) -> Iterator[Detections]:
        """`predict` as a generator: for long lists and video frames."""
        for _, found in self.iter_predict_pixels(images, batch_size=batch_size, resize=resize, max_size=max_size,
                                                 **limits):
            yield found

    def iter_predict_pixels(self, images: Images, *, batch_size: int = 8, resize: Optional[int] = None,
                            max_size: Optional[int] = None, **limits) -> Iterator[Tuple[Tensor, Detections]]:
        """`iter_predict` with each image as the model saw it (uint8 [3, H, W]): to draw on without reading it
        again. A video gives one pair per frame (Detections.frame and .time set)."""
        if batch_size < 1:
            raise OdtkError(f"batch_size {batch_size}: must be at least 1")
        b = self.backend
        batch_size = min(batch_size, b.max_batch or batch_size)
        resize, max_size = resize or b.resize, max_size or b.max_size
        stream = decoded(expand_inputs(images))
        while True:
            chunk = list(itertools.islice(stream, batch_size))
            if not chunk:
                return
            prepared = [prepare(x, resize=resize, max_size=max_size, fit=b.fit, mean=b.mean, std=b.std)
                        for x, _, _, _ in chunk]
            found: List[Optional[Detections]] = [None] * len(chunk)
            for group in shape_groups([tuple(x.shape[1:]) for x, _ in prepared], b.group_shapes):
                batch = collate([(prepared[i][0], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), i,
                                  prepared[i][1]) for i in group], b.size_divisible, b.fit)
                results = self.detect_batch(batch[0], batch[4], [tuple(chunk[i][0].shape[1:]) for i in group],
                                            sources=[chunk[i][1] for i in group], **limits)
                for i, f in zip(group, results):
                    found[i] = f
            for (x, _, frame, time), f in zip(chunk, found):
                f.frame, f.time = frame, time
                yield x, f

    def predict_video(self, path: str, **kwargs) -> List[Detections]:
        """`iter_video` as a list: one `Detections` per frame."""
        return list(self.iter_video(path, **kwargs))

    def iter_video(self, path: str, *, output_video: Optional[str] = None, draw_threshold: float = 0.3,
                   batch_size: int = 8, resize: Optional[int] = None, max_size: Optional[int] = None,
                   **limits) -> Iterator[Detections]:
        """The detections of each frame of a video (.mp4 .avi .mov .mkv .webm; needs PyAV), frames decoded and
        batched as they go. `output_video`: also write an annotated H.264 .mp4 (same frame rate and size, boxes
        of score >= `draw_threshold`), which appears once the last frame is through."""
        if not is_video(path):
            raise OdtkError(f"{path}: not a video (give a .mp4, .avi, .mov, .mkv or .webm file)")
        kwargs = dict(batch_size=batch_size, resize=resize, max_size=max_size, **limits)
        if output_video is None:
            yield from self.iter_predict(path, **kwargs)
            return
        info = video_info(path)
        with video_writer(output_video, fps=info.fps, size=info.size) as write:
            for pixels, found in self.iter_predict_pixels(path, **kwargs):
                write(draw_detections(pixels, found, class_names=self.class_names, threshold=draw_threshold))
                yield found

    def detect_batch(self, images: Tensor, ratios: Tensor, sizes: Sequence[Tuple[int, int]], *,
                     sources: Optional[Sequence[Optional[str]]] = None, score_threshold: Optional[float] = None,
                     nms_iou: Optional[float] = None, max_detections: Optional[int] = None) -> List[Detections]:
        """A prepared batch (what odtk's loaders yield: normalised, padded images and each image's scale) ->
        results in original pixels, clipped to each image's own `sizes` (height, width)."""
        limits = Thresholds(self.limits.score if score_threshold is None else score_threshold,
                            self.limits.nms if nms_iou is None else nms_iou,
                            self.limits.detections if max_detections is None else max_detections).check()
        scores, boxes, classes = self.backend(images, limits)
        sources = sources or [None] * len(sizes)
        return [self._result(s, b, c, float(r), size, src)
                for s, b, c, r, size, src in zip(scores, boxes, classes, ratios.tolist(), sizes, sources)]

    def _result(self, scores: Tensor, boxes: Tensor, classes: Tensor, ratio: float, size: Tuple[int, int],
                source: Optional[str]) -> Detections:
        keep = scores > 0
        known = classes < len(self.category_ids)
        if bool((keep & ~known).any()):
            self._warn_unknown(classes[keep & ~known])
        keep &= known
        h, w = size
        boxes = boxes[keep].float()
        if boxes.shape[1] == 5:   # rotated: scaled (theta kept), centres into the image, theta in ODTK's range
            boxes = rotated_ops.clip_centres(torch.cat([boxes[:, :4] / ratio, boxes[:, 4:]], 1), (h, w))
            boxes = rotated_ops.fold(boxes)
        else:
            boxes = boxes / ratio
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),      # each image's own edges,
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)   # not the padded batch's
        classes = classes[keep].long()
        ids = torch.tensor(self.category_ids, dtype=torch.long)[classes]
        names = self.class_names
        return Detections(boxes=boxes, scores=scores[keep].float(), labels=ids,
                          names=[names[c] for c in classes.tolist()], image_size=(h, w), source=source)

    def _warn_unknown(self, classes: Tensor) -> None:
        for c in sorted(set(classes.tolist()) - self._warned):
            log.warning(f"class index {c} has no category id (the model's {len(self.category_ids)} category ids "
                        f"cover indices 0-{len(self.category_ids) - 1}): its detections are dropped")
            self._warned.add(c)

    # -- datasets -------------------------------------------------------------------------------------------------
    def dataset(self, images: str, annotations: Optional[str] = None, *, resize: Optional[int] = None,
                max_size: Optional[int] = None) -> CocoDataset:
        """A CocoDataset preprocessing like this model (for odtk's loaders and `detect_batch`), its class names
        and its kind of boxes (rotated or axis-aligned) checked against the model's."""
        b = self.backend
        dataset = CocoDataset(images, annotations, resize=resize or b.resize, max_size=max_size or b.max_size,
                              fit=b.fit, category_ids=self.category_ids, mean=b.mean, std=b.std, rotated=b.rotated)
        check_box_kind(dataset, f"this {'rotated' if b.rotated else 'axis-aligned'} model",
                       "give rotated annotations, or an axis-aligned model" if b.rotated else
                       "give axis-aligned annotations, or a model trained with --rotated-bbox")
        if b.class_names and dataset.class_names:
            for cat_id, name in zip(self.category_ids, b.class_names):
                if dataset.class_names.get(cat_id, name) != name:
                    raise OdtkError(f"{annotations}: category {cat_id} is '{dataset.class_names[cat_id]}' but the "
                                    f"model's is '{name}' (convert every split with the same --class-names)")
        return dataset
