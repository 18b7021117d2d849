"""Small shared helpers: user-facing errors, logging, atomic saves, threads."""
import contextlib
import logging
import os
import re
import socket
import stat
import tempfile
from functools import lru_cache
from typing import Any, Iterator, Optional

import torch

log = logging.getLogger("odtk")


class OdtkError(Exception):
    """A user mistake or bad input: printed as one line by the CLI, never as a traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if verbose else logging.INFO)


def _host() -> str:
    """This machine's name as it goes in temp names (the host matters on a folder shared between nodes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _temp_pattern(path: str) -> "re.Pattern":
    """Names of atomic_path's temps for `path` (see there), with the owner's host and pid."""
    return re.compile(rf"\.{re.escape(os.path.basename(path))}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.tmp-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)     # no signal sent: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:     # it exists, as another user's
        pass
    return True


def remove_stale_temps(path: str) -> None:
    """Remove the temp files atomic_path left beside `path` in processes that died mid-save (SIGKILL, power cut).

    Only temps of this host whose process is gone: another live save of the same target, or one of another host
    sharing the folder, is never touched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    pattern, host = _temp_pattern(path), _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):     # another process may clean it at the same time
                os.unlink(os.path.join(folder, name))
                log.info(f"removed {os.path.join(folder, name)}, left by a save that was killed")


def _umask() -> int:
    try:        # Linux: read it without changing it (changing it races with other threads creating files)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _plain_mode(path: str) -> int:
    """The mode open(path, "w") would leave: the existing file's, else 0666 less the umask (mkstemp's is 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temp file name beside `path` to write to; renamed to `path` when the block succeeds, removed otherwise:
    a crash or a signal never leaves half a file, and the old one stays until the new one is whole.

    The temp is named `.{name}.{host}.{pid}.tmp-XXXX{suffix}`, so one left by a killed process is removed at the
    next save of the same target (remove_stale_temps). The result has the mode a plain open() would give it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(path)
    prefix = f".{os.path.basename(path)}.{_host()}.{os.getpid()}.tmp-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(path))
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


def padded(side: int, divisible: int) -> int:
    """`side` rounded up to a multiple of `divisible` (how the loaders pad an image)."""
    return -(-side // divisible) * divisible


def cpu_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@lru_cache(maxsize=None)
def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there oneDNN's bf16 convolutions are ~1.7x
    fp32's; without it they fall back to reference kernels (an AVX2 CPU measured 0.06x)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, *, full_precision: bool = False) -> Optional[torch.dtype]:
    """Training's mixed precision: fp16 on CUDA, bf16 on a CPU that has it natively, None (fp32) otherwise or
    with --full-precision."""
    if full_precision:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16() else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast to `dtype` (autocast_dtype's choice) on `device`; off for None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
