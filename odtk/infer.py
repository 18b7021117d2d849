"""Inference over a folder or a COCO file with a .pth (PyTorch), .onnx (ONNX Runtime) or .plan (TensorRT) model:
COCO detections JSON, and COCO AP when annotated. A loop over `odtk.Detector` (the Python API) fed by odtk's
parallel loaders (PyTorch or DALI)."""
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from .data import CocoDataset, image_size, loader_factory
from .detector import Detector
from .distributed import Context, gather
from .checks import check_infer, check_writable
from .evaluate import evaluate
from .model import Model
from .utils import OdtkError, atomic_write_text, log


@dataclass
class InferConfig:
    model: str
    images: str = "."
    annotations: Optional[str] = None
    output: str = "detections.json"
    batch: int = 2
    resize: int = 800
    max_size: int = 1333
    full_precision: bool = False
    loader_workers: int = 2
    with_dali: bool = False
    device: str = "auto"     # a .pth model's device: auto = CUDA when present
    compile: bool = False    # torch.compile the network (.pth)
    verbose: bool = False

    def __post_init__(self) -> None:
        check_infer(self)


class _Sizes:
    """(height, width) as displayed of a dataset's images, from their headers, once each: detections are clipped
    to each image's own edges (the loaders' batches carry only the scale)."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset
        self.known: Dict[int, Tuple[int, int]] = {}

    def __call__(self, ids: List[int]) -> List[Tuple[int, int]]:
        for i in ids:
            if i not in self.known:
                self.known[i] = image_size(os.path.join(self.dataset.root, self.dataset.files[i]))
        return [self.known[i] for i in ids]


def detect_dataset(detector: Detector, dataset: CocoDataset, cfg: InferConfig, ctx: Context = Context()
                   ) -> Tuple[List[dict], int, float]:
    """COCO rows for this rank's shard of `dataset` (batches from odtk's loaders), image count, seconds."""
    loader = loader_factory(cfg.with_dali)(dataset, batch_size=cfg.batch, training=False,
                                           workers=cfg.loader_workers, size_divisible=detector.backend.size_divisible,
                                           rank=ctx.rank, world_size=ctx.world_size,
                                           device=getattr(detector.backend, "device", torch.device("cpu")))
    sizes, rows, count, start = _Sizes(dataset), [], 0, time.time()
    shard = len(range(ctx.rank, len(dataset), ctx.world_size))
    with tqdm(total=shard, desc="infer", unit="img", dynamic_ncols=True, disable=ctx.rank != 0) as bar:
        for batch in loader:
            if batch is None:
                continue
            images, _, _, ids, ratios = batch
            ids = ids.tolist()
            for image_id, found in zip(ids, detector.detect_batch(images, ratios, sizes(ids))):
                rows += found.to_coco(image_id)
            count += len(ids)
            bar.update(len(ids))
    return rows, count, time.time() - start


def run(detector: Detector, dataset: CocoDataset, cfg: InferConfig, ctx: Context = Context()) -> Dict[str, float]:
    """Detections JSON (written atomically) and, when annotated, COCO AP. Distributed: each rank takes its shard,
    rank 0 gathers, writes and evaluates (other ranks return {})."""
    rows, count, elapsed = detect_dataset(detector, dataset, cfg, ctx)
    if ctx.distributed:
        rows, count = gather(rows, ctx), sum(gather([count], ctx))
        if ctx.rank:
            return {}
    atomic_write_text(json.dumps(rows), cfg.output)
    log.info(f"{count} images, {len(rows)} detections in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.2f} im/s) "
             f"-> {cfg.output}")
    if cfg.annotations:
        return evaluate(cfg.annotations, cfg.output)
    return {}


def run_model(model: Model, cfg: InferConfig, ctx: Optional[Context] = None) -> Dict[str, float]:
    """Run a PyTorch model in memory over cfg's images (validation during training: `ctx` gives the worker's
    device and this rank's shard)."""
    device = ctx.device if ctx else None if cfg.device == "auto" else cfg.device
    precision = "fp32" if cfg.full_precision else None
    detector = Detector.from_model(model, device=device, precision=precision, compile=cfg.compile)
    dataset = detector.dataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size)
    return run(detector, dataset, cfg, ctx or Context())


def infer(cfg: InferConfig) -> Dict[str, float]:
    """`odtk infer`: any model format over a folder or a COCO file."""
    check_writable(cfg.output, "--output", "detections.json")   # before the work, not after it
    ext = os.path.splitext(cfg.model)[1].lower()
    detector = Detector.load(cfg.model, device=None if cfg.device == "auto" else cfg.device,
                             precision="fp32" if cfg.full_precision else None, compile=cfg.compile, verbose=cfg.verbose)
    b = detector.backend
    if b.max_batch and cfg.batch > b.max_batch:
        raise OdtkError(f"--batch {cfg.batch}: the engine takes at most {b.max_batch} images "
                        f"(export with --batch or --dynamic-batch-opts)")
    dataset = detector.dataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size)
    if ext in (".onnx", ".plan"):
        log.info(f"{b.kind}, input {'%dx%d' % b.fit if b.fit else 'dynamic (--resize/--max-size)'}")
    return run(detector, dataset, cfg)
