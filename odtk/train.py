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
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import recipe
from .anchors import AUTO, AnchorChoice, data_report, fit_warning, format_report, short_report
from .backbones import BACKBONES, find_weights, load_imagenet
from .checks import anchor_setting, at_least, check_box_kind, check_writable, non_negative, ordered_range, positive
from .data import Augment, CocoDataset, loader_factory
from .distributed import (MASTER, Context, Ranks, StopRequest, TrainingStopped, check_nodes, launch, local_workers,
                          resolve_device, torchrun_context)
from .health import TrainingHealth
from .model import Model, ModelConfig
from .plots import TrainingResults
from .progress import progress
from .utils import OdtkError, autocast, autocast_dtype, log

DEFAULT_BACKBONE = "ResNet50FPN"


def training_augment() -> Augment:
    """ODTK's training augmentation, the CLI's defaults: flips and a slight colour jitter (inference uses none)."""
    return Augment(flip=True, brightness=0.002, contrast=0.002, saturation=0.002, hue=0.0002)


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
    augment: Augment = field(default_factory=training_augment)
    anchor_ious: Tuple[float, float] = (0.4, 0.5)
    anchor_scales: Union[None, str, List[float]] = None    # None: ODTK's, fitted when they fit poorly; "auto"
    anchor_ratios: Union[None, str, List[float]] = None    # None: ODTK's 1 2 0.5; "auto": fitted to the boxes
    backbone_weights: Optional[str] = None
    head_channels: Optional[int] = None   # FPN and head width; None: ODTK's 256 (a resumed run keeps its own)
    clip_grad: float = 0.0
    loader_workers: int = 2
    with_dali: bool = False
    seed: int = 0
    ema: float = 0.0                 # EMA decay of the weights; 0: off
    workers: Optional[int] = None    # processes on this node: default one per GPU, else 1
    nodes: int = 1
    node_rank: int = 0
    master: str = MASTER
    device: str = "auto"             # auto: the GPUs when PyTorch sees one, else the CPU
    time_budget: Optional[float] = None   # minutes: fit the recipe's defaults to the data and this time (recipe.py)
    verbose: bool = False
    rotated_bbox: bool = False       # rotated boxes (ODTK's --rotated-bbox): rotated data, anchors, IoU and NMS
    given: Tuple[str, ...] = ()      # recipe settings given as flags: --time-budget keeps them even at a default

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would crash later or train on nonsense (NaN lr, 1-pixel images), flag by flag."""
        for name in self.backbone or []:
            if name not in BACKBONES:
                raise OdtkError(f"--backbone {name}: unknown backbone (choose from {', '.join(BACKBONES)})")
        for flag, value in (("--classes", self.classes), ("--batch", self.batch), ("--resize", self.resize),
                            ("--max-size", self.max_size), ("--iters", self.iters), ("--val-iters", self.val_iters),
                            ("--head-channels", self.head_channels)):
            at_least(flag, value, 1)
        for flag, value in (("--warmup", self.warmup), ("--loader-workers", self.loader_workers)):
            at_least(flag, value, 0)
        ordered_range("--jitter", self.jitter, low=1)
        ordered_range("--anchor-ious", self.anchor_ious, low=0, high=1)
        for flag, value in (("--lr", self.lr), ("--schedule", self.schedule), ("--gamma", self.gamma)):
            positive(flag, value)
        anchor_setting("--anchor-scales", self.anchor_scales)
        anchor_setting("--anchor-ratios", self.anchor_ratios)
        for flag, value in (("--regularization-l2", self.regularization_l2), ("--clip-grad", self.clip_grad),
                            *((f"--augment-{k}", getattr(self.augment, k))
                              for k in ("brightness", "contrast", "saturation", "hue"))):
            non_negative(flag, value)
        if self.time_budget is not None:
            positive("--time-budget", self.time_budget)
        if self.ema and not 0 < self.ema < 1:
            raise OdtkError(f"--ema {self.ema}: the decay must be between 0 and 1 (e.g. 0.9999)")
        if int(self.iters * self.schedule) < 1:
            raise OdtkError(f"--iters {self.iters} --schedule {self.schedule}: less than one iteration")
        for m in self.milestones:
            at_least("--milestones", m, 1)
        check_nodes(self.nodes, self.node_rank)
        resolve_device(self.device)


def lr_factor(iteration: int, *, warmup: int, milestones, gamma: float) -> float:
    """ODTK's schedule: linear warmup from 0.1x, then x gamma at each milestone passed."""
    if warmup and iteration < warmup:
        return 0.1 + 0.9 * iteration / warmup
    return gamma ** sum(1 for m in milestones if m <= iteration)


def build_model(cfg: TrainConfig, dataset: CocoDataset, *, base: Optional[Model] = None) -> Tuple[Model, dict]:
    """A new model for `dataset`, optionally --fine-tune'd from `base` (default: loaded from cfg.fine_tune);
    resuming is `Model.load(cfg.model, ema=False)`."""
    num_classes = len(dataset.category_ids)
    if cfg.classes is not None:
        if cfg.classes < num_classes:
            raise OdtkError(f"{cfg.annotations}: {num_classes} categories but --classes {cfg.classes}")
        num_classes = cfg.classes
    names = [dataset.class_names.get(c, str(c)) for c in dataset.category_ids]
    if cfg.fine_tune:
        return fine_tuned(cfg, dataset, num_classes, names, base or Model.load(cfg.fine_tune)[0]), {}
    backbones = list(cfg.backbone or [DEFAULT_BACKBONE])
    weights = {b: find_weights(b, cfg.backbone_weights) for b in backbones}
    pretrained = all(weights.values())
    anchors = log_data(cfg, anchor_report(cfg, dataset)).final
    config = ModelConfig(backbones=backbones, num_classes=num_classes, anchor_ious=list(cfg.anchor_ious),
                         pretrained=pretrained, category_ids=dataset.category_ids, class_names=names,
                         scales=anchors.scales, ratios=anchors.ratios, rotated=cfg.rotated_bbox,
                         channels=cfg.head_channels or ModelConfig.channels)
    model = Model(config=config)
    if pretrained:
        for name, path in weights.items():
            load_imagenet(model.backbones[name], path)
            log.info(f"{name}: ImageNet weights from {path}")
    else:
        log.warning("no ImageNet weights found (--backbone-weights, or torch's hub cache): training starts from "
                    "random weights, with trainable BatchNorm")
    return model, {}


def anchor_report(cfg: TrainConfig, dataset: CocoDataset, config: Optional[ModelConfig] = None) -> dict:
    """`odtk data`'s report on the training set at --resize/--max-size: for a new model (no `config`) with the
    anchors --anchor-scales/--anchor-ratios ask for (ODTK's, fitted when they fit poorly, when neither is given),
    else with `config`'s."""
    scales, ratios = (cfg.anchor_scales, cfg.anchor_ratios) if config is None else (config.scales, config.ratios)
    return data_report(dataset, resize=cfg.resize, max_size=cfg.max_size, scales=scales, ratios=ratios,
                       fg_iou=cfg.anchor_ious[1], fit_poor_defaults=config is None)


def log_data(cfg: TrainConfig, report: dict) -> AnchorChoice:
    """Log the data and anchor report (the full table with --verbose) and return its AnchorChoice."""
    choice = report["choice"]
    log.info(format_report(report) if cfg.verbose else short_report(report))
    if choice.switched:
        worst = choice.start.fit.worst_class
        log.info(f"anchor fit of the default anchors on {cfg.annotations}: recall {choice.start.fit.recall:.2f}, "
                 f"mean IoU {choice.start.fit.mean_iou:.2f}{f', {worst[0]} {worst[1]:.2f}' if worst else ''}: "
                 f"fitting anchors to the data (--anchor-scales auto "
                 f"--anchor-ratios auto); pass --anchor-scales or --anchor-ratios to keep yours")
    if cfg.verbose:   # the table has said the rest
        return choice
    if choice.fitted:
        log.info(f"anchors fitted to the {choice.start.fit.boxes:,} boxes:\n  before: {choice.start.describe()}"
                 f"\n  after:  {choice.fitted.describe()}")
    else:
        log.info(f"anchors: {choice.start.describe()}")
    warning = fit_warning(choice.final)
    if warning:
        log.warning(warning)
    return choice


def fine_tuned(cfg: TrainConfig, dataset: CocoDataset, num_classes: int, names: List[str], base: Model) -> Model:
    """--fine-tune: every weight of that checkpoint (`base`, loaded with its EMA when it has one) but the last class
    layer when the classes differ, which starts afresh at the prior like a new model's. Its anchors are kept: the
    box head has learned them."""
    mc = base.config
    check_rotated(cfg, mc, cfg.fine_tune, "--fine-tune starts from", "fine-tune from a rotated model")
    if cfg.head_channels not in (None, mc.channels):
        raise OdtkError(f"{cfg.fine_tune}: its FPN and heads are {mc.channels} channels wide, which --fine-tune "
                        f"keeps: drop --head-channels {cfg.head_channels}")
    if cfg.anchor_scales is not None or cfg.anchor_ratios is not None:
        log.warning(f"--fine-tune keeps the anchors of {cfg.fine_tune} (scales {_shown(mc.scales)}, ratios "
                    f"{_shown(mc.ratios)}): --anchor-scales/--anchor-ratios ignored")
    log_data(cfg, anchor_report(cfg, dataset, mc))
    new_head = mc.num_classes != num_classes or mc.category_ids != dataset.category_ids
    config = ModelConfig(**{**mc.__dict__, "num_classes": num_classes, "category_ids": dataset.category_ids,
                            "class_names": names, "anchor_ious": list(cfg.anchor_ious)})
    model = Model(config=config)
    class_layer = f"cls_head.{len(model.cls_head) - 1}."
    own = model.state_dict()
    model.load_state_dict({k: own[k] if new_head and k.startswith(class_layer) else v
                           for k, v in base.state_dict().items()})
    log.info(f"fine-tuning from {cfg.fine_tune}" + (f": new class head for {num_classes} classes" if new_head else ""))
    return model


def check_rotated(cfg: TrainConfig, config: ModelConfig, path: str, use: str, rotated_fix: str) -> None:
    """A checkpoint of the other kind of boxes than --rotated-bbox asks for, which training `use`s: one line."""
    if config.rotated == cfg.rotated_bbox:
        return
    if config.rotated:
        raise OdtkError(f"{path}: a rotated model (trained with --rotated-bbox), which {use}: add --rotated-bbox")
    raise OdtkError(f"{path}: an axis-aligned model, which {use}, but --rotated-bbox asks for a rotated one: drop "
                    f"--rotated-bbox, or {rotated_fix}")


def check_resume(cfg: TrainConfig, config: ModelConfig) -> None:
    """Resuming keeps the checkpoint's model: refuse --backbone/--classes/--anchor-scales/--anchor-ratios (and
    --rotated-bbox, which must match it) that say otherwise rather than ignore them (`auto` anchors are the
    checkpoint's, fitted when it was started)."""
    check_rotated(cfg, config, cfg.model, "resuming keeps",
                  f"add --override to train a new model (overwrites {cfg.model})")
    asked = {"--backbone": (cfg.backbone, config.backbones), "--classes": (cfg.classes, config.num_classes),
             "--head-channels": (cfg.head_channels, config.channels),
             "--anchor-scales": (None if cfg.anchor_scales == AUTO else cfg.anchor_scales, config.scales),
             "--anchor-ratios": (None if cfg.anchor_ratios == AUTO else cfg.anchor_ratios, config.ratios)}
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


def train(cfg: TrainConfig, *, started: Optional[float] = None) -> Optional[Dict[str, float]]:
    """Train with cfg: checks inputs here (one-line errors), then runs one worker per device. Returns the loss
    figures when training ran in this process; raises OdtkError, TrainingStopped (after a signal, with a
    checkpoint) or WorkersFailed (spawned workers, which logged their errors). `started`: the time.time() a
    --time-budget counts from (`odtk train` passes its own start; default: now)."""
    started = time.time() if started is None else started
    cfg.validate()   # again: the fields may have been changed since construction
    check_writable(cfg.model, "MODEL")
    for path in (cfg.annotations, cfg.val_annotations):   # before any worker starts: one message, not N
        if path and not os.path.isfile(path):
            raise OdtkError(f"{path}: annotations file not found")
    ctx = torchrun_context(cfg.device)
    world = ctx.world_size if ctx else local_workers(cfg.workers, cfg.device) * cfg.nodes
    if cfg.batch is not None and cfg.batch % world:
        raise OdtkError(f"--batch {cfg.batch} does not split evenly over {world} workers")
    return launch(functools.partial(worker, cfg, started=started), workers=cfg.workers, nodes=cfg.nodes,
                  node_rank=cfg.node_rank, master=cfg.master, verbose=cfg.verbose, device=cfg.device)


def worker(cfg: TrainConfig, ctx: Context = Context(), *, started: Optional[float] = None) -> Dict[str, float]:
    """One worker's training (a module-level function: spawned workers unpickle it)."""
    return Trainer(cfg=cfg, ctx=ctx, started=started).fit()


@dataclass
class Pace:
    """A --time-budget run's re-planning (Trainer.replan): when the budget ends, what its end must leave time for,
    the settings the user gave (kept), the iterations still to re-plan at, and (iteration, time) the pace is
    timed from."""
    deadline: float
    val_images: int
    given: Dict[str, object]
    points: List[int]
    reserve: float                   # seconds the end needs (validation, save): set from the pace at each re-plan
    since: Optional[Tuple[int, float]] = None


@dataclass
class TrainState:
    """What a step changes and a checkpoint restores."""
    model: Model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: Optional[torch.dtype] = None   # autocast's: fp16 (with the scaler) on CUDA, bf16 on a CPU that has it
    ema: Optional[ModelEMA] = None
    iteration: int = 0

    @property
    def amp(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def precision(self) -> str:
        return {torch.float16: "fp16 mixed precision", torch.bfloat16: "bf16 mixed precision"}.get(self.dtype, "fp32")

    def checkpoint(self) -> dict:
        """The training state saved beside the weights (Model.save's keyword arguments)."""
        extra = {"scaler": self.scaler.state_dict()} if self.amp else {}
        if self.ema:
            extra["ema"] = self.ema.state_dict()
        return {"iteration": self.iteration, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), **extra}


def new_state(cfg: TrainConfig, model: Model, saved: dict, device: torch.device) -> TrainState:
    """Optimizer, lr schedule, loss scaler and EMA for `model`, restored from a checkpoint's `saved` state (with
    the random generators, so a resumed run draws what the whole run would have)."""
    cuda = device.type == "cuda"
    model = model.to(device).train()
    # NHWC: cuDNN's tensor-core and oneDNN's convolutions without layout changes (a step about 1.4x on an H100,
    # 1.1x on this 2-core CPU)
    model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel updates every parameter (GradScaler's unscale and inf check included)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.regularization_l2, fused=cuda)
    # reads cfg at each step: a --time-budget run that re-plans moves its warm-up and milestones (recipe.rescale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
        i, warmup=cfg.warmup, milestones=[int(m * cfg.schedule) for m in cfg.milestones], gamma=cfg.gamma))
    dtype = autocast_dtype(device, full_precision=cfg.full_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)   # bf16 has fp32's range: no scaling
    state = TrainState(model, optimizer, scheduler, scaler, dtype=dtype, iteration=int(saved.get("iteration", 0)))
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for group in optimizer.param_groups:   # the saved groups carry the saving machine's kernel choice
            group.update(fused=cuda, foreach=None)
    if state.amp and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    if saved.get("rng"):
        set_rng_state(saved["rng"])
    if cfg.ema or saved.get("ema"):
        averaged = saved.get("ema") or {}
        state.ema = ModelEMA(model, cfg.ema or averaged["decay"], updates=averaged.get("updates", 0))
        if averaged:
            state.ema.module.load_state_dict(averaged["state_dict"])
    return state


def starting_point(cfg: TrainConfig, ctx: Context = Context(), *, given: Dict[str, object]
                   ) -> Tuple[CocoDataset, Model, dict, bool, int]:
    """The training set, the model and its saved training state, whether MODEL is resumed, and the number of
    validation images. With --time-budget, cfg gets the recipe first (a resumed run the one it started with),
    keeping the `given` settings (recipe.given_fields before it)."""
    resumed = Model.load(cfg.model, ema=False) if os.path.exists(cfg.model) and not cfg.override else None
    if resumed:   # before the data: its boxes are read as the model's kind
        check_resume(cfg, resumed[0].config)
    dataset = CocoDataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size,
                          jitter=cfg.jitter, augment=cfg.augment, require_boxes=True,
                          category_ids=resumed[0].config.category_ids if resumed else None, rotated=cfg.rotated_bbox)
    check_data_kind(cfg, dataset)
    val_images = 0
    if cfg.val_annotations:   # fail on a bad validation set now, not hours into training
        val = CocoDataset(cfg.val_images or cfg.images, cfg.val_annotations, category_ids=dataset.category_ids,
                          rotated=cfg.rotated_bbox)
        check_data_kind(cfg, val)
        val_images = len(val)
    base = Model.load(cfg.fine_tune)[0] if cfg.fine_tune and not resumed else None   # read once, used twice
    if cfg.time_budget:
        if base is not None and "head_channels" not in given:   # the width of the weights it starts from
            given = {**given, "head_channels": base.config.channels}
        budget_recipe(cfg, ctx, dataset, resumed[1] if resumed else None, val_images=val_images, given=given)
    if not resumed:
        return (dataset, *build_model(cfg, dataset, base=base), False, val_images)
    model, saved = resumed
    log.info(f"resuming {cfg.model} at iteration {saved.get('iteration', 0)}")
    log_data(cfg, anchor_report(cfg, dataset, model.config))
    return dataset, model, saved, True, val_images


def check_data_kind(cfg: TrainConfig, dataset: CocoDataset) -> None:
    """Annotations of the other kind of boxes than --rotated-bbox trains on: one line with the fix."""
    if cfg.rotated_bbox:
        check_box_kind(dataset, "--rotated-bbox", "drop --rotated-bbox, or give rotated annotations")
    else:
        check_box_kind(dataset, "training without --rotated-bbox", "add --rotated-bbox to train a rotated model")


def budget_recipe(cfg: TrainConfig, ctx: Context, dataset: CocoDataset, saved: Optional[dict], *,
                  val_images: int, given: Dict[str, object]) -> None:
    """--time-budget: write the recipe into cfg (and the dataset's sizes), keeping the `given` settings; a resumed
    run keeps its own."""
    kept = recipe.saved_recipe(saved.get("train_config")) if saved else None
    if kept:
        for name, value in kept.items():
            setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
        log.info(f"--time-budget: resuming with the recipe {cfg.model} started with")
    else:
        backbones = list(cfg.backbone or [DEFAULT_BACKBONE])
        per_worker = int(given.get("batch", recipe.BATCH_PER_WORKER * ctx.world_size)) // ctx.world_size
        ranks = Ranks(ctx)

        @functools.lru_cache(maxsize=None)
        def timed(channels: int) -> Model:
            return Model(config=ModelConfig(backbones=backbones, num_classes=len(dataset.category_ids),
                                            rotated=cfg.rotated_bbox, channels=channels))

        def measure(size: Tuple[int, int], channels: int) -> float:   # every rank decides on the mean
            seconds = recipe.step_seconds(timed(channels), size=size, batch=per_worker, device=ctx.device,
                                          dtype=autocast_dtype(ctx.device, full_precision=cfg.full_precision))
            return ranks.mean(torch.tensor([seconds], device=ctx.device))[0]

        chosen = recipe.make_recipe(budget_min=cfg.time_budget, dataset=dataset, measure=measure,
                                    world_size=ctx.world_size, val_images=val_images, given=given)
        recipe.apply(cfg, chosen)
        log.info(chosen.describe(cfg.time_budget) + (f"; kept yours: {', '.join(sorted(given))}" if given else ""))
    dataset.resize, dataset.max_size, dataset.jitter = cfg.resize, cfg.max_size, cfg.jitter


def parallel(model: Model, ctx: Context) -> torch.nn.Module:
    """The module the steps run: DDP over the ranks (trainable BatchNorm synchronised on GPU), else the model."""
    if not ctx.distributed:
        return model
    if not model.config.pretrained:
        if ctx.device.type == "cuda":   # trainable BN: statistics over all GPUs
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("trainable BatchNorm with gloo: each process normalises with its own batch statistics "
                        "(PyTorch's SyncBatchNorm is GPU-only)")
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


class Trainer:
    """One worker's training loop, from small parts: the state (new_state), one `train_step`, and the periodic
    jobs (`after_step`: progress and metrics, `checkpoint`, `validation`). Decisions that every rank must take
    together (skip a batch, stop, save, a diverged loss) go through `self.ranks`."""

    def __init__(self, *, cfg: TrainConfig, ctx: Context = Context(), started: Optional[float] = None):
        begun = time.time() if started is None else started   # a --time-budget's start (train()'s `started`)
        torch.manual_seed(cfg.seed)
        self.cfg, self.ctx, self.ranks = cfg, ctx, Ranks(ctx)
        given = recipe.given_fields(cfg)   # before the recipe fills them in
        self.dataset, model, saved, resumed, val_images = starting_point(cfg, ctx, given=given)
        # --time-budget re-plans from the run's pace, unless the iterations were given or the run resumes (its
        # budget's start is past)
        self.pace = (Pace(deadline=begun + cfg.time_budget * 60, val_images=val_images, given=given,
                          points=recipe.replan_points(int(cfg.iters)), reserve=recipe.END_S)
                     if cfg.time_budget and not resumed and "iters" not in given and cfg.schedule == 1 else None)
        self.state = new_state(cfg, model, saved, ctx.device)
        self.iters = int(cfg.iters * cfg.schedule)
        self.batch = cfg.batch if cfg.batch is not None else 2 * ctx.world_size   # train() checked the split
        self.saved_at = self.state.iteration if resumed else None   # what MODEL holds (None: not from this run)
        self.net: torch.nn.Module = self.state.model   # DDP-wrapped by fit() when distributed
        self.history: List[float] = []
        self.health = TrainingHealth(warmup=int(cfg.warmup), iters=self.iters)
        self.seen = 0
        self.start = self.last_save = time.time()
        # <model stem>-results.csv/png, written by rank 0; a resumed run keeps the rows up to its checkpoint
        self.results = (TrainingResults(model=cfg.model, resume_at=self.state.iteration if resumed else None)
                        if ctx.rank == 0 else None)

    def fit(self) -> Dict[str, float]:
        """Train up to the last iteration; returns the loss figures and per-iteration losses ({} when MODEL is
        already trained). Raises TrainingStopped after a signal (with a checkpoint), OdtkError when training
        diverges or the last save fails."""
        if self.state.iteration >= self.iters:
            log.info(f"{self.cfg.model} already trained for {self.state.iteration} iterations (--iters "
                     f"{self.iters}); use --override to restart")
            return {}
        loader, self.net, metrics = self.prepare()
        try:
            with StopRequest() as stop:
                stopped = self.loop(loader, metrics, stop)
        finally:
            metrics.close()
        if stopped:
            raise self.stopped(stop.signal)
        return self.summary()

    def prepare(self) -> Tuple[Iterable, torch.nn.Module, Metrics]:
        """The loader, the network the steps run and the metrics writer; logs what is about to happen."""
        cfg, ctx, model = self.cfg, self.ctx, self.state.model
        loader = loader_factory(cfg.with_dali)(self.dataset, batch_size=self.batch // ctx.world_size, training=True,
                                               workers=cfg.loader_workers, size_divisible=model.config.size_divisible,
                                               rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                               device=ctx.device)
        metrics = Metrics(cfg.logdir, cfg.post_metrics) if ctx.rank == 0 else Metrics(None, None)
        log.debug(f"model config: {model.config}")
        log.debug(f"train config: {cfg}")
        precision = self.state.precision
        log.info(f"training {'+'.join(model.config.backbones)} on {len(self.dataset)} images, {ctx.world_size} x "
                 f"{ctx.device.type}, batch {self.batch} ({self.batch // ctx.world_size} per worker), {precision}, "
                 f"{self.iters} iterations")
        self.start = self.last_save = time.time()
        return loader, parallel(model, ctx), metrics

    def loop(self, loader, metrics: Metrics, stop: StopRequest) -> bool:
        """Steps until the last iteration (False) or a stop agreed by the ranks (True)."""
        with progress(total=self.iters, initial=self.state.iteration, desc="train", unit="it",
                      disable=self.ctx.rank != 0) as bar:
            try:
                for batch in self.batches(loader):
                    due = time.time() - self.last_save > 600
                    # late: a --time-budget run at its deadline, less what its end needs (one vote for all flags)
                    late = self.pace is not None and time.time() + self.pace.reserve >= self.pace.deadline
                    votes = self.ranks.any(skip=batch is None, stop=stop.requested, save=due, late=late)
                    if votes["stop"]:
                        return True
                    if votes["skip"]:   # a rank's batch had no readable image (each was logged): all skip it
                        continue
                    cls_loss, box_loss = self.train_step(batch)
                    self.after_step(cls_loss, box_loss, bar, metrics, save=votes["save"], late=votes["late"])
                    if self.state.iteration >= self.iters:
                        return False
            except RuntimeError:
                # a SIGTERM sent to the process group also ends the loader's processes, and torch raises this
                # wherever the loop is: stop (and save) as asked
                if not stop.requested:
                    raise
        return True

    def batches(self, loader) -> Iterator[Optional[tuple]]:
        """Batches from the current iteration on, epoch after epoch (a resumed run restarts mid-epoch); None for
        a batch without any readable image."""
        while True:
            loader.start(*divmod(self.state.iteration, loader.batches))   # the Loader protocol, both loaders
            yield from loader

    def train_step(self, batch) -> Tuple[float, float]:
        """One SGD step; returns the (cls, box) losses averaged over ranks. A non-finite loss raises before the
        update: no weights are spoiled."""
        s, device = self.state, self.ctx.device
        images, boxes, labels, _, _ = (t.to(device, non_blocking=True) for t in batch)
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, s.dtype):
            heads = self.net(images)
        losses = s.model.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels,
                              distributed=self.ctx.distributed)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(losses["cls"] + losses["box"]).backward()
        cls_loss, box_loss = self.ranks.mean(torch.stack([losses["cls"].detach(), losses["box"].detach()]))
        if not math.isfinite(cls_loss + box_loss):
            raise self.diverged(f"loss is {cls_loss + box_loss}", s.iteration + 1)
        if self.ctx.rank == 0:
            self.warn(self.health.heads(s.iteration + 1, s.model, heads, boxes, labels, tuple(images.shape[-2:])))
            self.warn(self.health.box_loss(s.iteration + 1, box_loss))
        if self.cfg.clip_grad:
            s.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(s.optimizer.param_groups[0]["params"], self.cfg.clip_grad)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        if s.ema:
            s.ema.update(s.model)
        s.iteration += 1
        return cls_loss, box_loss

    def after_step(self, cls_loss: float, box_loss: float, bar, metrics: Metrics, *, save: bool,
                   late: bool = False) -> None:
        """The periodic jobs: progress and metrics, checkpoint (every --val-iters, at the end, or when `save`:
        10 minutes since the last), validation; the results CSV is written with each checkpoint and validation,
        its curves redrawn at each validation and at the end."""
        if self.pace:   # first: it may end the run at this iteration
            self.replan(bar, late=late)
        it, last, cfg = self.state.iteration, self.state.iteration == self.iters, self.cfg
        self.seen += self.batch
        values = {"loss/cls": cls_loss, "loss/box": box_loss, "lr": self.state.optimizer.param_groups[0]["lr"],
                  "images_per_s": self.seen / (time.time() - self.start)}
        self.history.append(cls_loss + box_loss)
        bar.set_postfix(cls=f"{cls_loss:.3f}", box=f"{box_loss:.3f}", lr=f"{values['lr']:.2g}",
                        **{"im/s": f"{values['images_per_s']:.2f}"})
        bar.update(1)
        if it % 10 == 0 or last:
            metrics.log(values, it)
            self.record(it, values)
        saved = it % cfg.val_iters == 0 or last or save
        if saved:
            self.checkpoint(final=last)
        validated = bool(cfg.val_annotations) and (it % cfg.val_iters == 0 or last)
        if validated:
            ap = self.validation()
            if ap:
                log.info(f"validation at iteration {it}:\n{ap['table']}")
                metrics.log({"val/AP": ap["AP"], "val/AP50": ap["AP50"]}, it)
                self.record(it, {**values, "val/AP": ap["AP"], "val/AP50": ap["AP50"]})
        if self.results is not None and (saved or validated):   # rows past a checkpoint are dropped on resume
            self.results.save(plot=validated or last)

    def replan(self, bar, *, late: bool) -> None:
        """--time-budget: at the plan's re-planning points, the iterations the rest of the budget buys at this run's
        own pace (the plan timed a synthetic step, without loading); the schedule follows (recipe.rescale)."""
        pace, it, now = self.pace, self.state.iteration, time.time()
        if it == recipe.PACE_FROM or pace.since is None:
            pace.since = (it, now)
        if pace.points and it >= pace.points[0]:
            pace.points.pop(0)
            seconds = self.ranks.mean(torch.tensor([(now - pace.since[1]) / max(1, it - pace.since[0])],
                                                   device=self.ctx.device))[0]   # every rank takes the same decision
            pace.since = (it, now)
            pace.reserve = recipe.end_seconds(seconds, images_per_step=self.batch, val_images=pace.val_images)
            iters = it + max(1, recipe.remaining_iterations(pace.deadline - now, seconds, end_s=pace.reserve))
            if iters != self.iters:
                log.info(f"--time-budget: {seconds:.2f} s per iteration so far: {self.iters} -> {iters} iterations")
                self.rescale(iters, bar)
        elif late and it < self.iters:   # `late`: voted by the ranks before this step
            # the pace after the last re-plan was slower than before it: end now rather than past the budget
            log.info(f"--time-budget: out of time at iteration {it} of {self.iters}: training ends here")
            self.rescale(it, bar)

    def rescale(self, iters: int, bar) -> None:
        """A --time-budget run's new length: the schedule (recipe.rescale), the progress bar and the health checks."""
        recipe.rescale(self.cfg, iters, done=self.state.iteration, given=self.pace.given)
        self.iters = bar.total = self.health.iters = iters
        self.health.warmup = int(self.cfg.warmup)
        log.debug(f"--time-budget: --warmup {self.cfg.warmup} --milestones {' '.join(map(str, self.cfg.milestones))}")

    def record(self, iteration: int, values: Dict[str, float]) -> None:
        """A row of the results CSV (rank 0)."""
        if self.results is not None:
            self.results.add(iteration, values)

    def checkpoint(self, *, final: bool = False) -> None:
        """Save MODEL (rank 0), never with non-finite weights. A failed save is retried at the next one; the
        final one raises."""
        s, cfg = self.state, self.cfg
        # a finite loss can still leave NaN weights. Each rank checks its own copy, identical under DDP, so all
        # decide alike without a collective: the save after a stop may not find the other ranks in step
        if not finite_weights(s.model):
            raise self.diverged("weights are not finite", s.iteration)
        self.last_save = time.time()   # a failed save too: the next try comes with the next periodic save
        if self.ctx.rank == 0:
            try:
                # the settings it was trained with: Detector.load takes its resize/max_size from them
                s.model.save(cfg.model, **s.checkpoint(), train_config=asdict(cfg))
            except OSError as e:   # the training state stays in memory
                if final:
                    raise OdtkError(f"{cfg.model}: cannot save the checkpoint at iteration {s.iteration} ({e}); "
                                    f"{self.kept()}") from None
                log.warning(f"{cfg.model}: cannot save the checkpoint at iteration {s.iteration} ({e}); training "
                            f"goes on and retries at the next save")
                return
            self.saved_at = s.iteration
            log.debug(f"saved {cfg.model} at iteration {s.iteration}")

    def validation(self) -> Dict[str, float]:
        """COCO AP of the (EMA) weights on --val-annotations, each rank inferring its shard ({} off rank 0)."""
        s = self.state
        try:
            return validate(s.ema.module if s.ema else s.model, self.cfg, self.ctx,
                            batch=self.batch // self.ctx.world_size)
        except OSError as e:   # rank 0 writing the detections: training matters more
            log.warning(f"validation at iteration {s.iteration} skipped: {e}")
            return {}
        finally:
            s.model.train()

    def kept(self) -> str:
        """What MODEL holds, for messages about a run that did not save."""
        if self.saved_at is None:
            return f"{self.cfg.model} was not written by this run"
        return f"{self.cfg.model} keeps iteration {self.saved_at}"

    def diverged(self, what: str, iteration: int) -> OdtkError:
        return OdtkError(f"{what} at iteration {iteration}: training diverged; try a lower --lr (now {self.cfg.lr}) "
                         f"or a longer --warmup; {self.kept()}")

    def stopped(self, signal: Optional[str]) -> TrainingStopped:
        """After a stop agreed by the ranks: a checkpoint, and the exception that reports it."""
        self.checkpoint(final=True)
        if self.results is not None:
            self.results.save(plot=True)
        log.warning(f"stopped by {signal or 'another worker'}: saved {self.cfg.model} at iteration "
                    f"{self.state.iteration}; run the same command to resume")
        return TrainingStopped(self.state.iteration, signal, rank=self.ctx.rank)

    @staticmethod
    def warn(message: Optional[str]) -> None:
        if message:
            log.warning(message)

    def summary(self) -> Dict[str, float]:
        """The 'done' line; loss figures and the per-iteration losses."""
        minutes = (time.time() - self.start) / 60
        speed = self.seen / max(1e-9, minutes * 60)
        first = sum(self.history[:10]) / max(1, len(self.history[:10]))
        last = sum(self.history[-10:]) / max(1, len(self.history[-10:]))
        it = self.state.iteration
        log.info(f"done: iterations {it - len(self.history)} -> {it} in {minutes:.1f} min, {speed:.2f} im/s, "
                 f"loss {first:.3f} -> {last:.3f}, saved {self.cfg.model}")
        for message in self.health.warnings:   # again at the end, where a log reader looks first
            log.warning(f"during training: {message}")
        return {"first_loss": first, "last_loss": last, "minutes": minutes, "losses": self.history,
                "images_per_s": speed, "warnings": list(self.health.warnings)}


def validate(model: Model, cfg: TrainConfig, ctx: Context = Context(), *, batch: int) -> Dict[str, float]:
    """COCO AP of `model` on the validation set, `batch` images per rank: each rank infers its shard, rank 0
    evaluates ({} elsewhere)."""
    from .infer import InferConfig, run_model
    out = os.path.splitext(cfg.model)[0] + "-val-detections.json"
    icfg = InferConfig(model=cfg.model, images=cfg.val_images or cfg.images, annotations=cfg.val_annotations,
                       output=out, batch=batch, resize=cfg.resize, max_size=cfg.max_size,
                       loader_workers=cfg.loader_workers, with_dali=cfg.with_dali, full_precision=cfg.full_precision)
    return run_model(model.eval(), icfg, ctx)
