"""Up-front checks of user settings: each raises OdtkError naming the flag, its value and what it must be, so a bad
value fails before any work instead of giving NaN boxes, empty validation or a crash hours later."""
import math
import os
from typing import Optional, Sequence

from .distributed import resolve_device
from .utils import OdtkError


def at_least(flag: str, value: Optional[int], low: int) -> None:
    """An integer flag that must be >= low (None: not given, nothing to check)."""
    if value is not None and value < low:
        raise OdtkError(f"{flag} {value}: must be at least {low}")


def positive(flag: str, value: float) -> None:
    """A finite number > 0 (NaN and infinity are refused)."""
    if not (math.isfinite(value) and value > 0):
        raise OdtkError(f"{flag} {value}: must be a positive finite number")


def anchor_setting(flag: str, value) -> None:
    """--anchor-scales/--anchor-ratios: not given (None), "auto", or positive finite numbers."""
    if value is None or value == "auto":
        return
    shown = value if isinstance(value, str) else " ".join(str(v) for v in value)
    if isinstance(value, str) or not len(value) or any(isinstance(v, str) for v in value):
        raise OdtkError(f"{flag} {shown}: give numbers, or auto alone")
    for v in value:
        positive(flag, v)


def non_negative(flag: str, value: float) -> None:
    """A finite number >= 0 (0 usually means off)."""
    if not (math.isfinite(value) and value >= 0):
        raise OdtkError(f"{flag} {value}: must be a finite number >= 0")


def ordered_range(flag: str, values: Sequence[float], *, low: float, high: float = math.inf) -> None:
    """Two values MIN MAX with low <= MIN <= MAX <= high."""
    shown = " ".join(str(v) for v in values)
    if len(values) != 2:
        raise OdtkError(f"{flag} {shown}: takes two values, MIN MAX")
    if not low <= values[0] <= values[1] <= high:
        bound = f"{low} <= MIN <= MAX" + (f" <= {high}" if high != math.inf else "")
        raise OdtkError(f"{flag} {shown}: need {bound}")


def check_writable(path: str, what: str, name: str = "model.pth") -> None:
    """Fail now, not after the work, when `path` cannot be written: it is a folder, or its nearest existing
    parent is not a writable folder (missing parents are fine: saves create them)."""
    if os.path.isdir(path):
        raise OdtkError(f"{path}: is a folder; {what} must be a file path (e.g. {os.path.join(path, name)})")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OdtkError(f"{path}: cannot write {what} there: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OdtkError(f"{path}: cannot write {what} there: no write permission in {parent}")


def check_infer(cfg) -> None:
    """InferConfig's sizes and counts."""
    at_least("--batch", cfg.batch, 1)
    at_least("--resize", cfg.resize, 1)
    at_least("--max-size", cfg.max_size, 1)
    at_least("--loader-workers", cfg.loader_workers, 0)
    resolve_device(cfg.device)


def check_export(cfg) -> None:
    """ExportConfig's sizes and counts, and --int8's calibration source."""
    if len(cfg.size) not in (1, 2) or min(cfg.size) < 1:
        raise OdtkError(f"--size {' '.join(map(str, cfg.size))}: one side (square) or height width, each >= 1")
    at_least("--batch", cfg.batch, 1)
    at_least("--calibration-batches", cfg.calibration_batches, 1)
    if cfg.opset < 17:
        raise OdtkError(f"--opset {cfg.opset}: odtk exports need opset 17 or newer")
    resolve_device(cfg.device)
    if cfg.device == "cpu" and cfg.output.lower().endswith(".plan"):
        raise OdtkError(f"{cfg.output}: --device cpu: TensorRT engines are built and run on a GPU; export .onnx for "
                        f"the CPU (ONNX Runtime)")
    reuse_table = cfg.calibration_table and os.path.isfile(cfg.calibration_table)
    if cfg.int8 and not cfg.calibration_images and not reuse_table:
        raise OdtkError("--int8 needs --calibration-images FOLDER: a few dozen images like the ones the model will "
                        "see (or an existing --calibration-table)")


def check_box_kind(dataset, reader: str, fix: str) -> None:
    """A COCO file whose boxes are of the other kind (rotated: bbox [x, y, w, h, theta]; axis-aligned:
    [x, y, w, h]) than `reader` (what reads `dataset`, a CocoDataset) takes: one line ending in `fix`. A file without
    boxes is of neither kind."""
    found = dataset.rotated_annotations
    if found is None or found == dataset.rotated:
        return
    have = ("rotated boxes (bbox [x, y, width, height, theta])" if found else
            "axis-aligned boxes only (bbox [x, y, width, height])")
    raise OdtkError(f"{dataset.coco_path}: {have}, but {reader} takes {'rotated' if dataset.rotated else 'axis-aligned'}"
                    f" ones: {fix}")


def check_rotated_flag(flag: bool, path: str, rotated: bool, fix: str) -> None:
    """`--rotated-bbox` given for the axis-aligned model at `path` (a rotated model says so itself, so the flag only
    checks): one line ending in `fix`."""
    if flag and not rotated:
        raise OdtkError(f"--rotated-bbox: {path} is an axis-aligned model (trained without --rotated-bbox); drop the "
                        f"flag, or {fix}")
