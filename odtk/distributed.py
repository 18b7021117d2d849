"""One worker process per device (ODTK's shape), torchrun and multi-node, and signals that stop training cleanly.

`launch` runs `fn(context)` in every local worker: in this process when there is one, else through
torch.multiprocessing; under torchrun each process is already a worker. Workers join a process group
(NCCL on GPU, gloo on CPU) through MASTER_ADDR/MASTER_PORT.
"""
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .utils import OdtkError, cpu_threads, log, setup_logging

MASTER = "127.0.0.1:29500"
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """--device: 'auto' is CUDA when PyTorch sees a GPU, else the CPU; 'cuda' without a GPU is an error."""
    if name not in DEVICES:
        raise OdtkError(f"--device {name}: choose from {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise OdtkError("--device cuda: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); use --device "
                        "cpu, or a CUDA build of torch and a visible GPU")
    return name


@dataclass(frozen=True)
class Context:
    """Where this worker sits: global rank and size, rank and size on this node, its device (`device_type`: --device,
    one of DEVICES; a CUDA worker takes the GPU of its local rank)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device_type: str = "auto"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if resolve_device(self.device_type) == "cuda" else \
            torch.device("cpu")


def torchrun_context(device: str = "auto") -> Optional[Context]:
    """The worker's place when launched by torchrun (or any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK)."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    return Context(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                   local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), device_type=device)


def local_workers(requested: Optional[int], device: str = "auto") -> int:
    """--workers, else one per visible GPU (CUDA), else one (CPU)."""
    cuda = resolve_device(device) == "cuda"
    if requested is not None:
        if requested < 1:
            raise OdtkError(f"--workers {requested}: need at least 1")
        if cuda and requested > torch.cuda.device_count():
            raise OdtkError(f"--workers {requested}: only {torch.cuda.device_count()} GPU(s) visible, one worker per "
                            f"GPU; use --workers {torch.cuda.device_count()}, or --device cpu for CPU (gloo) workers")
        return requested
    return torch.cuda.device_count() if cuda else 1


def check_gpus(ctx: Context) -> None:
    """More workers on this node than visible GPUs would put two ranks on one GPU, which NCCL refuses with a
    traceback from inside the process group's start: say so before anything starts."""
    if ctx.device.type == "cuda" and ctx.local_size > torch.cuda.device_count():
        raise OdtkError(f"{ctx.local_size} worker processes on this node but only {torch.cuda.device_count()} GPU(s) "
                        f"visible: one GPU per worker (start fewer, e.g. torchrun --nproc-per-node "
                        f"{torch.cuda.device_count()}), or --device cpu for CPU (gloo) workers")


def check_nodes(nodes: int, node_rank: int) -> None:
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise OdtkError(f"--nodes {nodes} --node-rank {node_rank}: need 0 <= node rank < nodes")


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint (`iteration`, None when reported by a launcher)."""

    def __init__(self, iteration: Optional[int], signal: Optional[str], *, rank: int = 0):
        super().__init__(f"stopped by {signal or 'a signal'} at iteration {iteration}")
        self.iteration, self.signal, self.rank = iteration, signal, rank

    @property
    def exit_code(self) -> int:
        # only rank 0 reports 130: a launcher (torchrun, ours) stops the other workers when one exits non-zero,
        # and rank 0 may still be saving
        return 130 if self.rank == 0 else 0


class WorkersFailed(Exception):
    """Spawned workers failed; each has logged its own error. `code`: 2 for a user error, 1 for a bug."""

    def __init__(self, code: int):
        super().__init__(f"training workers failed (exit code {code})")
        self.code = code


def worker_setup(ctx: Context, verbose: bool = False) -> None:
    """Process-wide settings, the business of a worker's entry point (main, or a spawned worker), not of the
    library: logging (rank 0 speaks for all, the others only report errors), device, CPU threads per worker.
    Raises OdtkError (logging is set up by then) when the node has fewer GPUs than workers."""
    setup_logging(verbose)
    if ctx.rank:
        log.setLevel("ERROR")
    check_gpus(ctx)
    if ctx.device.type == "cuda":
        if ctx.distributed:
            torch.cuda.set_device(ctx.device)
    else:   # share the cores among the workers of this node
        torch.set_num_threads(max(1, cpu_threads() // ctx.local_size))


def join_group(ctx: Context) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU) at MASTER_ADDR/MASTER_PORT."""
    if ctx.distributed and not dist.is_initialized():
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                device_id=ctx.device if backend == "nccl" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(local_rank: int, fn: Callable[[Context], Any], node_rank: int, local: int, nodes: int, master: str,
         verbose: bool, device: str = "auto") -> None:
    """A spawned worker's entry: process set-up, then one-line errors and exit codes the parent maps back
    (2 = user error, 130 = stopped, 1 = a bug)."""
    ctx = Context(rank=node_rank * local + local_rank, world_size=nodes * local, local_rank=local_rank,
                  local_size=local, device_type=device)
    os.environ["MASTER_ADDR"], _, os.environ["MASTER_PORT"] = master.rpartition(":")
    try:
        worker_setup(ctx, verbose)
        join_group(ctx)
        fn(ctx)
    except (OdtkError, OSError) as e:
        log.error(f"odtk train (rank {ctx.rank}): error: {e}")
        sys.exit(2)
    except TrainingStopped as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:   # a bug: its traceback, from the worker that hit it
        log.exception(f"odtk train (rank {ctx.rank}): unexpected error")
        sys.exit(1)
    finally:
        shutdown()


def launch(fn: Callable[[Context], Any], *, workers: Optional[int] = None, nodes: int = 1, node_rank: int = 0,
           master: str = MASTER, verbose: bool = False, device: str = "auto") -> Any:
    """Run fn in every local worker; returns fn's result when it ran in this process (one worker, torchrun).
    Raises what fn raises (in this process), else TrainingStopped or WorkersFailed for the spawned workers.
    Under torchrun the caller has set up this worker process (worker_setup); spawned workers set up their own.
    `device`: --device (auto, cpu, cuda)."""
    ctx = torchrun_context(device)
    if ctx is not None:
        if workers is not None or nodes != 1:
            log.warning("launched by torchrun: its ranks are used, --workers/--nodes/--node-rank are ignored")
        join_group(ctx)
        try:
            return fn(ctx)
        finally:
            shutdown()
    check_nodes(nodes, node_rank)
    local = local_workers(workers, device)
    if local == 1 and nodes == 1:
        return fn(Context(device_type=device))
    backend = "NCCL" if resolve_device(device) == "cuda" else "gloo"
    log.info(f"{local} worker process{'es' if local > 1 else ''} on this node ({nodes} node{'s' if nodes > 1 else ''},"
             f" {backend}), rank 0 at {master}")
    import torch.multiprocessing as mp
    procs = mp.start_processes(_run, args=(fn, node_rank, local, nodes, master, verbose, device), nprocs=local,
                               join=False, start_method="spawn")
    with forward_signals([p.pid for p in procs.processes]):
        code = wait_workers(procs.processes)
    if code == 130:
        raise TrainingStopped(None, None)
    if code:
        raise WorkersFailed(code)
    return None


def wait_workers(processes: list, grace: float = 10.0) -> int:
    """Wait for every worker; the exit code: a failure's (2 = user error, else 1), else 130 if stopped, else 0.
    Once one has failed, the rest get `grace` seconds to fail alike, then are terminated: they may be blocked
    in a collective waiting for it. A stopped worker (130) is not a failure: rank 0 may still be saving."""
    from multiprocessing.connection import wait
    alive = {p.sentinel: p for p in processes}
    failed_at = None
    while alive:
        for sentinel in wait(list(alive), timeout=1.0):
            p = alive.pop(sentinel)
            p.join()
            if p.exitcode not in (0, 130) and failed_at is None:
                failed_at = time.monotonic()
        if failed_at is not None and alive and time.monotonic() - failed_at > grace:
            for p in alive.values():
                p.terminate()
                p.join()
            alive = {}
    codes = [p.exitcode for p in processes]
    failures = [c for c in codes if c not in (0, 130)]
    if failures:
        return 2 if 2 in failures else 1
    return 130 if 130 in codes else 0


class forward_signals:
    """In the launching process: pass SIGINT/SIGTERM on to the workers (they save and stop) instead of dying."""

    def __init__(self, pids: List[int]):
        self.pids, self.old = pids, {}

    def _forward(self, signum, frame):
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.old[s] = signal.signal(s, self._forward)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


class StopRequest:
    """SIGINT/SIGTERM ask training to stop after the current iteration, with a checkpoint; the save itself is
    never cut short. A second request more than 2 s later (the first may arrive twice: terminal and launcher)
    stops at once, which atomic saves make safe."""

    def __init__(self):
        self.signal: Optional[str] = None
        self.at = 0.0
        self.old = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal is not None and now - self.at > 2:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self.at = signal.Signals(signum).name, now
            log.warning(f"{self.signal}: stopping after this iteration (again to stop at once)")

    def __enter__(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        except ValueError:   # not the main thread (e.g. called from a notebook worker thread): default handling
            pass
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def gather(items: list, ctx: Context) -> list:
    """Concatenate every rank's list (all ranks get the whole)."""
    if not ctx.distributed:
        return items
    parts: List[Optional[list]] = [None] * ctx.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


class Ranks:
    """The one place where ranks agree. A decision that changes what a rank does next (skip a batch, stop, save,
    diverge) is taken on all-reduced values, so every rank takes it at the same iteration: a rank deciding alone
    would leave the others waiting in a collective (DDP's gradient all-reduce, a gather)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def any(self, **flags: bool) -> Dict[str, bool]:
        """Each flag, true on every rank when it is true on any."""
        if not self.ctx.distributed:
            return flags
        votes = torch.tensor([float(v) for v in flags.values()], device=self.ctx.device)
        dist.all_reduce(votes)
        return {k: v > 0 for k, v in zip(flags, votes.tolist())}

    def mean(self, values: torch.Tensor) -> List[float]:
        """The mean over ranks of a 1-d tensor: every rank gets the same numbers (losses: diverged or not)."""
        if self.ctx.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return values.tolist()
