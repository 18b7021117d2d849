"""CPU deployment speed in one run: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8 (Q/DQ),
batch 1, for ResNet50FPN and MobileNetV2FPN, with torchvision's retinanet_resnet50_fpn eager as the peer.

Usage: python benchmarks/bench_deploy.py [--reps N] [--sizes 800x1344 256x352] [--backbones ...]
Random weights (speed only); INT8 is calibrated on a few synthetic images made by odtk.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torchvision

from odtk.export import ExportConfig, export
from odtk.detector import onnx_session
from odtk.model import Model, ModelConfig
from odtk.synthetic import write_dataset
from odtk.utils import cpu_threads


def best_of(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["800x1344", "256x352"])
    parser.add_argument("--backbones", nargs="+", default=["ResNet50FPN", "MobileNetV2FPN"])
    args = parser.parse_args()
    threads = cpu_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(os.path.join(tmp, "calib"), train=4, val=0, size=512, seed=0)
        calib = os.path.join(tmp, "calib", "images")
        for size_text in args.sizes:
            h, w = map(int, size_text.split("x"))
            x = torch.rand(1, 3, h, w)
            tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                                     num_classes=80, min_size=h, max_size=w).eval()
            with torch.inference_mode():
                t_tv = best_of(lambda: tv([x[0]]), args.reps)
            rows.append((f"{h}x{w}", "torchvision R50 eager", t_tv, t_tv))
            for name in args.backbones:
                model = Model(config=ModelConfig(backbones=[name], num_classes=80)).eval()
                path = os.path.join(tmp, f"{name}.pth")
                model.save(path)
                with torch.inference_mode():
                    t_eager = best_of(lambda: model.predict(x), args.reps)
                rows.append((f"{h}x{w}", f"{name} PyTorch eager", t_eager, t_tv))
                for int8 in (False, True):
                    out = os.path.join(tmp, f"{name}-{h}x{w}-{'int8' if int8 else 'fp32'}.onnx")
                    export(ExportConfig(model=path, output=out, size=(h, w), batch=1, int8=int8,
                                        calibration_images=calib, calibration_batches=4))
                    session = onnx_session(out)
                    feed = {"input_1": x.numpy()}
                    t = best_of(lambda: session.run(None, feed), args.reps)
                    rows.append((f"{h}x{w}", f"{name} ORT {'INT8' if int8 else 'fp32'}", t, t_tv))
    print(f"\nCPU inference, batch 1, {threads} threads, best of {args.reps}; torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    print(f"{'size':10}{'model':34}{'s/img':>8}{'im/s':>8}{'vs tv R50':>11}")
    for size, name, t, t_tv in rows:
        print(f"{size:10}{name:34}{t:>8.3f}{1 / t:>8.2f}{t_tv / t:>10.2f}x")


if __name__ == "__main__":
    main()
