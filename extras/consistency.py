"""Training consistency: the same SGD steps on the same batch, recorded so that runs on other dtypes, devices or
torch versions can be compared step by step (issue 17).

  run OUT.json    K steps on the first --batch images of a COCO set (no augmentation, one fixed batch), from the
                  weights in --init (written by the first run, read by the others, so every run starts equal).
                  Records per step: the losses, the gradient norm of each part (body, fpn, cls_head, box_head),
                  and with --reference float64 how far this run's gradient is from float64's at the same weights.
  compare A B ... prints the runs side by side and the first step where their losses part.

python extras/consistency.py run cpu32.json --annotations train.json --images images --weights W --init init.pth
python extras/consistency.py run cpu64.json ... --dtype float64
python extras/consistency.py compare cpu32.json cpu64.json
"""
import argparse
import json
import os
import sys
from typing import Dict, List

import torch

from odtk.backbones import load_imagenet
from odtk.data import Augment, CocoDataset, collate
from odtk.model import Model, ModelConfig
from odtk.train import lr_factor

PARTS = ("body", "fpn", "cls_head", "box_head")


def part_of(name: str) -> str:
    if name.startswith(("cls_head", "box_head")):
        return name.split(".")[0]
    return "body" if ".body." in name else "fpn"


def build(args, num_classes: int) -> Model:
    config = ModelConfig(backbones=[args.backbone], num_classes=num_classes, pretrained=bool(args.weights))
    if args.anchor_scales:
        config.scales = list(args.anchor_scales)
    model = Model(config=config)
    if args.init and os.path.exists(args.init):
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    else:
        if args.weights:
            load_imagenet(next(iter(model.backbones.values())), args.weights)
        if args.init:
            torch.save(model.state_dict(), args.init)
    return model


def gradients(model: Model, images, boxes, labels) -> Dict[str, float]:
    """Backward of one step's loss; returns the losses (the gradients stay on the parameters)."""
    model.zero_grad(set_to_none=True)
    losses = model.loss(model(images), boxes, labels)
    (losses["cls"] + losses["box"]).backward()
    return {k: v.item() for k, v in losses.items()}


def flat_grads(model: Model) -> Dict[str, torch.Tensor]:
    out: Dict[str, List[torch.Tensor]] = {p: [] for p in PARTS}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[part_of(name)].append(p.grad.detach().double().flatten())
    return {k: torch.cat(v) for k, v in out.items() if v}


def run(args) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(args.deterministic)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    data = CocoDataset(args.images, args.annotations, resize=args.resize, max_size=args.max_size,
                       augment=Augment(flip=False))
    images, boxes, labels, _, _ = collate([data[i] for i in range(args.batch)])
    images, boxes = images.to(device, dtype), boxes.to(device, dtype)
    labels = labels.to(device)
    model = build(args, len(data.category_ids)).to(device, dtype).train()
    reference = None
    if args.reference:
        reference = build(args, len(data.category_ids)).to(device, getattr(torch, args.reference)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps = []
    for step in range(args.iters):
        losses = gradients(model, images, boxes, labels)
        grads = flat_grads(model)
        row = {"step": step, **losses, "grad_norm": {k: v.norm().item() for k, v in grads.items()}}
        if reference is not None:   # the reference at this run's weights: only the arithmetic differs
            reference.load_state_dict(model.state_dict())
            ref_losses = gradients(reference, images.to(reference.cls_head[0].weight.dtype),
                                   boxes.to(reference.cls_head[0].weight.dtype), labels)
            ref = flat_grads(reference)
            row["reference"] = {
                "loss_rel": abs(losses["cls"] + losses["box"] - ref_losses["cls"] - ref_losses["box"])
                / abs(ref_losses["cls"] + ref_losses["box"]),
                "grad_rel": {k: ((grads[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)).item() for k in ref},
                "grad_cos": {k: torch.nn.functional.cosine_similarity(grads[k], ref[k], dim=0).item() for k in ref}}
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, warmup=args.warmup, milestones=(), gamma=0.1)
        opt.step()
        steps.append(row)
        print(f"step {step:3d}  cls {losses['cls']:.6f}  box {losses['box']:.6f}"
              + (f"  vs {args.reference}: loss {row['reference']['loss_rel']:.1e}, grad "
                 + " ".join(f"{k} {v:.1e}" for k, v in row["reference"]["grad_rel"].items()) if reference else ""))
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "device": args.device, "dtype": args.dtype,
                   "threads": torch.get_num_threads(), "steps": steps}, f)


def compare(args) -> None:
    runs = [json.load(open(p)) for p in args.runs]
    names = [f"{r['device']} {r['dtype']} torch {r['torch']}" for r in runs]
    print("  ".join(f"[{i}] {n}" for i, n in enumerate(names)))
    parted = None
    print(f"{'step':>4} " + "".join(f"{f'loss[{i}]':>12}" for i in range(len(runs))) + f"{'max rel diff':>14}")
    for step in range(min(len(r["steps"]) for r in runs)):
        totals = [r["steps"][step]["cls"] + r["steps"][step]["box"] for r in runs]
        rel = max(abs(t - totals[0]) for t in totals) / abs(totals[0])
        if parted is None and rel > args.tolerance:
            parted = step
        print(f"{step:>4} " + "".join(f"{t:>12.6f}" for t in totals) + f"{rel:>14.1e}")
    print(f"losses part (relative difference > {args.tolerance:g}) at step {parted}" if parted is not None
          else f"losses agree within {args.tolerance:g} at every step")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--annotations", required=True)
    r.add_argument("--images", required=True)
    r.add_argument("--backbone", default="MobileNetV2FPN")
    r.add_argument("--weights", help="ImageNet weights file (the first run; later runs read --init)")
    r.add_argument("--init", help="starting weights: written when missing, else read")
    r.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    r.add_argument("--reference", choices=("float64",), help="also compare each step's gradient with this dtype's")
    r.add_argument("--device", default="cpu")
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--resize", type=int, default=256)
    r.add_argument("--max-size", type=int, default=352)
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--warmup", type=int, default=100)
    r.add_argument("--clip-grad", type=float, default=10.0)
    r.add_argument("--anchor-scales", type=float, nargs="+")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+")
    c.add_argument("--tolerance", type=float, default=1e-3)
    args = p.parse_args(argv)
    (run if args.command == "run" else compare)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
