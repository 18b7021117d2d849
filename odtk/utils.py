"""Small shared helpers: user-facing errors, logging, atomic saves, threads."""
import contextlib
import logging
import os
import tempfile
from typing import Any, Iterator

import torch

log = logging.getLogger("odtk")


class OdtkError(Exception):
    """A user mistake or bad input: printed as one line by the CLI, never as a traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temp file name beside `path` to write to; renamed to `path` when the block succeeds, removed otherwise:
    a crash or a signal never leaves half a file, and the old one stays until the new one is whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through atomic_path, synced to disk before the rename."""
    with atomic_path(path, ".pth") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(text: str, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def cpu_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
