"""Inference over a folder or a COCO file with a .pth (PyTorch), .onnx (ONNX Runtime) or .plan (TensorRT) model:
COCO detections JSON, and COCO AP when annotated. A loop over `odtk.Detector` (the Python API) fed by odtk's
parallel loaders (PyTorch or DALI). Also one image, a glob, a .txt list of paths (COCO rows, no loaders) and a
video (JSON lines, one per frame); --save-images draws what was found."""
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .data import CocoDataset, image_size, load_image, loader_factory
from .constants import IMAGE_EXTENSIONS
from .detector import GLOB_CHARS, LIST_EXTENSIONS, Detections, Detector, expand_inputs
from .distributed import Context, gather
from .checks import check_infer, check_rotated_flag, check_writable
from .draw import GroundTruth, draw_detections, drawn_name, same_file, save_jpeg
from .evaluate import evaluate
from .model import Model
from .progress import progress
from .utils import OdtkError, atomic_path, atomic_write_text, log
from .video import VIDEO_EXTENSIONS, is_video, require_av, video_info

FILE_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS + LIST_EXTENSIONS    # --images forms read without loaders


@dataclass
class InferConfig:
    model: str
    images: str = "."        # a folder, one image, a glob, a .txt list of paths, or a video
    annotations: Optional[str] = None
    output: Optional[str] = None    # default: detections.json; for a video <video stem>.detections.jsonl
    batch: int = 2
    resize: int = 800
    max_size: int = 1333
    full_precision: bool = False
    loader_workers: int = 2
    with_dali: bool = False
    device: str = "auto"     # a .pth model's device: auto = CUDA when present
    compile: bool = False    # torch.compile the network (.pth)
    plots: Optional[str] = None   # folder for evaluation plots (odtk.plots; needs annotations and matplotlib)
    save_images: Optional[str] = None   # folder for the images with their detections drawn (a video: <stem>.mp4)
    draw_threshold: float = 0.3         # the lowest score drawn
    draw_ground_truth: bool = False     # also draw the boxes of `annotations`
    verbose: bool = False
    rotated_bbox: bool = False          # the model must be a rotated one (ODTK's flag; a model file says so itself)

    @property
    def torch_device(self) -> Optional[str]:
        """`device` for Detector.load / TorchBackend: None lets them pick (auto)."""
        return None if self.device == "auto" else self.device

    def __post_init__(self) -> None:
        check_infer(self)
        check_drawing(self)
        if self.output is None:
            self.output = default_output(self.images)


def check_drawing(cfg: InferConfig) -> None:
    """--save-images, --draw-threshold and --draw-ground-truth make sense together."""
    if not (math.isfinite(cfg.draw_threshold) and 0 <= cfg.draw_threshold <= 1):
        raise OdtkError(f"--draw-threshold {cfg.draw_threshold}: must be between 0 and 1")
    if cfg.draw_ground_truth and not cfg.annotations:
        raise OdtkError("--draw-ground-truth draws the boxes of --annotations: give --annotations too")
    if cfg.draw_ground_truth and not cfg.save_images:
        raise OdtkError("--draw-ground-truth: give --save-images DIR too (the folder the drawn images go to)")
    if cfg.save_images and os.path.exists(cfg.save_images) and not os.path.isdir(cfg.save_images):
        raise OdtkError(f"{cfg.save_images}: is a file; --save-images takes a folder for the drawn images")


def default_output(images: str) -> str:
    """--output when not given: <video stem>.detections.jsonl for a video, else detections.json."""
    if is_video(images):
        return os.path.splitext(os.path.basename(images))[0] + ".detections.jsonl"
    return "detections.json"


def is_dataset(cfg: InferConfig) -> bool:
    """Whether --images is read as a dataset (a folder, or the images of --annotations) through odtk's loaders,
    rather than as one file, a glob, a .txt list or a video (a missing path without a file extension odtk reads
    is reported as a missing folder). --annotations with one of those forms is an error."""
    path = cfg.images
    as_file = os.path.isfile(path) or any(c in path for c in GLOB_CHARS) or path.lower().endswith(FILE_EXTENSIONS)
    if cfg.annotations and as_file and not os.path.isdir(path):
        raise OdtkError(f"--images {path}: with --annotations give the folder of the annotated images (one file, "
                        f"a pattern or a list is for images without annotations)")
    return bool(cfg.annotations) or os.path.isdir(path) or not as_file


class ImageSizes:
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
    sizes, rows, count, start = ImageSizes(dataset), [], 0, time.time()
    shard = len(range(ctx.rank, len(dataset), ctx.world_size))
    draw = dataset_drawer(detector, dataset, cfg) if cfg.save_images else None
    with progress(total=shard, desc="infer", unit="img", disable=ctx.rank != 0) as bar:
        for batch in loader:
            if batch is None:
                continue
            images, _, _, ids, ratios = batch
            ids = ids.tolist()
            for image_id, found in zip(ids, detector.detect_batch(images, ratios, sizes(ids))):
                rows += found.to_coco(image_id)
                if draw:
                    draw(image_id, found)
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
    return write_results(rows, count, elapsed, cfg, rotated=detector.backend.rotated)


def write_results(rows: List[dict], count: int, elapsed: float, cfg: InferConfig, *, rotated: bool = False
                  ) -> Dict[str, float]:
    """The detections JSON (atomically), a summary line, and COCO AP when annotated (a rotated model's on the
    rotated IoU)."""
    atomic_write_text(json.dumps(rows), cfg.output)
    log.info(f"{count} images, {len(rows)} detections in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.2f} im/s) "
             f"-> {cfg.output}" + (f"; drawn images -> {cfg.save_images}" if cfg.save_images else ""))
    if cfg.annotations:
        return evaluate(cfg.annotations, cfg.output, rotated=rotated)
    return {}


# -- drawn images (--save-images) -----------------------------------------------------------------------------------
def drawn_targets(folder: str, inputs: Sequence[Tuple[str, str]]) -> List[str]:
    """Where each (input file, its name under the input folder) is drawn to, under `folder`; refused up front
    when one would replace its input (--save-images pointing at the images themselves)."""
    targets = [os.path.join(folder, drawn_name(name, 0)) for _, name in inputs]
    for (source, _), target in zip(inputs, targets):
        refuse_replacing(source, target, folder, "drawn", "image")
    return targets


def refuse_replacing(source: str, target: str, folder: str, what: str, kind: str) -> None:
    """--save-images must not write over its own input."""
    if same_file(source, target):
        raise OdtkError(f"--save-images {folder}: the {what} {target} would replace the input {kind}; "
                        f"give another folder")


def relative_names(files: Sequence[str]) -> List[str]:
    """Each file's path under the deepest folder holding them all (files from several folders keep theirs)."""
    paths = [os.path.abspath(f) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def save_drawn(pixels: Tensor, found: Detections, target: str, cfg: InferConfig, class_names: Sequence[str],
               ground_truth: Optional[GroundTruth] = None) -> None:
    save_jpeg(draw_detections(pixels, found, class_names=class_names, threshold=cfg.draw_threshold,
                              ground_truth=ground_truth), target)


def dataset_drawer(detector: Detector, dataset: CocoDataset, cfg: InferConfig) -> Callable[[int, Detections], None]:
    """--save-images for a dataset: each image read again (the loaders' copies are resized and normalised),
    drawn, with its ground truth for --draw-ground-truth, and saved."""
    paths = {i: os.path.join(dataset.root, dataset.files[i]) for i in dataset.ids}
    targets = dict(zip(dataset.ids, drawn_targets(cfg.save_images, [(paths[i], dataset.files[i])
                                                                     for i in dataset.ids])))
    names = detector.class_names

    def draw(image_id: int, found: Detections) -> None:
        truth = None
        if cfg.draw_ground_truth:       # the dataset's class indices are the model's (dataset() checks them)
            truth = (dataset.boxes[image_id], [names[c] for c in dataset.labels[image_id].tolist()])
        save_drawn(load_image(paths[image_id]), found, targets[image_id], cfg, names, truth)
    return draw


# -- one image, a glob, a list, a video -----------------------------------------------------------------------------
def run_files(detector: Detector, files: Sequence[str], cfg: InferConfig) -> Dict[str, float]:
    """Image files (one image, a glob, a .txt list) through `Detector.iter_predict_pixels`: COCO rows with image
    ids 1..N in the files' order (a glob's sorted order, a list's own: a folder's sorted names get the same
    ids), and with --save-images each file drawn under its path relative to the files' common folder."""
    targets = drawn_targets(cfg.save_images, list(zip(files, relative_names(files)))) if cfg.save_images else None
    rows, start = [], time.time()
    found_images = detector.iter_predict_pixels(files, batch_size=cfg.batch, resize=cfg.resize,
                                                max_size=cfg.max_size)
    with progress(total=len(files), desc="infer", unit="img") as bar:
        for image_id, (pixels, found) in enumerate(found_images, 1):
            rows += found.to_coco(image_id)
            if targets:
                save_drawn(pixels, found, targets[image_id - 1], cfg, detector.class_names)
            bar.update()
    return write_results(rows, len(files), time.time() - start, cfg)


def run_video(detector: Detector, path: str, cfg: InferConfig) -> Dict[str, float]:
    """A video: one JSON line per frame in cfg.output ({"frame", "time", "detections"}), and with --save-images
    the annotated video DIR/<video stem>.mp4 (H.264, the source's frame rate and size). Both are written
    atomically, when the last frame is through."""
    target = None
    if cfg.save_images:
        target = os.path.join(cfg.save_images, os.path.splitext(os.path.basename(path))[0] + ".mp4")
        refuse_replacing(path, target, cfg.save_images, "annotated", "video")
    info = video_info(path)      # PyAV present and the file a video: before the work
    frames, count, start = 0, 0, time.time()
    found_frames = detector.iter_video(path, output_video=target, draw_threshold=cfg.draw_threshold,
                                       batch_size=cfg.batch, resize=cfg.resize, max_size=cfg.max_size)
    with contextlib.closing(found_frames), atomic_path(cfg.output) as tmp, open(tmp, "w") as f, \
            progress(total=info.frames, desc="infer", unit="frame") as bar:
        for found in found_frames:
            f.write(json.dumps(found.to_frame()) + "\n")
            frames, count = frames + 1, count + len(found)
            bar.update()
    elapsed = time.time() - start
    log.info(f"{frames} frames, {count} detections in {elapsed:.1f}s ({frames / max(elapsed, 1e-9):.2f} frames/s) "
             f"-> {cfg.output}" + (f"; annotated video -> {target}" if target else ""))
    return {}


def run_model(model: Model, cfg: InferConfig, ctx: Optional[Context] = None) -> Dict[str, float]:
    """Run a PyTorch model in memory over cfg's images (validation during training: `ctx` gives the worker's
    device and this rank's shard)."""
    device = ctx.device if ctx else cfg.torch_device
    precision = "fp32" if cfg.full_precision else None
    detector = Detector.from_model(model, device=device, precision=precision, compile=cfg.compile)
    dataset = detector.dataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size)
    return run(detector, dataset, cfg, ctx or Context())


def infer(cfg: InferConfig) -> Dict[str, float]:
    """`odtk infer`: any model format over a folder or a COCO file, one image, a glob, a .txt list or a video."""
    check_writable(cfg.output, "--output", "detections.json")   # before the work, not after it
    if cfg.plots:
        check_plots(cfg)
    files = None if is_dataset(cfg) else expand_inputs(cfg.images)
    if files and any(is_video(f) for f in files) and len(files) > 1:
        raise OdtkError(f"--images {cfg.images}: give one video at a time (--images clip.mp4), not in a pattern "
                        f"or list")
    if files and is_video(files[0]):
        require_av(files[0])     # before loading the model
    if files is not None and cfg.with_dali:
        log.warning("--with-dali: reads folders and --annotations datasets only; these images are read without it")
    ext = os.path.splitext(cfg.model)[1].lower()
    detector = Detector.load(cfg.model, device=cfg.torch_device,
                             precision="fp32" if cfg.full_precision else None, compile=cfg.compile, verbose=cfg.verbose)
    b = detector.backend
    check_rotated_flag(cfg.rotated_bbox, cfg.model, b.rotated, "give a rotated model")
    if b.max_batch and cfg.batch > b.max_batch:
        raise OdtkError(f"--batch {cfg.batch}: the engine takes at most {b.max_batch} images "
                        f"(export with --batch or --dynamic-batch-opts)")
    if ext in (".onnx", ".plan"):
        log.info(f"{b.kind}, input {'%dx%d' % b.fit if b.fit else 'dynamic (--resize/--max-size)'}")
    if files is None:
        results = run(detector, detector.dataset(cfg.images, cfg.annotations, resize=cfg.resize,
                                                 max_size=cfg.max_size), cfg)
    else:
        results = run_video(detector, files[0], cfg) if is_video(files[0]) else run_files(detector, files, cfg)
    if cfg.plots:
        from .plots import write_plots
        written = write_plots(cfg.annotations, cfg.output, cfg.plots, results=results)
        if written:
            log.info(f"plots: {', '.join(written)} -> {cfg.plots}")
    return results


def check_plots(cfg: InferConfig) -> None:
    """--plots: matplotlib, ground truth to compare with, a folder to write (before inference, not after)."""
    from .plots import require_matplotlib
    require_matplotlib()
    if not cfg.annotations:
        raise OdtkError(f"--plots {cfg.plots}: needs --annotations (the plots compare detections with them)")
    if os.path.exists(cfg.plots) and not os.path.isdir(cfg.plots):
        raise OdtkError(f"--plots {cfg.plots}: is a file; give a folder for the plots")
