"""The rotated IoU matrix (odtk.rotated) against the axis-aligned one (odtk.box.batched_box_iou), in one run.

Anchors x boxes as target assignment computes them: every anchor of a 512x512 image on the 5 FPN levels (strides
8-128), with 9 anchors per cell (ODTK's 3 ratios x 3 scales, unrotated) and 27 (x its 3 angles), against 1, 10
and 50 random rotated boxes (sides 16-256, theta in [-pi/4, pi/4]); the axis-aligned matrix takes the same anchors
and boxes without their angles. Best of --reps on the CPU, and on CUDA when available (GPU time synchronised, peak
memory of the call). "clipped" is the pairs whose enclosing boxes overlap: only those are clipped as polygons.
"matching ms" is odtk.rotated.matching_iou, what target assignment computes: the IoU exact only where matching
reads it (pairs that may reach the background IoU 0.4, or a box's best), bounds elsewhere.
Usage: python benchmarks/bench_rotated.py [--reps N] [--threads T] [--size S]
"""
import argparse
import math
from typing import Callable, List

import torch

from bench_kernels import median_time   # this folder: the timing all benchmarks share
from odtk import box as B
from odtk import rotated as R
from odtk.backbones.fpn import FPN
from odtk.utils import cpu_threads

RATIOS = [1.0, 2.0, 0.5]
SCALES = [4 * 2 ** (i / 3) for i in range(3)]


def image_anchors(size: int, angles: List[float]) -> torch.Tensor:
    """All rotated anchors [A, 5] of a size x size image on every level."""
    return torch.cat([R.grid_anchors_rotated(R.generate_anchors_rotated(stride, RATIOS, SCALES, angles), stride,
                                             -(-size // stride), -(-size // stride)) for stride in FPN.strides])


def random_boxes(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[1, count, 5] rotated boxes inside a size x size image."""
    wh = torch.rand(count, 2, generator=generator) * 240 + 16
    ctr = wh / 2 + torch.rand(count, 2, generator=generator) * (size - wh)
    theta = (torch.rand(count, 1, generator=generator) - 0.5) * (math.pi / 2)
    return torch.cat([ctr - wh / 2, ctr + wh / 2, theta], dim=1)[None]


def peak_mb(fn: Callable[[], object]) -> str:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2 ** 20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cpu_threads())
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"IoU matrix, anchors of a {args.size}x{args.size} image (5 levels) x boxes; CPU {args.threads} threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ", no CUDA device"))
    header = (f"{'device':<6} {'anchors/cell':>12} {'anchors':>8} {'boxes':>5} {'clipped':>8} {'rotated ms':>11} "
              f"{'matching ms':>12} {'axis ms':>8} {'ratio':>6} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for device in devices:
        cuda = device == "cuda"
        for angles in ([0.0], list(R.DEFAULT_ANGLES)):
            anchors = image_anchors(args.size, angles).to(device)
            for count in (1, 10, 50):
                boxes = random_boxes(count, args.size, torch.Generator().manual_seed(count)).to(device)
                rotated = median_time(lambda: R.batched_rotated_box_iou(anchors, boxes), args.reps, cuda)
                matching = median_time(lambda: R.matching_iou(anchors, boxes[0], 0.4), args.reps, cuda)
                axis = median_time(lambda: B.batched_box_iou(anchors[:, :4], boxes[..., :4]), args.reps, cuda)
                clipped = int((B.batched_box_iou(R.enclosing_boxes(anchors), R.enclosing_boxes(boxes)) > 0).sum())
                peak = peak_mb(lambda: R.batched_rotated_box_iou(anchors, boxes)) if cuda else "-"
                print(f"{device:<6} {len(RATIOS) * len(SCALES) * len(angles):>12} "
                      f"{anchors.shape[0]:>8} {count:>5} {clipped:>8} {rotated * 1e3:>11.1f} {matching * 1e3:>12.1f} "
                      f"{axis * 1e3:>8.2f} {rotated / axis:>6.0f} {peak:>8}")


if __name__ == "__main__":
    main()
