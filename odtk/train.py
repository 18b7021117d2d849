"""Training: SGD with warmup and step decay, one process per device (DDP), mixed precision on GPU, EMA, atomic
checkpoints that resume exactly, validation gathered over ranks, TensorBoard and posted metrics."""
import copy
import functools
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .backbones import BACKBONES, find_weights, load_imagenet
from .checks import at_least, check_writable, non_negative, ordered_range, positive
from .data import Augment, CocoDataset, loader_factory
from .distributed import MASTER, Context, StopRequest, check_nodes, launch, local_workers, torchrun_context
from .model import Model, ModelConfig
from .utils import OdtkError, log

DEFAULT_BACKBONE = "ResNet50FPN"


@dataclass
class TrainConfig:
    model: str
    annotations: str
    images: str = "."
    backbone: Optional[List[str]] = None   # None: DEFAULT_BACKBONE for a new model, the checkpoint's on resume
    classes: Optional[int] = None
    batch: Optional[int] = None     # global, split over the workers (ODTK); default 2 per worker
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
    ema: float = 0.0                 # EMA decay of the weights; 0: off
    workers: Optional[int] = None    # processes on this node: default one per GPU, else 1
    nodes: int = 1
    node_rank: int = 0
    master: str = MASTER
    verbose: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would crash later or train on nonsense (NaN lr, 1-pixel images), flag by flag."""
        for name in self.backbone or []:
            if name not in BACKBONES:
                raise OdtkError(f"--backbone {name}: unknown backbone (choose from {', '.join(BACKBONES)})")
        for flag, value in (("--classes", self.classes), ("--batch", self.batch), ("--resize", self.resize),
                            ("--max-size", self.max_size), ("--iters", self.iters), ("--val-iters", self.val_iters)):
            at_least(flag, value, 1)
        for flag, value in (("--warmup", self.warmup), ("--loader-workers", self.loader_workers)):
            at_least(flag, value, 0)
        ordered_range("--jitter", self.jitter, low=1)
        ordered_range("--anchor-ious", self.anchor_ious, low=0, high=1)
        for flag, value in (("--lr", self.lr), ("--schedule", self.schedule), ("--gamma", self.gamma),
                            *(("--anchor-scales", s) for s in self.anchor_scales or [])):
            positive(flag, value)
        for flag, value in (("--regularization-l2", self.regularization_l2), ("--clip-grad", self.clip_grad),
                            *((f"--augment-{k}", getattr(self.augment, k))
                              for k in ("brightness", "contrast", "saturation", "hue"))):
            non_negative(flag, value)
        if self.ema and not 0 < self.ema < 1:
            raise OdtkError(f"--ema {self.ema}: the decay must be between 0 and 1 (e.g. 0.9999)")
        if int(self.iters * self.schedule) < 1:
            raise OdtkError(f"--iters {self.iters} --schedule {self.schedule}: less than one iteration")
        for m in self.milestones:
            at_least("--milestones", m, 1)
        check_nodes(self.nodes, self.node_rank)


def lr_factor(iteration: int, *, warmup: int, milestones, gamma: float) -> float:
    """ODTK's schedule: linear warmup from 0.1x, then x gamma at each milestone passed."""
    if warmup and iteration < warmup:
        return 0.1 + 0.9 * iteration / warmup
    return gamma ** sum(1 for m in milestones if m <= iteration)


def build_model(cfg: TrainConfig, dataset: CocoDataset) -> Tuple[Model, dict]:
    """A new model for `dataset`, optionally --fine-tune'd (resuming is `Model.load(cfg.model, ema=False)`)."""
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
    backbones = list(cfg.backbone or [DEFAULT_BACKBONE])
    weights = {b: find_weights(b, cfg.backbone_weights) for b in backbones}
    pretrained = all(weights.values())
    config = ModelConfig(backbones=backbones, num_classes=num_classes, anchor_ious=list(cfg.anchor_ious),
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


def check_resume(cfg: TrainConfig, config: ModelConfig) -> None:
    """Resuming keeps the checkpoint's model: refuse --backbone/--classes/--anchor-scales that say otherwise rather
    than ignore them."""
    asked = {"--backbone": (cfg.backbone, config.backbones), "--classes": (cfg.classes, config.num_classes),
             "--anchor-scales": (cfg.anchor_scales, config.scales)}
    for flag, (wanted, saved) in asked.items():
        if wanted is not None and (list(wanted) if isinstance(wanted, (list, tuple)) else wanted) != saved:
            raise OdtkError(f"{cfg.model}: resuming keeps the checkpoint's {flag} {_shown(saved)}, not "
                            f"{_shown(wanted)}; drop {flag} to resume, or add --override to train a new model "
                            f"(overwrites {cfg.model})")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Metrics:
    """TensorBoard (tensorboardX) and --post-metrics. Posts go through a background thread with a timeout: a
    metrics server that is slow or down never blocks or stops training (it is warned about once)."""

    def __init__(self, logdir: Optional[str], url: Optional[str]):
        self.writer = None
        if logdir:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir)
        self.url, self.warned = url, False
        self.queue: "queue.Queue[Optional[dict]]" = queue.Queue(maxsize=1000)
        self.thread = None
        if url:
            self.thread = threading.Thread(target=self._post_loop, name="odtk-post-metrics", daemon=True)
            self.thread.start()

    def _post_loop(self) -> None:
        import requests
        session = requests.Session()
        while (item := self.queue.get()) is not None:
            try:
                session.post(self.url, json=item, timeout=2).raise_for_status()
            except requests.RequestException as e:
                if not self.warned:
                    log.warning(f"--post-metrics {self.url}: {e.__class__.__name__}; training goes on")
                    self.warned = True

    def log(self, values: Dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.thread:
            try:
                self.queue.put_nowait({"iteration": step, **values})
            except queue.Full:   # the server is far behind: drop rather than wait
                pass

    def close(self, timeout: float = 5.0) -> None:
        if self.writer:
            self.writer.close()
        if self.thread:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self.thread.join(timeout)


class ModelEMA:
    """Exponential moving average of the weights (YOLOv5's ModelEMA): the decay ramps up over the first
    `tau` updates so early, poor weights are forgotten; buffers are copied."""

    def __init__(self, model: Model, decay: float, *, updates: int = 0, tau: float = 2000.0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates, self.tau = decay, updates, tau

    @torch.no_grad()
    def update(self, model: Model) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(current[k].detach(), alpha=1 - d)
            else:
                v.copy_(current[k])

    def state_dict(self) -> dict:
        return {"state_dict": self.module.state_dict(), "updates": self.updates, "decay": self.decay}


@torch.no_grad()
def finite_weights(model: torch.nn.Module) -> bool:
    """No NaN/inf in the parameters (cheap next to a save)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def train(cfg: TrainConfig) -> Optional[Dict[str, float]]:
    """Train with cfg: checks inputs here (one-line errors), then runs one worker per device."""
    cfg.validate()   # again: the fields may have been changed since construction
    check_writable(cfg.model, "MODEL")
    for path in (cfg.annotations, cfg.val_annotations):   # before any worker starts: one message, not N
        if path and not os.path.isfile(path):
            raise OdtkError(f"{path}: annotations file not found")
    ctx = torchrun_context()
    world = ctx.world_size if ctx else local_workers(cfg.workers) * cfg.nodes
    if cfg.batch is not None and cfg.batch % world:
        raise OdtkError(f"--batch {cfg.batch} does not split evenly over {world} workers")
    return launch(functools.partial(train_worker, cfg), workers=cfg.workers, nodes=cfg.nodes,
                  node_rank=cfg.node_rank, master=cfg.master, verbose=cfg.verbose)


def train_worker(cfg: TrainConfig, ctx: Context = Context()) -> Dict[str, float]:
    """One worker's training loop (DDP when ctx has several). Returns loss figures and the per-iteration losses."""
    torch.manual_seed(cfg.seed)
    device = ctx.device
    batch = cfg.batch if cfg.batch is not None else 2 * ctx.world_size   # train() checked that it splits evenly
    resumed = Model.load(cfg.model, ema=False) if os.path.exists(cfg.model) and not cfg.override else None
    dataset = CocoDataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size,
                          jitter=cfg.jitter, augment=cfg.augment, require_boxes=True,
                          category_ids=resumed[0].config.category_ids if resumed else None)
    if cfg.val_annotations:   # fail on a bad validation set now, not hours into training
        CocoDataset(cfg.val_images or cfg.images, cfg.val_annotations, category_ids=dataset.category_ids)
    if resumed:
        model, state = resumed
        check_resume(cfg, model.config)
        log.info(f"resuming {cfg.model} at iteration {state.get('iteration', 0)}")
    else:
        model, state = build_model(cfg, dataset)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.regularization_l2)
    iters = int(cfg.iters * cfg.schedule)
    milestones = [int(m * cfg.schedule) for m in cfg.milestones]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, warmup=cfg.warmup, milestones=milestones, gamma=cfg.gamma))
    amp = device.type == "cuda" and not cfg.full_precision
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    iteration = int(state.get("iteration", 0))
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if amp and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("rng"):
        set_rng_state(state["rng"])
    ema = None
    if cfg.ema or state.get("ema"):
        saved = state.get("ema") or {}
        ema = ModelEMA(model, cfg.ema or saved["decay"], updates=saved.get("updates", 0))
        if saved:
            ema.module.load_state_dict(saved["state_dict"])
    if iteration >= iters:
        log.info(f"{cfg.model} already trained for {iteration} iterations (--iters {iters}); use --override to restart")
        return {}
    per_rank = batch // ctx.world_size
    loader = loader_factory(cfg.with_dali)(dataset, batch_size=per_rank, training=True, workers=cfg.loader_workers,
                                           size_divisible=model.config.size_divisible, rank=ctx.rank,
                                           world_size=ctx.world_size, seed=cfg.seed)
    steps_per_epoch = loader.sampler.batches
    net = model
    if ctx.distributed:
        if device.type == "cuda" and not model.config.pretrained:   # trainable BN: statistics over all GPUs
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif not model.config.pretrained:
            log.warning("trainable BatchNorm with gloo: each process normalises with its own batch statistics "
                        "(PyTorch's SyncBatchNorm is GPU-only)")
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = Metrics(cfg.logdir, cfg.post_metrics) if ctx.rank == 0 else Metrics(None, None)

    saved_at = [iteration if resumed else None]   # the iteration MODEL holds (None: not written by this run)

    def kept() -> str:
        return f"{cfg.model} keeps iteration {saved_at[0]}" if saved_at[0] is not None else \
            f"{cfg.model} was not written by this run"

    def save(final: bool = False):
        # every rank checks (same weights everywhere), so all stop together; a poisoned file is never written
        if not finite_weights(model):
            raise OdtkError(f"weights are not finite at iteration {iteration}: training diverged; try a lower --lr "
                            f"(now {cfg.lr}) or a longer --warmup; {kept()}")
        if ctx.rank == 0:
            extra = {"scaler": scaler.state_dict()} if amp else {}
            if ema:
                extra["ema"] = ema.state_dict()
            try:
                model.save(cfg.model, iteration=iteration, optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(), rng=rng_state(), **extra)
            except OSError as e:   # training state stays in memory: retry at the next save, fail on the last
                if final:
                    raise OdtkError(f"{cfg.model}: cannot save the checkpoint at iteration {iteration} ({e}); "
                                    f"{kept()}") from None
                log.warning(f"{cfg.model}: cannot save the checkpoint at iteration {iteration} ({e}); training goes "
                          f"on and retries at the next save")
                return
            saved_at[0] = iteration
            log.debug(f"saved {cfg.model} at iteration {iteration}")

    log.debug(f"model config: {model.config}")
    log.debug(f"train config: {cfg}")
    precision = "fp16 mixed precision" if amp else "fp32"
    log.info(f"training {'+'.join(model.config.backbones)} on {len(dataset)} images, {ctx.world_size} x "
             f"{device.type}, batch {batch} ({per_rank} per worker), {precision}, {iters} iterations")
    def step(batch_) -> Tuple[float, float, float]:
        """One optimisation step; returns the mean losses over ranks and the number of ranks asked to stop."""
        images, boxes, labels, _, _ = (t.to(device, non_blocking=True) for t in batch_)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            heads = net(images)
        losses = model.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels,
                            distributed=ctx.distributed)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["cls"] + losses["box"]).backward()
        # one collective a step: the mean losses for the log, the divergence check and any stop request, so every
        # rank takes the same decision at the same iteration
        shared = torch.stack([losses["cls"].detach(), losses["box"].detach(),
                              torch.tensor(float(stop.requested), device=device)])
        if ctx.distributed:
            dist.all_reduce(shared)
            shared[:2] /= ctx.world_size
        cls_loss, box_loss, stop_votes = shared.tolist()
        if not math.isfinite(cls_loss + box_loss):
            raise OdtkError(f"loss is {cls_loss + box_loss} at iteration {iteration + 1}: training diverged; try a "
                            f"lower --lr (now {cfg.lr}) or a longer --warmup; {kept()}")
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema:
            ema.update(model)
        return cls_loss, box_loss, stop_votes

    bar = tqdm(total=iters, initial=iteration, desc="train", unit="it", dynamic_ncols=True, disable=ctx.rank != 0)
    start, last_save, seen, history = time.time(), time.time(), 0, []
    stopped = False
    with StopRequest() as stop:
        while iteration < iters and not stopped:
            loader.sampler.start(*divmod(iteration, steps_per_epoch))
            try:
                for batch_ in loader:
                    if batch_ is None:   # every image of this batch was unreadable (each one was logged)
                        continue
                    cls_loss, box_loss, stop_votes = step(batch_)
                    iteration += 1
                    seen += per_rank * ctx.world_size
                    values = {"loss/cls": cls_loss, "loss/box": box_loss, "lr": optimizer.param_groups[0]["lr"],
                              "images_per_s": seen / (time.time() - start)}
                    history.append(cls_loss + box_loss)
                    bar.set_postfix(cls=f"{cls_loss:.3f}", box=f"{box_loss:.3f}", lr=f"{values['lr']:.2g}",
                                    ims=f"{values['images_per_s']:.2f}")
                    bar.update(1)
                    if iteration % 10 == 0 or iteration == iters:
                        metrics.log(values, iteration)
                    if iteration % cfg.val_iters == 0 or iteration == iters or time.time() - last_save > 600:
                        save(final=iteration == iters)
                        last_save = time.time()
                    if cfg.val_annotations and (iteration % cfg.val_iters == 0 or iteration == iters):
                        try:
                            ap = validate(ema.module if ema else model, cfg, ctx, batch=per_rank)
                        except OSError as e:   # rank 0 writing the detections: training matters more
                            log.warning(f"validation at iteration {iteration} skipped: {e}")
                            ap = {}
                        if ap:
                            metrics.log({"val/AP": ap["AP"], "val/AP50": ap["AP50"]}, iteration)
                        model.train()
                    if stop_votes or iteration >= iters:
                        stopped = bool(stop_votes)
                        break
            except RuntimeError:
                # a SIGTERM sent to the whole process group also stops the loader's processes: save and stop
                if not stop.requested:
                    raise
                stopped = True
    bar.close()
    metrics.close()
    if stopped:
        save(final=True)
        log.warning(f"stopped by {stop.signal or 'another worker'}: saved {cfg.model} at iteration {iteration}; "
                    f"run the same command to resume")
        # only rank 0 reports 130: a launcher stops the other workers when one exits non-zero, rank 0 mid-save too
        raise SystemExit(130 if ctx.rank == 0 else 0)
    minutes = (time.time() - start) / 60
    first = sum(history[:10]) / max(1, len(history[:10]))
    last = sum(history[-10:]) / max(1, len(history[-10:]))
    log.info(f"done: iterations {iteration - len(history)} -> {iteration} in {minutes:.1f} min, {seen / max(1e-9, minutes * 60):.2f} im/s, "
             f"loss {first:.3f} -> {last:.3f}, saved {cfg.model}")
    return {"first_loss": first, "last_loss": last, "minutes": minutes, "losses": history,
            "images_per_s": seen / max(1e-9, minutes * 60)}


def validate(model: Model, cfg: TrainConfig, ctx: Context = Context(), *, batch: int) -> Dict[str, float]:
    """COCO AP of `model` on the validation set, `batch` images per rank: each rank infers its shard, rank 0
    evaluates ({} elsewhere)."""
    from .infer import InferConfig, run_model
    out = os.path.splitext(cfg.model)[0] + "-val-detections.json"
    icfg = InferConfig(model=cfg.model, images=cfg.val_images or cfg.images, annotations=cfg.val_annotations,
                       output=out, batch=batch, resize=cfg.resize, max_size=cfg.max_size,
                       loader_workers=cfg.loader_workers, with_dali=cfg.with_dali)
    return run_model(model.eval(), icfg, ctx)
