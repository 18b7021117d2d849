"""NVIDIA DALI loaders (`--with-dali`): the batches of `odtk.data.make_loader`, decoded and augmented by DALI.

One pipeline on DALI's `fn` API for training and inference: `fn.readers.coco` (sharded, shuffled, image ids
kept), decode (`mixed`, i.e. nvJPEG, when CUDA is present, else CPU with `device_id=None`), the optional SSD
crop (`fn.random_bbox_crop`, `fn.slice`), the resize rule of `odtk.data.resize_ratio` with the PyTorch
loader's rounding, flip and colour jitter, normalisation, padding to the stride, and ragged boxes/labels padded
with `fn.pad` so `DALIGenericIterator` can batch them.

Rotated datasets carry each box (x1, y1, x2, y2, theta) through the reader as a "polygon" of three vertices,
(x1, y1), (x2, y2), (theta, 0), which the COCO reader passes on untouched (`polygon_masks`, not `ratio`); the
crop keeps the boxes of `fn.random_bbox_crop`'s kept indices (`fn.segmentation.select_masks`), unclipped.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .constants import CROP_ASPECT, CROP_ATTEMPTS, CROP_SCALING, CROP_THRESHOLDS
from .rotated import crop_reference
from .utils import OdtkError, log

if TYPE_CHECKING:   # odtk.data imports this module (loader_factory): the dataset type is for annotations only
    from .data import CocoDataset

INSTALL = "--with-dali needs NVIDIA DALI: pip install 'odtk[dali]' (nvidia-dali-cuda130)"
OUTPUTS = ["images", "boxes", "labels", "ids", "ratios"]
MAX_CATEGORY_ID = 65535      # fn.lookup_table keys must lie in [0, 65535]


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401  (the error names the extra; DALI itself is imported where it is used)
    except ImportError:
        raise OdtkError(INSTALL) from None


def _reader_annotations(dataset: CocoDataset, folder: str) -> str:
    """The boxes CocoDataset kept (crowd, zero-area and outside boxes dropped, the rest clipped), as COCO JSON
    with the original category ids: both loaders then read the same boxes, and DALI maps the ids itself.

    Rotated: bbox is odtk.rotated.crop_reference's box (what the crop measures), segmentation the box itself as
    three vertices x1, y1, x2, y2, theta, 0 (see the module's docstring).
    """
    images, annotations = [], []
    for image_id in dataset.ids:
        images.append({"id": image_id, "file_name": dataset.files[image_id]})
        boxes = dataset.boxes.get(image_id, torch.zeros(0, dataset.box_columns))
        labels = dataset.labels.get(image_id, torch.zeros(0, dtype=torch.long)).tolist()
        reference = crop_reference(boxes, *dataset.original_size(image_id)[::-1]) if dataset.rotated else boxes
        for (x1, y1, x2, y2), box, label in zip(reference.tolist(), boxes.tolist(), labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": dataset.category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            if dataset.rotated:
                annotations[-1]["segmentation"] = [[*box, 0.0]]
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": c, "name": str(c)} for c in dataset.category_ids]}, f)
    return path


def _round_half_even(x):
    """Python's round() on a DALI float64 node: sizes then equal the PyTorch loader's to the pixel."""
    import nvidia.dali.math as dmath
    r = dmath.floor(x + 0.5)
    odd = r - 2.0 * dmath.floor(r * 0.5)
    return r - odd * (r - x == 0.5)      # a tie rounded up to an odd number goes back down to the even one


def _pipeline(dataset: CocoDataset, annotations: str, *, batch_size: int, training: bool, size_divisible: int,
              rank: int, world_size: int, seed: int, workers: int, gpu: Optional[int]):
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    aug = dataset.augment if training else None
    jitter = dataset.jitter if training else None
    rotated = dataset.rotated

    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=gpu, seed=seed + rank,
                  exec_dynamic=True)
    def coco():
        outputs = fn.readers.coco(
            name="Reader", file_root=dataset.root, annotations_file=annotations, ltrb=True, image_ids=True,
            avoid_class_remapping=True,             # the file's category ids, for the lookup table below
            skip_empty=False, size_threshold=1e-6,  # keep images without boxes and every box CocoDataset kept
            shard_id=rank, num_shards=world_size, random_shuffle=training, seed=seed,
            pad_last_batch=not training,            # whole batches per shard; the iterator drops the padding
            polygon_masks=rotated)                  # rotated: the boxes themselves (_reader_annotations)
        jpegs, boxes, labels, *polygons, ids = outputs
        images = fn.decoders.image(jpegs, device="mixed" if gpu is not None else "cpu", output_type=types.RGB)
        shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT64)    # H, W as displayed (EXIF applied)
        h, w = shape[0], shape[1]
        x0 = y0 = 0.0                       # where the image starts in the original (the crop's corner)
        # boxes: pixels of the original -> [0, 1] (random_bbox_crop and bb_flip work there)
        boxes = boxes / fn.cast(fn.stack(w, h, w, h), dtype=types.FLOAT)
        labels = fn.reshape(labels, shape=[-1])
        if aug is not None and aug.crop:    # before the resize, so the jitter and max_size size the crop
            images, boxes, labels, kept, x0, y0, w, h = _random_crop(images, boxes, labels, w, h)
            if rotated:
                polygons = fn.segmentation.select_masks(kept, *polygons)
        if rotated:
            boxes = _rotated_boxes(polygons[1], x0, y0, w, h)
        if jitter:
            resize = fn.random.uniform(values=[float(v) for v in range(jitter[0], jitter[1] + 1)],
                                       dtype=types.FLOAT64)
        else:
            resize = float(dataset.resize)
        # resize_ratio() step by step in float64: shorter side to `resize`, capped so longer <= max_size
        short, long = dmath.min(w, h), dmath.max(w, h)
        ratio = resize / short
        capped = ratio * long > dataset.max_size
        ratio = capped * (dataset.max_size / long) + (1 - capped) * ratio
        out_h = dmath.max(_round_half_even(h * ratio), 1.0)
        out_w = dmath.max(_round_half_even(w * ratio), 1.0)
        images = fn.resize(images, resize_x=fn.cast(out_w, dtype=types.FLOAT),
                           resize_y=fn.cast(out_h, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR)
        mirror = 0
        if aug is not None and aug.flip:
            mirror = fn.random.coin_flip(probability=0.5)
            boxes = _flip_rotated(boxes, mirror) if rotated else fn.bb_flip(boxes, ltrb=True, horizontal=mirror)
        scale = fn.cast(fn.stack(out_w, out_h, out_w, out_h), dtype=types.FLOAT)     # [0, 1] -> pixels
        if rotated:
            scale = fn.cat(scale, types.Constant([1.0], dtype=types.FLOAT))          # theta stays
        boxes = boxes * scale
        if aug is not None and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
            images = fn.color_twist(images, **_color_args(aug))
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in dataset.mean], std=[255 * s for s in dataset.std])
        images = fn.pad(images, axes=(1, 2), align=size_divisible, fill_value=0)
        boxes = fn.pad(boxes, axes=(0,), fill_value=0)          # collate() pads box rows with 0 ...
        labels = fn.lookup_table(labels, keys=list(dataset.category_ids),
                                 values=list(range(len(dataset.category_ids))), default_value=-1,
                                 dtype=types.INT64)
        labels = fn.pad(labels, axes=(0,), fill_value=-1)       # ... and labels with -1
        return images, boxes, labels, ids, ratio
    return coco()


def _rotated_boxes(vertices, x0, y0, w, h):
    """The rotated boxes of the reader's vertices (x1, y1), (x2, y2), (theta, 0) in pixels of the original ->
    [N, 5] rows x1, y1, x2, y2 in [0, 1] of the image that starts at (x0, y0) of the original and is (w, h)
    pixels (the crop, else the whole), and theta."""
    from nvidia.dali import fn, types
    v = fn.cast(fn.reshape(vertices, shape=[-1, 6]), dtype=types.FLOAT64)
    return fn.cast(fn.stack((v[:, 0] - x0) / w, (v[:, 1] - y0) / h, (v[:, 2] - x0) / w, (v[:, 3] - y0) / h, v[:, 4],
                            axis=1), dtype=types.FLOAT)


def _flip_rotated(boxes, mirror):
    """odtk.data.flip_boxes on [0, 1] rows (x1, y1, x2, y2, theta) where `mirror` is 1."""
    from nvidia.dali import fn
    flipped = fn.stack(1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3], -boxes[:, 4], axis=1)
    return mirror * flipped + (1 - mirror) * boxes


class _Crop(NamedTuple):
    """_random_crop's result: the cropped image; axis-aligned boxes in [0, 1] of it, clipped, and their labels;
    the indices of the kept boxes; the crop's corner and size in pixels of the original (float64)."""
    images: object
    boxes: object
    labels: object
    kept: object
    x: object
    y: object
    w: object
    h: object


def _random_crop(images, boxes, labels, w, h) -> _Crop:
    """odtk.data.random_crop_window's SSD crop with fn.random_bbox_crop: the same thresholds, scaling, aspect
    ratio (in pixels: input_shape) and rule (some box above the threshold), in whole pixels."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types
    anchor, extent, boxes, labels, kept = fn.random_bbox_crop(
        boxes, labels, bbox_layout="xyXY", thresholds=list(CROP_THRESHOLDS), scaling=list(CROP_SCALING),
        aspect_ratio=list(CROP_ASPECT), allow_no_crop=True, num_attempts=CROP_ATTEMPTS,
        all_boxes_above_threshold=False, input_shape=fn.cast(fn.stack(w, h), dtype=types.INT32),
        shape_layout="WH", output_bbox_indices=True)
    anchor, extent = fn.cast(anchor, dtype=types.FLOAT64), fn.cast(extent, dtype=types.FLOAT64)
    # whole pixels as the PyTorch loader's window; the boxes (relative to the exact window) move with it
    x1, y1 = _round_half_even(anchor[0] * w), _round_half_even(anchor[1] * h)
    cw = dmath.max(_round_half_even((anchor[0] + extent[0]) * w) - x1, 1.0)
    ch = dmath.max(_round_half_even((anchor[1] + extent[1]) * h) - y1, 1.0)
    images = fn.slice(images, fn.cast(fn.stack(x1, y1), dtype=types.FLOAT),
                      fn.cast(fn.stack(cw, ch), dtype=types.FLOAT), axis_names="WH", normalized_anchor=False,
                      normalized_shape=False, out_of_bounds_policy="pad")   # float slack at the edge
    scale = fn.cast(fn.stack(extent[0] * w / cw, extent[1] * h / ch), dtype=types.FLOAT)
    shift = fn.cast(fn.stack((anchor[0] * w - x1) / cw, (anchor[1] * h - y1) / ch), dtype=types.FLOAT)
    boxes = dmath.clamp(boxes * fn.cat(scale, scale) + fn.cat(shift, shift), 0.0, 1.0)
    return _Crop(images, boxes, labels, kept, x1, y1, cw, ch)


def _color_args(aug) -> dict:
    """torchvision's factor ranges as DALI's: brightness/contrast/saturation x U(1-a, 1+a), hue in degrees."""
    from nvidia.dali import fn
    args = {}
    for name in ("brightness", "contrast", "saturation"):
        a = getattr(aug, name)
        if a:
            args[name] = fn.random.uniform(range=[1 - a, 1 + a])
    if aug.hue:
        args["hue"] = fn.random.uniform(range=[-360 * aug.hue, 360 * aug.hue])   # TF.adjust_hue: turns
    return args


class DaliLoader:
    """An odtk.data.Loader: iterates one epoch per `for` loop, yielding (images, boxes, labels, ids, ratios) like
    make_loader.

    Training drops the last partial batch (as make_loader); inference returns every image of the shard exactly
    once (DALI's reader pads the shard, the iterator removes the padding). A loop left early resumes where it
    stopped the next time, as DALI iterators do.
    """

    def __init__(self, dataset: CocoDataset, *, batch_size: int, training: bool, size_divisible: int, rank: int,
                 world_size: int, seed: int, workers: int, gpu: Optional[int]):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        self.box_columns = dataset.box_columns
        self._tmp = tempfile.mkdtemp(prefix="odtk-dali-")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        annotations = _reader_annotations(dataset, self._tmp)
        self.device = "cpu" if gpu is None else f"cuda:{gpu}"
        pipe = _pipeline(dataset, annotations, batch_size=batch_size, training=training,
                         size_divisible=size_divisible, rank=rank, world_size=world_size, seed=seed,
                         workers=workers, gpu=gpu)
        self._iterator = DALIGenericIterator(
            [pipe], OUTPUTS, reader_name="Reader", auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL)
        self.sampler = self     # deprecated: for callers that still use loader.sampler.start / .batches
        log.info(f"DALI {'training' if training else 'inference'} loader on {self.device}, "
                 f"shard {rank + 1}/{world_size}, {len(self)} batches per epoch")

    @property
    def batches(self) -> int:
        """Batches per epoch (TrainSampler's name)."""
        return len(self)

    def start(self, epoch: int, batch: int = 0) -> None:
        """Nothing to position: DALI's reader keeps its place and reshuffles every epoch from its own seed, so
        with --with-dali a resumed run sees another image order (exact resume needs the PyTorch loader)."""

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        for out in self._iterator:
            b = out[0]
            boxes, labels = b["boxes"], b["labels"]
            if boxes.shape[1] == 0:         # collate() keeps one (empty) row when no image has a box
                boxes = boxes.new_zeros(boxes.shape[0], 1, self.box_columns)
                labels = labels.new_full((labels.shape[0], 1), -1)
            yield (b["images"], boxes, labels, b["ids"].reshape(-1).long(),
                   b["ratios"].reshape(-1).to(torch.float64))


def make_dali_loader(dataset: CocoDataset, *, batch_size: int, training: bool, workers: int = 2,
                     size_divisible: int = 32, rank: int = 0, world_size: int = 1, seed: int = 0,
                     device: Optional[torch.device] = None) -> DaliLoader:
    """make_loader's batches from DALI: same arguments, same tuple. On `device`: a GPU decodes with nvJPEG and
    yields batches on that GPU (the worker's own, by local rank), the CPU yields CPU batches; default: the current
    GPU when CUDA is present, else the CPU."""
    _import_dali()
    if dataset.fit:
        raise OdtkError("--with-dali: fixed-size (ONNX) models are loaded with the PyTorch loader; drop --with-dali")
    if training and dataset.augment.rotate:
        raise OdtkError("--with-dali: --augment-rotate is not in the DALI pipeline; drop one of the two")
    bad = [c for c in dataset.category_ids if not 0 <= c <= MAX_CATEGORY_ID]
    if bad:
        raise OdtkError(f"--with-dali: category ids {bad[:5]} are outside DALI's lookup range 0..{MAX_CATEGORY_ID}")
    return DaliLoader(dataset, batch_size=batch_size, training=training, size_divisible=size_divisible, rank=rank,
                      world_size=world_size, seed=seed, workers=workers, gpu=_gpu_index(device))


def _gpu_index(device: Optional[torch.device]) -> Optional[int]:
    """The GPU a DALI pipeline runs on (None: the CPU)."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
