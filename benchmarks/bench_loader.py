"""Data loader throughput in one run: a plain PIL + torchvision-transforms DataLoader vs odtk's PyTorch loader
vs odtk's DALI loader (CPU unless CUDA is present), same images, same batch, same number of workers/threads.

Usage: python benchmarks/bench_loader.py [--images DIR --annotations FILE] [--batch 4] [--workers 2]
(--workers 0: everything in one thread of the main process, i.e. the per-image cost without process hand-offs)
Default data: BCCD trainval (converted on the fly) from ../shared/data/bccd, at odtk's BCCD training resolution
(shorter side 224-288, longer side at most 352). Images/s: the best epoch after a warm-up one; CPU ms/image:
CPU time of the loader's processes and threads per image, which neighbours on shared cores do not inflate.
"""
import argparse
import os
import tempfile
import time
from typing import Dict, Iterable, Tuple

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from odtk.constants import IMAGENET_MEAN, IMAGENET_STD
from odtk.data import Augment, CocoDataset, make_loader, read_coco
from odtk.utils import OdtkError

HERE = os.path.dirname(os.path.abspath(__file__))
BCCD = os.path.join(HERE, "..", "..", "shared", "data", "bccd", "BCCD")


class PlainDataset(Dataset):
    """The baseline: what a plain torchvision pipeline does per image (no boxes)."""

    def __init__(self, root: str, files, resize: int, max_size: int):
        self.paths = [os.path.join(root, f) for f in files]
        self.transform = T.Compose([T.Resize(resize, max_size=max_size), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def cpu_seconds() -> float:
    """CPU time used so far by this process (every thread: DALI's) and its live children (DataLoader workers;
    Linux /proc). Unlike wall time it does not grow when neighbours take the shared cores."""
    t = os.times()
    total, tick, me = t.user + t.system, os.sysconf("SC_CLK_TCK"), os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()     # after the command name: state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def epoch(loader: Iterable) -> Tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch."""
    start, cpu, n = time.perf_counter(), cpu_seconds(), 0
    for batch in loader:
        n += (batch if isinstance(batch, torch.Tensor) else batch[0]).shape[0]
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def measure(loaders: Dict[str, Iterable], rounds: int) -> Dict[str, Tuple[float, float]]:
    """Per loader: best images/s over `rounds` epochs, and CPU milliseconds per image over all of them, after a
    warm-up epoch (worker start-up and the page cache not counted). Rounds interleave the loaders so a busy
    neighbour on the shared cores slows them alike; the best epoch is the one least disturbed."""
    for loader in loaders.values():
        epoch(loader)
    best = {name: 0.0 for name in loaders}
    cpu = {name: [0, 0.0] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            n, wall, used = epoch(loader)
            best[name] = max(best[name], n / wall)
            cpu[name][0] += n
            cpu[name][1] += used
    return {name: (best[name], 1000 * cpu[name][1] / cpu[name][0]) for name in loaders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=os.path.join(BCCD, "JPEGImages"))
    parser.add_argument("--annotations", help="COCO file (default: BCCD trainval, converted here)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jitter", type=int, nargs=2, default=[224, 288])
    parser.add_argument("--max-size", type=int, default=352)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader (the best is shown)")
    args = parser.parse_args()
    # the main process only receives batches (or, with --workers 0, does the per-image work itself): one
    # intra-op thread, as in DataLoader workers, instead of a pool spinning over 100 kB tensors
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    annotations = args.annotations
    if not annotations:
        from odtk.convert import convert_voc, write_coco
        coco, skipped = convert_voc(os.path.dirname(args.images), split="trainval",
                                    classes=["WBC", "RBC", "Platelets"])
        annotations = os.path.join(tmp.name, "trainval.json")
        write_coco(coco, skipped, annotations)
    files = [im["file_name"] for im in read_coco(annotations)["images"]]
    middle = sum(args.jitter) // 2
    color = dict(brightness=0.002, contrast=0.002, saturation=0.002, hue=0.0002)   # odtk train's defaults
    loaders, missing = {}, ""
    loaders["plain PIL + torchvision transforms DataLoader (resize, flip, normalise)"] = DataLoader(
        PlainDataset(args.images, files, middle, args.max_size), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)
    for name, augment in (("flip", Augment(flip=True)), ("flip + colour jitter", Augment(flip=True, **color))):
        ds = CocoDataset(args.images, annotations, jitter=tuple(args.jitter), max_size=args.max_size,
                         augment=augment)
        loaders[f"odtk PyTorch loader, {name}"] = make_loader(ds, batch_size=args.batch, training=True,
                                                               workers=args.workers)
        try:
            from odtk.dali import make_dali_loader
            dali = make_dali_loader(ds, batch_size=args.batch, training=True, workers=args.workers)
            loaders[f"odtk DALI loader ({dali.device}), {name}"] = dali
        except OdtkError as e:      # DALI not installed: the table says so instead of stopping
            missing = str(e)
    load = os.getloadavg()[0]
    results = measure(loaders, args.rounds)
    base_rate, base_cpu = next(iter(results.values()))
    print(f"\n{len(files)} images, batch {args.batch}, {args.workers} workers/threads, shorter side "
          f"{args.jitter[0]}-{args.jitter[1]} (baseline {middle}), longer <= {args.max_size}, best of "
          f"{args.rounds} epochs; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| loader | images/s | vs baseline | CPU ms/image | vs baseline |\n|---|---|---|---|---|")
    for name, (rate, cpu) in results.items():
        print(f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {cpu:.2f} | {base_cpu / cpu:.2f}x |")
    if missing:
        print(f"DALI rows missing: {missing}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
