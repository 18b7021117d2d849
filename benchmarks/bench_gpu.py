"""odtk on a CUDA GPU against torchvision's RetinaNet, in one run: one table with ratios.

Rows: the training step (AMP fp16) of torchvision, of odtk's network in NCHW with a plain SGD step, and of
`odtk train`'s own step (Trainer.train_step: channels-last, fused SGD); inference at batch 8 and 16 through
odtk's inference path (TorchBackend: network, decode + NMS, results on the CPU) eager NCHW with PyTorch decode,
as shipped (channels-last + odtk._C kernels), bf16, and torch.compile; decode + NMS alone, PyTorch ops against
odtk._C's kernels; `odtk train` end to end (its loader and step) against its step alone on the same batches, with
the PyTorch loader and with DALI. ResNet50FPN, 80 classes, random weights, 800x1344 unless said.

    python benchmarks/bench_gpu.py [--train-batch 16] [--reps 10] [--no-compile] [--e2e-iters 40]

Without a GPU it says so and exits 0.
"""
import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from odtk import extension                                   # noqa: E402
from odtk.detector import Thresholds, TorchBackend           # noqa: E402
from odtk.model import Model, ModelConfig                    # noqa: E402

Row = Tuple[str, float, Optional[float], str]   # what, odtk images/s (or ms), torchvision's, unit
DEVICE = "cuda"            # --smoke: "cpu", to check this script's code paths on a machine without a GPU
SIZE = (800, 1344)         # --smoke: smaller


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def amp(dtype=torch.float16):
    """Autocast as odtk trains and infers on a GPU (off in --smoke)."""
    return torch.autocast("cuda", dtype=dtype, enabled=DEVICE == "cuda")


def timed(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Seconds per call, the GPU's work included."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def random_targets(batch: int, size: Tuple[int, int], count: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(batch, count, 2, generator=g) * torch.tensor([w - 300.0, h - 300.0])
    boxes = torch.cat([xy, xy + 32 + torch.rand(batch, count, 2, generator=g) * 256], 2)
    return boxes, torch.randint(0, 80, (batch, count), generator=g)


def torchvision_model(train: bool):
    import torchvision
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80,
                                                                min_size=SIZE[0], max_size=SIZE[1])
    return model.to(DEVICE).train(train)


def train_rows(args, data) -> List[Row]:
    """One training step, AMP fp16: torchvision, odtk NCHW + plain SGD, odtk's Trainer.train_step."""
    from odtk.train import Trainer
    b = args.train_batch
    images = torch.rand(b, 3, *SIZE, device=DEVICE)
    boxes, labels = (t.to(DEVICE) for t in random_targets(b, SIZE))

    tv = torchvision_model(train=True)
    targets = [{"boxes": boxes[i], "labels": labels[i]} for i in range(b)]
    tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    tv_scaler = torch.amp.GradScaler(DEVICE, enabled=DEVICE == "cuda")

    def tv_step():
        with amp():
            losses = tv(list(images), targets)
        tv_opt.zero_grad(set_to_none=True)
        tv_scaler.scale(sum(losses.values())).backward()
        tv_scaler.step(tv_opt)
        tv_scaler.update()
    t_tv = timed(tv_step, args.reps)
    del tv, tv_opt

    trainer = Trainer(cfg=trainer_config(args, data, batch=b, iters=10 ** 6))
    trainer.net = trainer.state.model
    plain = copy.deepcopy(trainer.state.model).to(memory_format=torch.contiguous_format)
    opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                          weight_decay=1e-4)
    scaler = torch.amp.GradScaler(DEVICE, enabled=DEVICE == "cuda")

    def plain_step():
        with amp():
            heads = plain(images)
        losses = plain.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["cls"] + losses["box"]).backward()
        scaler.step(opt)
        scaler.update()
    t_plain = timed(plain_step, args.reps)
    del plain, opt
    batch = (images, boxes, labels, torch.arange(b), torch.ones(b, dtype=torch.float64))
    t_odtk = timed(lambda: trainer.train_step(batch), args.reps)
    del trainer
    what = f"train step b{b} AMP fp16"
    return [(f"{what}, odtk NCHW + SGD", b / t_plain, b / t_tv, "im/s"),
            (f"{what}, odtk train (NHWC, fused SGD)", b / t_odtk, b / t_tv, "im/s")]


def infer_rows(args) -> List[Row]:
    """odtk's inference path (network + decode + NMS, results to the CPU) against torchvision's eval forward."""
    rows: List[Row] = []
    torch.manual_seed(0)
    base = Model(config=ModelConfig(backbones=["ResNet50FPN"], num_classes=80)).eval()
    tv = torchvision_model(train=False)
    limits = Thresholds()
    for b in args.infer_batch:
        images = torch.rand(b, 3, *SIZE, device=DEVICE)
        with torch.inference_mode(), amp():
            t_tv = timed(lambda: tv(list(images)), args.reps)
        fp16 = {} if DEVICE == "cuda" else {"precision": "fp32"}
        variants = {"odtk NCHW eager, PyTorch decode": None, "odtk as shipped (NHWC + kernels)": fp16,
                    "odtk bf16 (NHWC + kernels)": {"precision": "bf16"}}
        if args.compile and b == args.infer_batch[0]:
            variants["odtk torch.compile (NHWC + kernels)"] = {"compile": True, **fp16}
        for name, options in variants.items():
            model = copy.deepcopy(base).to(DEVICE)
            if options is None:
                t = timed(lambda: nchw_infer(model, images, limits), args.reps)
            else:
                backend = TorchBackend(model, device=DEVICE, **options)
                if options.get("compile"):
                    start = time.perf_counter()
                    backend(images, limits)
                    print(f"torch.compile: first batch {time.perf_counter() - start:.0f} s", flush=True)
                t = timed(lambda: backend(images, limits), args.reps)
            rows.append((f"infer b{b} {SIZE[0]}x{SIZE[1]}, {name}", b / t, b / t_tv, "im/s"))
            del model
    return rows


@torch.inference_mode()
def nchw_infer(model: Model, images: torch.Tensor, limits: Thresholds):
    """TorchBackend's work without channels-last and without odtk._C (the PyTorch decode)."""
    with amp():
        heads = model(images)
    heads = ([h.float() for h in heads[0]], [h.float() for h in heads[1]])
    out = model.detect(heads, tuple(images.shape[-2:]), threshold=limits.score, nms=limits.nms,
                       detections=limits.detections, kernels=False)
    return tuple(t.cpu() for t in out)


def decode_rows(args) -> List[Row]:
    """Decode + NMS alone on the heads of batch 8: PyTorch ops (odtk.box) against odtk._C."""
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=["ResNet50FPN"], num_classes=80)).eval().to(DEVICE)
    torch.nn.init.constant_(model.cls_head[-1].bias, -2.5)    # thousands of candidates above 0.05, as trained models
    with torch.inference_mode(), amp():
        heads = model(torch.rand(8, 3, *SIZE, device=DEVICE))
    heads = ([h.float() for h in heads[0]], [h.float() for h in heads[1]])
    rows: List[Row] = []
    with torch.inference_mode():
        t_torch = timed(lambda: model.detect(heads, SIZE, kernels=False), args.reps)
        rows.append(("decode+NMS b8, PyTorch ops (odtk.box)", 1e3 * t_torch, None, "ms"))
        if extension.cuda_kernels_available():
            t_kernels = timed(lambda: model.detect(heads, SIZE, kernels=True), args.reps)
            rows.append((f"decode+NMS b8, odtk._C kernels ({t_torch / t_kernels:.1f}x)", 1e3 * t_kernels, None, "ms"))
        else:
            rows.append(("decode+NMS b8, odtk._C kernels: not built", float("nan"), None, "ms"))
    return rows


def trainer_config(args, data, *, batch: int, iters: int, **changes):
    from odtk.data import Augment
    from odtk.train import TrainConfig
    folder, images, annotations = data
    return TrainConfig(model=os.path.join(folder, "bench.pth"), annotations=annotations, images=images,
                       backbone=["ResNet50FPN"], classes=80, batch=batch, iters=iters, lr=1e-4, warmup=0,
                       loader_workers=args.loader_workers, device=DEVICE, augment=Augment(flip=True),
                       override=True, **changes)


def end_to_end_rows(args, data) -> List[Row]:
    """`odtk train`'s loop (loader + Trainer.train_step) against the same steps on batches already on the GPU."""
    from odtk.train import Trainer
    rows: List[Row] = []
    for dali in (False, True):
        name = "DALI" if dali else f"PyTorch loader, {args.loader_workers} workers"
        if dali:
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                rows.append((f"odtk train end to end, {name}: DALI not installed", float("nan"), None, "im/s"))
                continue
        cfg = trainer_config(args, data, batch=args.train_batch, iters=10 ** 6, with_dali=dali, resize=SIZE[0],
                             max_size=SIZE[1], jitter=(SIZE[0] * 4 // 5, SIZE[0] * 5 // 4))
        trainer = Trainer(cfg=cfg)
        loader, trainer.net, _ = trainer.prepare()
        batches = trainer.batches(loader)
        seen, start = 0, None
        cached = []
        for i in range(args.e2e_iters + 5):
            batch = next(batches)
            if i == 5:                  # after the loader's workers and cuDNN's first choices
                sync()
                start = time.perf_counter()
            if i >= 5:
                seen += batch[0].shape[0]
            if len(cached) < 8:
                cached.append(tuple(t.to(DEVICE) for t in batch))
            trainer.train_step(batch)
        sync()
        e2e = seen / (time.perf_counter() - start)
        step_only = args.train_batch / timed(lambda: [trainer.train_step(b) for b in cached], 1, warmup=1) * \
            len(cached)
        rows.append((f"odtk train end to end, {name} ({e2e / step_only:.2f}x of step only {step_only:.0f} im/s)",
                     e2e, None, "im/s"))
        del trainer, loader, batches, cached
    return rows


def write_images(folder: str, count: int, side: int) -> Tuple[str, str]:
    """`count` synthetic square JPEGs with boxes (odtk synthetic), as COCO."""
    from odtk.synthetic import write_dataset
    write_dataset(folder, train=count, val=1, size=side, seed=0)
    return os.path.join(folder, "images"), os.path.join(folder, "train.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--infer-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--e2e-iters", type=int, default=40, help="timed iterations of the end-to-end rows")
    parser.add_argument("--images", type=int, default=320,
                        help="synthetic 1024x1024 images for the end-to-end rows (20 batches of 16 per epoch: an "
                             "epoch of a few batches measures the PyTorch loader's restart, not its rate)")
    parser.add_argument("--loader-workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "infer", "decode", "e2e"])
    parser.add_argument("--smoke", action="store_true", help="run every row tiny on the CPU (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, SIZE
        DEVICE, SIZE = "cpu", (128, 160)
        args.train_batch, args.infer_batch, args.reps, args.e2e_iters, args.images = 2, [2], 1, 2, 8
        args.loader_workers, args.compile = 0, False
    elif not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU is visible to PyTorch: nothing measured (benchmarks/bench_model.py times the "
              "CPU)")
        return 0
    from odtk.utils import setup_logging
    setup_logging(False)
    torch.backends.cudnn.benchmark = True     # fixed sizes per row: let cuDNN pick its fastest convolutions
    kernels = "built" if extension.cuda_kernels_available() else f"not built ({extension.load()[1][:60]})"
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run (not a measurement)"
    print(f"{where}, torch {torch.__version__}, odtk._C {kernels}, {os.cpu_count()} CPUs", flush=True)
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        data = (folder, *write_images(folder, args.images, 1024 if DEVICE == "cuda" else 192))
        for name, fn in (("train", lambda: train_rows(args, data)), ("infer", lambda: infer_rows(args)),
                         ("decode", lambda: decode_rows(args)), ("e2e", lambda: end_to_end_rows(args, data))):
            if name not in args.skip:
                rows += fn()
                torch.cuda.empty_cache()
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'':{width}}{'odtk':>10}{'torchvision':>13}{'ratio':>8}")
    for what, ours, theirs, unit in rows:
        ratio = f"{ours / theirs:.2f}x" if theirs else ""
        tv = f"{theirs:.1f}" if theirs else ""
        print(f"{what:{width}}{ours:>10.1f}{tv:>13}{ratio:>8}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
