"""odtk RetinaNet vs torchvision's retinanet_resnet50_fpn on this machine, in one run.

Times inference (batch 1, 800x1333; odtk also with its BatchNorms fused into the convolutions, as Detector.load
and export run it) and one training step (batch 2, 512x512), random weights, same threads, best of --reps (on a
shared machine use more), and prints where odtk's time goes.
Usage: python benchmarks/bench_model.py [--reps N] [--threads T]
"""
import argparse
import time
from collections import defaultdict

import torch
import torchvision

from odtk.fuse import fused_copy
from odtk.model import Model, ModelConfig
from odtk.utils import cpu_threads


def timed(fn, reps):
    fn()                                   # warm-up: allocator, oneDNN primitive caches
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def stages_infer(model, x, reps):
    """Best-of-reps time of each inference stage of odtk's model."""
    out = defaultdict(lambda: float("inf"))
    backbone = next(iter(model.backbones.values()))
    with torch.inference_mode():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            c = backbone.body(x)
            t1 = time.perf_counter()
            feats = backbone(x)             # body again + FPN: FPN = difference
            t2 = time.perf_counter()
            cls = [model.cls_head(f) for f in feats]
            t3 = time.perf_counter()
            box = [model.box_head(f) for f in feats]
            t4 = time.perf_counter()
            model.detect((cls, box), tuple(x.shape[-2:]))
            t5 = time.perf_counter()
            for k, v in {"body": t1 - t0, "fpn": (t2 - t1) - (t1 - t0), "class head": t3 - t2, "box head": t4 - t3,
                         "decode+nms": t5 - t4}.items():
                out[k] = min(out[k], v)
    del c
    return out


def stages_train(model, opt, x, boxes, labels, reps):
    out = defaultdict(lambda: float("inf"))
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        heads = model(x)
        t1 = time.perf_counter()
        losses = model.loss(heads, boxes, labels)
        loss = losses["cls"] + losses["box"]
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for k, v in {"forward": t1 - t0, "targets+loss": t2 - t1, "backward": t3 - t2, "sgd step": t4 - t3}.items():
            out[k] = min(out[k], v)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cpu_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = Model(config=ModelConfig(backbones=["ResNet50FPN"], num_classes=80))
    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80,
                                                             min_size=800, max_size=1333)
    rows = []

    # inference, batch 1, 800x1333 (both pad to 800x1344)
    ours.eval(), tv.eval()
    x = torch.rand(1, 3, 800, 1333)
    xp = torch.nn.functional.pad(x, (0, 11, 0, 0))
    with torch.inference_mode():
        t_ours = timed(lambda: ours.predict(xp), args.reps)
        t_tv = timed(lambda: tv([x[0]]), args.reps)
    rows.append(("inference 800x1333, batch 1", t_ours, t_tv))
    fused = fused_copy(ours)    # what Detector.load and export run: BatchNorm folded into the convolutions
    with torch.inference_mode():
        rows.append(("  same, odtk with BN fused", timed(lambda: fused.predict(xp), args.reps), t_tv))
        # what Detector runs: fused, and channels-last (NHWC: oneDNN's native layout, no reorders per conv)
        fused.to(memory_format=torch.channels_last)
        xc = xp.contiguous(memory_format=torch.channels_last)
        rows.append(("  same, fused + channels-last", timed(lambda: fused.predict(xc), args.reps), t_tv))
    del fused
    infer_stages = stages_infer(ours, xp, args.reps)

    # one training step, batch 2 at 512x512
    ours.train(), tv.train()
    tv.transform.min_size, tv.transform.max_size = (512,), 512
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 512, 512, generator=g)
    xy = torch.rand(2, 8, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 16 + torch.rand(2, 8, 2, generator=g) * 96], 2)
    labels = torch.randint(0, 80, (2, 8), generator=g)
    targets = [{"boxes": boxes[i], "labels": labels[i]} for i in range(2)]
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step_ours():
        losses = ours.loss(ours(x), boxes, labels)
        opt_ours.zero_grad()
        (losses["cls"] + losses["box"]).backward()
        opt_ours.step()

    def step_tv():
        losses = tv(list(x), targets)
        opt_tv.zero_grad()
        sum(losses.values()).backward()
        opt_tv.step()

    rows.append(("train step 512x512, batch 2", timed(step_ours, args.reps), timed(step_tv, args.reps)))
    train_stages = stages_train(ours, opt_ours, x, boxes, labels, args.reps)

    print(f"\nodtk ResNet50FPN vs torchvision retinanet_resnet50_fpn, random weights, {args.threads} threads, "
          f"best of {args.reps}, torch {torch.__version__}")
    print(f"{'':32}{'odtk s':>10}{'torchvision s':>15}{'speed-up':>10}")
    for name, a, b in rows:
        print(f"{name:32}{a:>10.3f}{b:>15.3f}{b / a:>9.2f}x")
    for title, stages in (("odtk inference stages (s)", infer_stages), ("odtk training step stages (s)", train_stages)):
        total = sum(stages.values())
        print(f"\n{title}")
        for k, v in stages.items():
            print(f"  {k:16}{v:>8.3f}  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
