"""`odtk benchmark`: which form to deploy. Exports a .pth checkpoint to every form this machine can run (PyTorch
eager, ONNX Runtime fp32 at a fixed size and at each image's own size (--dynamic-size), ONNX Runtime INT8, TensorRT
FP16 and INT8) and measures each the way users run it: COCO AP through
`odtk infer`'s loop, ms per image at batch 1 and images/s at --batch, and the file's size.

    >>> import odtk
    >>> rows = odtk.benchmark(odtk.BenchmarkConfig(model="model.pth", images="val/", annotations="val.json"))
    >>> print(odtk.benchmark_table(rows))

Timing runs `Detector.detect_batch` on batches prepared beforehand (network, decode, NMS and the mapping back to
image pixels): decoding and resizing the images costs the same in every form, so it is left out.
"""
import contextlib
import importlib.util
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from .checks import at_least
from .data import CocoDataset, collate, scaled_size
from .detector import Detector, TorchBackend
from .export import ExportConfig, export, export_size
from .infer import InferConfig, ImageSizes, run as infer_run
from .utils import OdtkError, log, padded

BATCH1_IMAGES = 16       # batch-1 latency: the median over this many images (or --images-limit, if fewer)
COLUMNS = (("form", "form", "{}"), ("AP", "AP", "{:.4f}"), ("AP50", "AP50", "{:.4f}"),
           ("ms_per_image", "ms/img b1", "{:.1f}"), ("images_per_s", "img/s b{batch}", "{:.1f}"),
           ("size_mb", "MB", "{:.1f}"), ("note", "note", "{}"))


@dataclass
class BenchmarkConfig:
    model: str                                 # the .pth checkpoint
    images: str                                # folder of the images of `annotations` (also INT8 calibration)
    annotations: str                           # COCO file: AP of every form on its images
    size: Optional[Sequence[int]] = None       # ONNX/TensorRT input, square or height width (None: default_size)
    batch: int = 8                             # throughput batch (and the exports' batch)
    calibration_batches: int = 2               # INT8 calibration: this many batches of `batch` images
    images_limit: int = 32                     # images timed (the first ones of `annotations`)
    output_dir: Optional[str] = None           # keep the exports and detections here (None: a temp folder)
    loader_workers: int = 2                    # loader processes for the AP pass
    verbose: bool = False

    def __post_init__(self) -> None:
        check_benchmark(self)


def check_benchmark(cfg: BenchmarkConfig) -> None:
    """Settings that would fail after minutes of exports: refused now, in one line."""
    ext = os.path.splitext(cfg.model)[1].lower()
    if ext in (".onnx", ".plan"):
        raise OdtkError(f"{cfg.model}: odtk benchmark starts from the training checkpoint and exports every form "
                        f"itself: give the .pth")
    at_least("--batch", cfg.batch, 1)
    at_least("--calibration-batches", cfg.calibration_batches, 1)
    at_least("--images-limit", cfg.images_limit, 1)
    at_least("--loader-workers", cfg.loader_workers, 0)
    if cfg.size is not None and (len(cfg.size) not in (1, 2) or min(cfg.size) < 1):
        raise OdtkError(f"--size {' '.join(map(str, cfg.size))}: one side (square) or height width, each >= 1")
    if cfg.output_dir and os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise OdtkError(f"--output-dir {cfg.output_dir}: is a file; give a folder (created when missing)")


@dataclass
class Form:
    """One way to deploy the model: the file users ship, how odtk makes it, or why it cannot run here."""
    name: str
    file: str
    export: Optional[ExportConfig] = None      # None: the checkpoint itself
    why_not: str = ""


def default_size(sizes: Sequence[Tuple[int, int]], *, resize: int, max_size: int,
                 divisible: int) -> Tuple[int, int]:
    """The fixed input (height, width) most images need: each image at the training resize/max_size, padded up to
    the stride, as PyTorch runs it; the most common of those (ties: the first image's)."""
    if not sizes:
        raise OdtkError("no images to size the exports from")

    def input_size(height: int, width: int) -> Tuple[int, int]:
        (h, w), _ = scaled_size(height, width, resize=resize, max_size=max_size)
        return padded(h, divisible), padded(w, divisible)

    return Counter(input_size(h, w) for h, w in sizes).most_common(1)[0][0]


def onnx_missing() -> str:
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(missing)} (pip install 'odtk[onnx]')" if missing else ""


def tensorrt_missing() -> str:
    """Why TensorRT engines cannot be built and run here ('' when they can), short enough for a table cell."""
    from .extension import load
    ext, _ = load()
    reasons = []
    if ext is None:
        reasons.append("odtk._C not built")
    elif not hasattr(ext, "Engine"):
        reasons.append("odtk._C built without TensorRT")
    if not torch.cuda.is_available():
        reasons.append("needs a CUDA GPU")
    return "; ".join(reasons)


def plan_forms(cfg: BenchmarkConfig, size: Tuple[int, int], folder: str) -> List[Form]:
    """Every form, in the order of the table; the exports' files go to `folder`."""
    stem = os.path.splitext(os.path.basename(cfg.model))[0]

    def exported(suffix: str, int8: bool, dynamic: bool) -> Tuple[str, ExportConfig]:
        path = os.path.join(folder, f"{stem}-{suffix}")
        return path, ExportConfig(model=cfg.model, output=path, size=size, batch=cfg.batch, int8=int8,
                                  calibration_images=cfg.images, calibration_batches=cfg.calibration_batches,
                                  verbose=cfg.verbose, dynamic_size=dynamic)

    onnx_why, trt_why = onnx_missing(), tensorrt_missing()
    forms = [Form("PyTorch", cfg.model)]
    for name, suffix, int8, dynamic, why in (("ONNX Runtime fp32", "fp32.onnx", False, False, onnx_why),
                                             ("ONNX Runtime fp32 dyn", "fp32-dynamic.onnx", False, True, onnx_why),
                                             ("ONNX Runtime INT8", "int8.onnx", True, False, onnx_why),
                                             ("TensorRT FP16", "fp16.plan", False, False, trt_why),
                                             ("TensorRT INT8", "int8.plan", True, False, trt_why)):
        path, export_cfg = exported(suffix, int8, dynamic)
        forms.append(Form(name, path, export_cfg, why))
    return forms


def prepared_batches(detector: Detector, dataset: CocoDataset, count: int, batch: int) -> List[tuple]:
    """The first `count` images of `dataset`, preprocessed for `detector` and collated into batches of `batch`
    (a last, partial batch is dropped unless it is the only one): (images, ratios, sizes) each."""
    b = detector.backend
    samples = [s for s in (dataset[i] for i in range(min(count, len(dataset)))) if s is not None]
    if not samples:
        raise OdtkError(f"{dataset.root}: no readable image to time")
    chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    chunks = [c for c in chunks if len(c) == batch] or chunks[:1]
    sizes = ImageSizes(dataset)
    out = []
    for chunk in chunks:
        images, _, _, ids, ratios = collate(chunk, b.size_divisible, b.fit)
        out.append((images, ratios, sizes(ids.tolist())))
    return out


def median_seconds(detector: Detector, batches: List[tuple], desc: str) -> float:
    """Median wall time of detect_batch over `batches`, after one untimed warm-up run (lazy initialisation,
    allocator and kernel caches)."""
    detector.detect_batch(*batches[0])
    times = []
    for images, ratios, sizes in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        start = time.perf_counter()
        detector.detect_batch(images, ratios, sizes)   # returns CPU tensors: a GPU has finished by then
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe(detector: Detector) -> str:
    """Where and how the form ran, for the note column."""
    b = detector.backend
    if b.fit:
        return f"{b.kind}, {b.fit[0]}x{b.fit[1]}"
    if isinstance(b, TorchBackend):
        return f"{b.kind} {b.device.type} {b.precision}, resize {b.resize} max {b.max_size}"
    return f"{b.kind}, each image resized to {b.resize} max {b.max_size}"


def measure(form: Form, cfg: BenchmarkConfig, folder: str, keep: bool) -> dict:
    """Export the form (when it is one), then its AP, batch-1 latency, throughput and size; a form that cannot run
    here is a row saying why."""
    row = {"form": form.name, "AP": None, "AP50": None, "ms_per_image": None, "images_per_s": None,
           "batch": cfg.batch, "size_mb": None, "file": None, "note": form.why_not}
    if form.why_not:
        log.info(f"{form.name}: skipped ({form.why_not})")
        return row
    log.info(f"{form.name}: {'exporting, then ' if form.export else ''}AP and timing")
    try:
        if form.export:
            export(form.export)
        detector = Detector.load(form.file, verbose=cfg.verbose)
        dataset = detector.dataset(cfg.images, cfg.annotations)
        slug = form.name.lower().replace(" ", "-")
        results = infer_run(detector, dataset, InferConfig(
            model=form.file, images=cfg.images, annotations=cfg.annotations, batch=cfg.batch,
            output=os.path.join(folder, f"{slug}-detections.json"), loader_workers=cfg.loader_workers))
        single = prepared_batches(detector, dataset, min(cfg.images_limit, BATCH1_IMAGES), 1)
        batched = prepared_batches(detector, dataset, cfg.images_limit, cfg.batch)
        ms = median_seconds(detector, single, f"{form.name} batch 1") * 1000
        per_batch = median_seconds(detector, batched, f"{form.name} batch {len(batched[0][1])}")
    except (OdtkError, ImportError, RuntimeError) as e:   # this form, not the benchmark, cannot go on
        why = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        log.warning(f"{form.name}: cannot run here: {why}")
        row["note"] = why[:200]
        return row
    row.update(AP=results.get("AP", 0.0), AP50=results.get("AP50", 0.0), ms_per_image=ms,
               images_per_s=len(batched[0][1]) / per_batch, batch=len(batched[0][1]),
               size_mb=os.path.getsize(form.file) / 1e6, file=form.file if keep or not form.export else None,
               note=describe(detector))
    return row


@contextlib.contextmanager
def work_folder(path: Optional[str]) -> Iterator[str]:
    """--output-dir (created, kept), else a temp folder removed at the end."""
    if path:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="odtk-benchmark-") as tmp:
        yield tmp


def benchmark(cfg: BenchmarkConfig) -> List[dict]:
    """`odtk benchmark`: one row per form (see the module docstring), with keys form, AP, AP50, ms_per_image,
    images_per_s, batch, size_mb, file (kept exports and the .pth; None otherwise) and note (how it ran, or why
    it cannot run here; the numbers are then None)."""
    if not os.path.isfile(cfg.model):
        raise OdtkError(f"{cfg.model}: model file not found")
    if not os.path.isdir(cfg.images):
        raise OdtkError(f"{cfg.images}: images folder not found")
    # the PyTorch detector first: it checks the checkpoint, the annotations and the images before any export
    detector = Detector.load(cfg.model, verbose=cfg.verbose)
    dataset = detector.dataset(cfg.images, cfg.annotations)
    if not len(dataset):
        raise OdtkError(f"{cfg.annotations}: no images to benchmark on")
    b = detector.backend
    if cfg.size:
        size = export_size(cfg.size, b.size_divisible)
    else:
        size = default_size(ImageSizes(dataset)(dataset.ids), resize=b.resize, max_size=b.max_size,
                            divisible=b.size_divisible)
    del detector   # its weights (GPU memory) go before each form loads its own
    with work_folder(cfg.output_dir) as folder:
        log.info(f"benchmark {cfg.model}: AP on {len(dataset)} images, timing on "
                 f"{min(cfg.images_limit, len(dataset))}, exports at {size[0]}x{size[1]}"
                 + (f" in {folder}" if cfg.output_dir else ""))
        return [measure(form, cfg, folder, keep=bool(cfg.output_dir)) for form in plan_forms(cfg, size, folder)]


def benchmark_table(rows: List[dict]) -> str:
    """The rows as an aligned text table; '-' where a form did not run."""
    header = [title.format(batch=max((r["batch"] for r in rows), default=0)) for _, title, _ in COLUMNS]
    cells = [[fmt.format(r[key]) if r[key] is not None else "-" for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(COLUMNS))]

    def line(values: List[str]) -> str:
        # text columns (form, note) left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if i in (0, len(COLUMNS) - 1) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])
