"""Small shared helpers: user-facing errors, logging, atomic saves, threads."""
import logging
import os
import tempfile
from typing import Any

import torch

log = logging.getLogger("odtk")


class OdtkError(Exception):
    """A user mistake or bad input: printed as one line by the CLI, never as a traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if verbose else logging.INFO)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cpu_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
