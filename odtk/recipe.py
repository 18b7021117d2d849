"""`--time-budget MINUTES`: a fine-tuning recipe fitted to the data and to the time given (issue 15).

The resolution comes from the object sizes: the small objects (5th percentile of box sides) reach SMALL_SIDE
pixels, between MIN_RESIZE and the images' own size. The iterations come from the measured time of a training step
at that size, the resolution lowered while the budget buys fewer than MIN_ITERS. Warm-up and decay are fractions
of the iterations (the shape of the README's BCCD recipe), the lr scales with the batch,
gradient clipping is on, validation runs at the end. The plan is a forecast from a synthetic step: at REPLAN_AT of
it the run re-plans from its own pace (loading and padding included), Ultralytics' `time=` way.
Settings left at their defaults are chosen; the ones the user changed are kept.
"""
import copy
import dataclasses
import functools
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .data import CocoDataset, resize_ratio
from .utils import autocast

SMALL_SIDE = 24          # px: P3's anchors (stride 8) start near 2-4 strides; smaller objects are poorly matched
MIN_RESIZE = 256         # below, ImageNet features of a MobileNet/ResNet lose most of their detail
MAX_RESIZE = 800         # ODTK's own --resize: no reason to go past it for a small dataset
RESIZE_STEP = 32         # the largest stride of the body: sizes stay multiples of it
MAX_ASPECT = 1333 / 800  # ODTK's max-size / resize
JITTER = 0.125           # training shorter side within +-12.5% of the resize (the README's 224-288 around 256)
MIN_ITERS = 600          # fewer fine-tuning steps than this left every small set of issue 15 under-trained
WARMUP_SHARE = 0.15      # the README recipe: 100 warm-up iterations of 650, decay at 74% and 92%
MILESTONE_SHARES = (0.74, 0.92)
CLIP_GRAD = 10.0
BATCH_PER_WORKER = 4
# ODTK's lr 0.01 is for batch 16. The README's 0.01 at batch 4 left issue 17's seeds 0.17 AP50 apart (loss spikes
# after the warm-up, one seed still unconverged at the end); 0.005 at batch 4 (with 800 iterations, not 650)
# brought them together (README, "When training does not learn")
LR_PER_IMAGE = 0.00125
MAX_LR = 0.01
OVERHEAD_S = 20.0        # start-up (model, data, loader workers) and the final checkpoint
VALIDATION_SHARE = 0.5   # an inference image costs about this share of a training image (no backward)
MARGIN = 1.1             # data loading shares the CPU with the steps: the measured step alone is optimistic
# shares of the planned iterations where a run re-plans from its own pace: the first before the warm-up ends (so the
# schedule rescales whole), the second with the first milestone still ahead. The raccoons' plan (1.08 s a step)
# ran 1.31 s a step and 34 minutes of 30
REPLAN_AT = (0.05, 0.5)
PACE_FROM = 5            # the first steps start the loader's workers and oneDNN's kernels: the pace is timed after
END_S = 10.0             # the final checkpoint and the exit
# FPN and head widths, widest (ODTK's) first: the next is taken while the budget buys fewer than FULL_WIDTH_ITERS.
# The heads are most of a MobileNetV2FPN's step: 128 wide it takes 0.45x the time (bf16, a batch of 4 at 288x384:
# 0.47 s against 1.04 on the 2-core CPU); in 30 minutes there the 2.2x steps gave more AP than the width on BCCD
# (0.557 against 0.547) and the kangaroos (0.483 against 0.444), less on the raccoons (0.556 against 0.580; README
# "Fine-tuning within a time budget")
HEAD_WIDTHS = (256, 128)
FULL_WIDTH_ITERS = 3000

# TrainConfig fields the recipe sets when they are at their defaults
FIELDS = ("resize", "max_size", "jitter", "iters", "milestones", "warmup", "clip_grad", "val_iters", "batch", "lr",
          "head_channels")


@dataclasses.dataclass
class Recipe:
    resize: int
    max_size: int
    jitter: Tuple[int, int]
    batch: int
    iters: int
    warmup: int
    milestones: Tuple[int, ...]
    clip_grad: float
    val_iters: int
    lr: float
    head_channels: int
    step_s: float            # measured seconds per iteration (step_size: a batch near the jitter's top)

    def describe(self, budget_min: float) -> str:
        return (f"--time-budget {budget_min:g}: --resize {self.resize} --max-size {self.max_size} --jitter "
                f"{self.jitter[0]} {self.jitter[1]} --batch {self.batch} --iters {self.iters} --warmup {self.warmup} "
                f"--milestones {' '.join(map(str, self.milestones))} --lr {self.lr:g} --clip-grad {self.clip_grad:g} "
                f"--head-channels {self.head_channels} (a step takes {self.step_s:.2f} s here)")


def round_to(value: float, step: int = RESIZE_STEP) -> int:
    return max(step, int(round(value / step)) * step)


def relative_sides(dataset: CocoDataset) -> Tuple[Tensor, Tensor]:
    """Box sides (square root of the area) as shares of their image's shorter side, and the images' original
    (height, width) [N, 2], from the annotations alone."""
    sides, sizes = [], []
    for image_id in dataset.ids:
        height, width = dataset.original_size(image_id)
        sizes.append((height, width))
        boxes = dataset.boxes[image_id]
        if len(boxes):   # rotated: own sides
            sides.append((boxes[:, 2:4] - boxes[:, :2]).clamp(min=0).prod(1).sqrt() / min(height, width))
    return torch.cat(sides).double(), torch.tensor(sizes, dtype=torch.float64)


def resolution(sides: Tensor, shorter: Tensor, aspect: Tensor) -> Tuple[int, int]:
    """(resize, max_size): the small objects at SMALL_SIDE px, no larger than the images (their median shorter
    side) nor MAX_RESIZE, at least MIN_RESIZE; max-size fits the wide images (95th percentile aspect)."""
    small = float(torch.quantile(sides, 0.05))
    native = float(torch.quantile(shorter, 0.5))
    upper = max(MIN_RESIZE, min(MAX_RESIZE, round_to(native)))
    resize = min(upper, max(MIN_RESIZE, round_to(math.ceil(SMALL_SIDE / max(small, 1e-6)))))
    return resize, max_size_for(resize, float(torch.quantile(aspect, 0.95)))


def max_size_for(resize: int, aspect: float) -> int:
    return round_to(resize * min(max(aspect, 1.0), MAX_ASPECT))


def learning_rate(batch: int) -> float:
    """LR_PER_IMAGE x the batch (all workers), at most ODTK's MAX_LR."""
    return min(MAX_LR, LR_PER_IMAGE * batch)


def schedule(iters: int) -> Tuple[int, Tuple[int, ...]]:
    """Warm-up and lr milestones as shares of the iterations."""
    return max(1, round(WARMUP_SHARE * iters)), tuple(max(1, round(s * iters)) for s in MILESTONE_SHARES)


def validation_seconds(step_s: float, *, images_per_step: int, val_images: int) -> float:
    return VALIDATION_SHARE * step_s * val_images / images_per_step


def iterations(budget_s: float, step_s: float, *, images_per_step: int, val_images: int) -> int:
    """Iterations that fit the budget after the start-up and the final validation."""
    validation_s = validation_seconds(step_s, images_per_step=images_per_step, val_images=val_images)
    return int(max(0.0, budget_s - OVERHEAD_S - validation_s) / (step_s * MARGIN))


def end_seconds(pace_s: float, *, images_per_step: int, val_images: int) -> float:
    """What a run's end needs at a pace of `pace_s` per iteration: the final validation and checkpoint."""
    return END_S + validation_seconds(pace_s, images_per_step=images_per_step, val_images=val_images)


def remaining_iterations(remaining_s: float, pace_s: float, *, end_s: float) -> int:
    """Iterations the rest of a budget buys at a run's own pace (seconds per iteration, loading included), with
    `end_s` left for the end."""
    return int(max(0.0, remaining_s - end_s) / pace_s)


def replan_points(iters: int) -> List[int]:
    """The iterations where a run of `iters` re-plans (after PACE_FROM + 10 steps at the earliest)."""
    points = {max(PACE_FROM + 10, round(share * iters)) for share in REPLAN_AT}
    return sorted(p for p in points if p < iters)


def rescale(cfg, iters: int, *, done: int, given: Dict[str, object]) -> None:
    """Write a re-planned iteration count into a TrainConfig after `done` iterations: the warm-up, milestones and
    validation interval follow it where the recipe chose them and they are still ahead."""
    warmup, milestones = schedule(iters)
    if "warmup" not in given and done < cfg.warmup:
        cfg.warmup = max(warmup, done)
    if "milestones" not in given and min(cfg.milestones, default=iters) > done:
        cfg.milestones = tuple(max(m, done + 1) for m in milestones)
    if "val_iters" not in given:
        cfg.val_iters = iters
    cfg.iters = iters


def step_seconds(model: torch.nn.Module, *, size: Tuple[int, int], batch: int, device: torch.device,
                 dtype: Optional[torch.dtype] = None, reps: int = 3) -> float:
    """Seconds of one training step as training runs it (NHWC, autocast to `dtype` when given, forward, loss,
    backward, clipping, SGD) of a copy of `model` on a random batch of `size` (height, width), the best of `reps`
    after a warm-up step."""
    net = copy.deepcopy(model).to(device).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    h, w = size
    box = [w * 0.25, h * 0.25, w * 0.75, h * 0.75, 0.5][:5 if model.config.rotated else 4]   # rotated: theta too
    boxes = torch.tensor([box], device=device).expand(batch, 1, len(box))
    labels = torch.zeros(batch, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            heads = net(x)
        losses = net.loss(([t.float() for t in heads[0]], [t.float() for t in heads[1]]), boxes, labels)
        (losses["cls"] + losses["box"]).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP_GRAD)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def jitter_for(resize: int) -> Tuple[int, int]:
    """--jitter around a resize: +-JITTER of it."""
    spread = round(JITTER * resize)
    return resize - spread, resize + spread


def step_size(sizes: Tensor, *, jitter: Tuple[int, int], max_size: int, batch: int, draws: int = 256,
              seed: int = 0) -> Tuple[int, int]:
    """(height, width) a step is timed at: the padded shape of a typical batch. `draws` batches of `batch` images
    of `sizes` (original (height, width) [N, 2]) are sized as the loader sizes them (a shorter side drawn across
    `jitter`, the longer capped by `max_size`, the batch padded to its tallest and widest image, then to a multiple of
    RESIZE_STEP); the one whose area is nearest the mean area is returned (a step costs about its pixels). Timed at the
    resize instead, steps at 192 +- 12.5% took 1.4x the time measured (their batches were 224 px); at the jitter's
    top and the median aspect without the --max-size cap, BCCD's 0.95x (1.09 s against 1.15: 4:3 images at 252-324
    capped at 384 are all 288x384) and the raccoons' 1.21x (1.31 s against 1.08: a batch of portrait and landscape
    photos pads to a square)."""
    g = torch.Generator().manual_seed(seed)
    pick = sizes[torch.randint(len(sizes), (draws, batch), generator=g)]                     # [draws, batch, 2]
    short = torch.randint(jitter[0], jitter[1] + 1, (draws, batch), generator=g).double()
    ratio = resize_ratio(pick[..., 1], pick[..., 0], short, max_size)
    shape = torch.ceil(torch.round(pick * ratio[..., None]).amax(1) / RESIZE_STEP) * RESIZE_STEP   # [draws, 2]
    area = shape.prod(1)
    height, width = shape[(area - area.mean()).abs().argmin()].tolist()
    return int(height), int(width)


def fit_resolution(resize: int, max_size: int, *, measure: Callable[[Tuple[int, int]], float], sizes: Tensor,
                   budget_s: float, batch: int, val_images: int, world_size: int = 1) -> Tuple[int, int, float, int]:
    """Lower the resolution from (resize, max_size) while the budget buys fewer than MIN_ITERS; `measure((height,
    width))` gives seconds per step, `sizes` are the images' (see step_size), `batch` is global. Returns (resize,
    max_size, step_s, iters)."""
    wide = max_size / resize
    while True:
        shape = step_size(sizes, jitter=jitter_for(resize), max_size=max_size, batch=batch // world_size)
        step_s = measure(shape)
        iters = iterations(budget_s, step_s, images_per_step=batch, val_images=val_images)
        if iters >= MIN_ITERS or resize <= MIN_RESIZE:
            return resize, max_size, step_s, iters
        # a step costs about the pixels: jump to the size the budget allows rather than one step at a time
        wanted = resize * math.sqrt(max(iters, 1) / MIN_ITERS)
        resize = max(MIN_RESIZE, min(resize - RESIZE_STEP, round_to(wanted)))
        max_size = max_size_for(resize, wide)


def make_recipe(*, budget_min: float, dataset: CocoDataset, measure: Callable[[Tuple[int, int], int], float],
                world_size: int, val_images: int, given: Dict[str, object]) -> Recipe:
    """The recipe for `budget_min` minutes; `measure((height, width), channels)` gives seconds per step of a model
    with FPN and heads `channels` wide; `given` holds the settings the user chose (kept as they are)."""
    sides, sizes = relative_sides(dataset)
    fitted, fitted_max = resolution(sides, sizes.amin(1), sizes.amax(1) / sizes.amin(1))
    batch = int(given.get("batch", BATCH_PER_WORKER * world_size))
    for channels in [int(given["head_channels"])] if "head_channels" in given else HEAD_WIDTHS:
        resize = int(given.get("resize", fitted))
        max_size = int(given.get("max_size", max_size_for(resize, fitted_max / fitted)))
        timed = functools.partial(measure, channels=channels)
        if "resize" in given or "jitter" in given:   # the training sizes are the user's: time them, nothing to fit
            jitter = tuple(given.get("jitter", jitter_for(resize)))   # a worker's batch is what is padded together
            step_s = timed(step_size(sizes, jitter=jitter, max_size=max_size, batch=batch // world_size))
            iters = iterations(budget_min * 60, step_s, images_per_step=batch, val_images=val_images)
        else:
            resize, max_size, step_s, iters = fit_resolution(resize, max_size, measure=timed, sizes=sizes,
                                                             budget_s=budget_min * 60, batch=batch,
                                                             val_images=val_images, world_size=world_size)
        if iters >= FULL_WIDTH_ITERS:
            break
    iters = int(given.get("iters", max(iters, 1)))
    warmup, milestones = schedule(iters)
    return Recipe(resize=resize, max_size=max_size,
                  jitter=tuple(given.get("jitter", jitter_for(resize))), batch=batch, iters=iters,
                  warmup=int(given.get("warmup", warmup)), milestones=tuple(given.get("milestones", milestones)),
                  clip_grad=float(given.get("clip_grad", CLIP_GRAD)), val_iters=int(given.get("val_iters", iters)),
                  lr=float(given.get("lr", learning_rate(batch))), head_channels=channels, step_s=step_s)


def apply(cfg, recipe: Recipe) -> None:
    """Write the recipe into a TrainConfig (and thereby into the checkpoint's train_config)."""
    for name in FIELDS:
        setattr(cfg, name, getattr(recipe, name))


def given_fields(cfg) -> Dict[str, object]:
    """The recipe's fields the user chose: those a TrainConfig names in `given` (flags given, whatever their value)
    or sets to something other than its class defaults."""
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return {name: getattr(cfg, name) for name in FIELDS
            if name in cfg.given or norm(getattr(cfg, name)) != norm(defaults[name])}


def saved_recipe(train_config: Optional[dict]) -> Optional[Dict[str, object]]:
    """The recipe fields a checkpoint was trained with (resuming a --time-budget run keeps its schedule)."""
    if not train_config or not train_config.get("time_budget"):
        return None
    return {name: train_config[name] for name in FIELDS if name in train_config}
