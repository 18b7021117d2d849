"""Progress for terminals and for logs: a tqdm bar when stderr is a terminal, else a plain line through odtk's
logger (INFO) every ~30 s or every 5% of the work, whichever comes first, so CI logs, nohup.out and `2> train.log`
get readable lines instead of carriage-return redraws."""
import math
import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO

from .utils import log

INTERVAL_S = 30.0   # at most this long between two lines
STEP = 0.05         # and a line at each 5% of the total


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether `stream` (default: the current sys.stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def progress(*, total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
             stream: Optional[TextIO] = None):
    """tqdm on a terminal, a LogProgress otherwise: both have update, set_postfix, close and `with`."""
    if disable or is_terminal(stream):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True,
                    file=stream)
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial)


def duration(seconds: float) -> str:
    """A short ETA: 45s, 27m, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plain_line(*, desc: str, n: int, total: int, unit: str, rate: Optional[float], postfix: Dict[str, str]) -> str:
    """`train 120/650 (18%) cls 0.412 box 0.301 lr 0.01 3.1 im/s ETA 27m`: postfix items as `key value`, a rate
    (a key ending in /s) as `value key`; the progress's own rate in `unit`/s only when the postfix has none."""
    parts = [f"{desc} {n}/{total} ({100 * n // max(total, 1)}%)"]
    parts += [f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in postfix.items()]
    if rate and not any(k.endswith("/s") for k in postfix):
        parts.append(f"{rate:.3g} {unit}/s")
    if rate and n < total:
        parts.append(f"ETA {duration((total - n) / rate)}")
    return " ".join(parts)


class LogProgress:
    """tqdm's update/set_postfix/close for a log: a line (log.info) every INTERVAL_S seconds or STEP of the
    total, and one at the end when the last count was not shown yet."""

    def __init__(self, *, total: int, desc: str, unit: str = "it", initial: int = 0,
                 emit: Callable[[str], None] = log.info, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.emit, self.clock = emit, clock
        self.start_n, self.start = initial, clock()
        self.shown_n, self.shown_at = initial, self.start
        self.postfix: Dict[str, str] = {}
        self.closed = False

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _step(self, n: int) -> int:
        """Which STEP of the total `n` is in."""
        return math.floor(n * (1 / STEP) / max(self.total, 1))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.shown_at >= INTERVAL_S or self._step(self.n) > self._step(self.shown_n):
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 and self.n > self.start_n else None
        self.emit(plain_line(desc=self.desc, n=self.n, total=self.total, unit=self.unit, rate=rate,
                             postfix=self.postfix))
        self.shown_n, self.shown_at = self.n, now

    def close(self) -> None:
        if not self.closed and self.n != self.shown_n:
            self._show(self.clock())
        self.closed = True
