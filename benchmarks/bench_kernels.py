"""decode + NMS of a ResNet50FPN output at 800x1333 (padded to 800x1344): odtk._C's CUDA kernels on the GPU vs
odtk.box (PyTorch + torchvision) on the CPU, and whether they agree. Needs a GPU and odtk._C.

Random weights; the class bias is set so that a realistic number of anchors pass the 0.05 threshold (a trained
model's heads, not the 0.01 prior). Usage: python benchmarks/bench_kernels.py [--reps N] [--batch B] [--bias B]
"""
import argparse
import statistics
import time

import torch

from odtk import extension
from odtk.model import Model, ModelConfig
from odtk.utils import cpu_threads


def median_time(fn, reps: int, cuda: bool) -> float:
    fn()                                   # warm-up: allocator, CUB/cuDNN set-up
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bias", type=float, default=-2.5, help="class head bias (sigmoid(-2.5) = 0.076)")
    args = parser.parse_args()
    if not extension.cuda_kernels_available():
        raise SystemExit(f"needs a CUDA GPU and odtk._C ({extension.load()[1] or 'no GPU'})")
    torch.set_num_threads(cpu_threads())
    torch.manual_seed(0)
    size = (800, 1344)
    model = Model(config=ModelConfig(backbones=["ResNet50FPN"], num_classes=80)).eval()
    torch.nn.init.constant_(model.cls_head[-1].bias, args.bias)
    with torch.inference_mode():
        heads = model.cuda()(torch.randn(args.batch, 3, *size, device="cuda"))
        cpu_heads = ([h.cpu() for h in heads[0]], [h.cpu() for h in heads[1]])
        gpu = median_time(lambda: extension.detect(model, heads, size), args.reps, cuda=True)
        model.cpu()
        cpu = median_time(lambda: model.detect(cpu_heads, size), max(3, args.reps // 5), cuda=False)
        found = model.detect(cpu_heads, size)
        on_gpu = extension.detect(model.cuda(), heads, size)
    kept_cpu = (found[0] > 0).sum(1).tolist()
    kept_gpu = (on_gpu[0] > 0).sum(1).tolist()
    candidates = sum(int((h.sigmoid() > model.config.threshold).sum()) for h in cpu_heads[0])
    print(f"ResNet50FPN {size[0]}x{size[1]}, batch {args.batch}, {candidates} scores > {model.config.threshold}")
    print(f"{torch.cuda.get_device_name()}: decode+NMS (odtk._C) {gpu * 1e3:.2f} ms")
    print(f"CPU {cpu_threads()} threads: decode+NMS (odtk.box, torchvision) {cpu * 1e3:.1f} ms "
          f"({cpu / gpu:.0f}x the GPU time)")
    print(f"detections kept per image: GPU {kept_gpu}, CPU {kept_cpu}")


if __name__ == "__main__":
    main()
