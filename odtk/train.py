"""Training loop: SGD with warmup and step decay, periodic atomic checkpoints, validation, metrics."""
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from .backbones import find_weights, load_imagenet
from .data import Augment, CocoDataset, loader_factory
from .model import Model, ModelConfig
from .utils import OdtkError, cpu_threads, log


@dataclass
class TrainConfig:
    model: str
    annotations: str
    images: str = "."
    backbone: List[str] = field(default_factory=lambda: ["ResNet50FPN"])
    classes: Optional[int] = None
    batch: int = 2
    resize: int = 800
    max_size: int = 1333
    jitter: Tuple[int, int] = (640, 1024)
    iters: int = 90000
    milestones: Tuple[int, ...] = (60000, 80000)
    schedule: float = 1.0
    lr: float = 0.01
    warmup: int = 1000
    gamma: float = 0.1
    regularization_l2: float = 1e-4
    full_precision: bool = False
    override: bool = False
    fine_tune: Optional[str] = None
    val_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_iters: int = 8000
    logdir: Optional[str] = None
    post_metrics: Optional[str] = None
    augment: Augment = field(default_factory=Augment)
    anchor_ious: Tuple[float, float] = (0.4, 0.5)
    anchor_scales: Optional[List[float]] = None
    backbone_weights: Optional[str] = None
    clip_grad: float = 0.0
    loader_workers: int = 2
    with_dali: bool = False
    seed: int = 0
    verbose: bool = False


def lr_factor(iteration: int, *, warmup: int, milestones, gamma: float) -> float:
    """ODTK's schedule: linear warmup from 0.1x, then x gamma at each milestone passed."""
    if warmup and iteration < warmup:
        return 0.1 + 0.9 * iteration / warmup
    return gamma ** sum(1 for m in milestones if m <= iteration)


def build_model(cfg: TrainConfig, dataset: CocoDataset) -> Tuple[Model, dict]:
    """Resume `cfg.model` if it exists (unless --override), else a new model, optionally --fine-tune'd."""
    if os.path.exists(cfg.model) and not cfg.override:
        model, state = Model.load(cfg.model)
        log.info(f"resuming {cfg.model} at iteration {state.get('iteration', 0)}")
        return model, state
    num_classes = len(dataset.category_ids)
    if cfg.classes is not None:
        if cfg.classes < num_classes:
            raise OdtkError(f"{cfg.annotations}: {num_classes} categories but --classes {cfg.classes}")
        num_classes = cfg.classes
    names = [dataset.class_names.get(c, str(c)) for c in dataset.category_ids]
    if cfg.fine_tune:
        base, _ = Model.load(cfg.fine_tune)
        mc = base.config
        if mc.num_classes != num_classes or mc.category_ids != dataset.category_ids:
            log.info(f"fine-tuning from {cfg.fine_tune}: new class head for {num_classes} classes")
        config = ModelConfig(**{**mc.__dict__, "num_classes": num_classes, "category_ids": dataset.category_ids,
                                "class_names": names, "anchor_ious": list(cfg.anchor_ious)})
        model = Model(config=config)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in base.state_dict().items() if own[k].shape == v.shape},
                              strict=False)
        return model, {}
    weights = {b: find_weights(b, cfg.backbone_weights) for b in cfg.backbone}
    pretrained = all(weights.values())
    config = ModelConfig(backbones=list(cfg.backbone), num_classes=num_classes, anchor_ious=list(cfg.anchor_ious),
                         pretrained=pretrained, category_ids=dataset.category_ids, class_names=names)
    if cfg.anchor_scales:
        config.scales = list(cfg.anchor_scales)
    model = Model(config=config)
    if pretrained:
        for name, path in weights.items():
            load_imagenet(model.backbones[name], path)
            log.info(f"{name}: ImageNet weights from {path}")
    else:
        log.warning("no ImageNet weights found (--backbone-weights, or torch's hub cache): training starts from "
                    "random weights, with trainable BatchNorm")
    return model, {}


class Metrics:
    """TensorBoard (tensorboardX) and --post-metrics; a metrics server that is down never stops training."""

    def __init__(self, logdir: Optional[str], url: Optional[str]):
        self.writer = None
        if logdir:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir)
        self.url, self.warned = url, False

    def log(self, values: Dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.url:
            import requests
            try:
                requests.post(self.url, json={"iteration": step, **values}, timeout=2)
            except requests.RequestException as e:
                if not self.warned:
                    log.warning(f"--post-metrics {self.url}: {e.__class__.__name__}; training goes on")
                    self.warned = True

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def train(cfg: TrainConfig) -> Dict[str, float]:
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    resuming = os.path.exists(cfg.model) and not cfg.override
    category_ids = Model.load(cfg.model)[0].config.category_ids if resuming else None
    dataset = CocoDataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size,
                          jitter=cfg.jitter, augment=cfg.augment, category_ids=category_ids)
    if cfg.val_annotations:   # fail on a bad validation set now, not hours into training
        CocoDataset(cfg.val_images or cfg.images, cfg.val_annotations, category_ids=dataset.category_ids)
    model, state = build_model(cfg, dataset)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.regularization_l2)
    iters = int(cfg.iters * cfg.schedule)
    milestones = [int(m * cfg.schedule) for m in cfg.milestones]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, warmup=cfg.warmup, milestones=milestones, gamma=cfg.gamma))
    iteration = int(state.get("iteration", 0))
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if iteration >= iters:
        log.info(f"{cfg.model} already trained for {iteration} iterations (--iters {iters}); use --override to restart")
        return {}
    loader = loader_factory(cfg.with_dali)(dataset, batch_size=cfg.batch, training=True, workers=cfg.loader_workers,
                                           size_divisible=model.config.size_divisible, seed=cfg.seed)
    amp = device.type == "cuda" and not cfg.full_precision
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    metrics = Metrics(cfg.logdir, cfg.post_metrics)

    def save():
        model.save(cfg.model, iteration=iteration, optimizer=optimizer.state_dict(),
                   scheduler=scheduler.state_dict())
        log.debug(f"saved {cfg.model} at iteration {iteration}")

    log.debug(f"model config: {model.config}")
    log.debug(f"train config: {cfg}")

    log.info(f"training {'+'.join(model.config.backbones)} on {len(dataset)} images, {device.type}, "
             f"batch {cfg.batch}, {iters} iterations")
    bar = tqdm(total=iters, initial=iteration, desc="train", unit="it", dynamic_ncols=True)
    start, last_save, seen, history = time.time(), time.time(), 0, []
    epoch = 0
    try:
        while iteration < iters:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for batch in loader:
                if batch is None:
                    continue
                images, boxes, labels, _, _ = (t.to(device, non_blocking=True) for t in batch)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    heads = model(images)
                losses = model.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels)
                loss = losses["cls"] + losses["box"]
                if not torch.isfinite(loss):
                    raise OdtkError(f"loss is {loss.item()} at iteration {iteration}: training diverged; try a lower "
                                    f"--lr (now {cfg.lr}) or a longer --warmup; {cfg.model} was not overwritten")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                seen += images.shape[0]
                values = {"loss/cls": losses["cls"].item(), "loss/box": losses["box"].item(),
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / (time.time() - start)}
                history.append(values["loss/cls"] + values["loss/box"])
                bar.set_postfix(cls=f"{values['loss/cls']:.3f}", box=f"{values['loss/box']:.3f}",
                                lr=f"{values['lr']:.2g}", ims=f"{values['images_per_s']:.2f}")
                bar.update(1)
                if iteration % 10 == 0 or iteration == iters:
                    metrics.log(values, iteration)
                if iteration % cfg.val_iters == 0 or iteration == iters or time.time() - last_save > 600:
                    save()
                    last_save = time.time()
                    if cfg.val_annotations and (iteration % cfg.val_iters == 0 or iteration == iters):
                        ap = validate(model, cfg, dataset.category_ids)
                        metrics.log({"val/AP": ap["AP"], "val/AP50": ap["AP50"]}, iteration)
                        model.train()
                if iteration >= iters:
                    break
            epoch += 1
    except KeyboardInterrupt:
        bar.close()
        save()
        log.warning(f"interrupted: saved {cfg.model} at iteration {iteration}; run the same command to resume")
        raise SystemExit(130)
    bar.close()
    metrics.close()
    minutes = (time.time() - start) / 60
    first = sum(history[:10]) / max(1, len(history[:10]))
    last = sum(history[-10:]) / max(1, len(history[-10:]))
    log.info(f"done: {iteration} iterations in {minutes:.1f} min, {seen / max(1e-9, minutes * 60):.2f} im/s, "
             f"loss {first:.3f} -> {last:.3f}, saved {cfg.model}")
    return {"first_loss": first, "last_loss": last, "minutes": minutes}


def validate(model: Model, cfg: TrainConfig, category_ids) -> Dict[str, float]:
    from .infer import InferConfig, run_model
    out = os.path.splitext(cfg.model)[0] + "-val-detections.json"
    icfg = InferConfig(model=cfg.model, images=cfg.val_images or cfg.images, annotations=cfg.val_annotations,
                       output=out, batch=cfg.batch, resize=cfg.resize, max_size=cfg.max_size,
                       loader_workers=cfg.loader_workers, with_dali=cfg.with_dali)
    return run_model(model.eval(), icfg)
