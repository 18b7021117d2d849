"""--time-budget (odtk.recipe): resolution from the object sizes, iterations from the measured speed, the schedule's
shape, the user's flags kept, and a resumed run keeping the recipe it started with."""
import sys
import time

import pytest
import torch

from odtk import recipe as R
from odtk.main import main, parse
from odtk.model import Model, ModelConfig
from odtk.train import TrainConfig, lr_factor


def test_resolution_brings_the_small_objects_to_small_side():
    shorter = torch.full((10,), 1000.0, dtype=torch.float64)
    aspect = torch.full((10,), 1.5, dtype=torch.float64)
    sides = torch.linspace(0.04, 0.5, 100, dtype=torch.float64)      # 5th percentile 0.063
    resize, max_size = R.resolution(sides, shorter, aspect)
    small = float(torch.quantile(sides, 0.05))
    assert resize % R.RESIZE_STEP == 0
    assert abs(small * resize - R.SMALL_SIDE) <= small * R.RESIZE_STEP / 2 + 1e-9   # nearest step
    assert max_size == R.round_to(resize * 1.5)


def test_resolution_bounds():
    aspect = torch.ones(4, dtype=torch.float64)
    tiny = torch.full((20,), 0.001, dtype=torch.float64)
    large = torch.full((20,), 0.6, dtype=torch.float64)
    # tiny objects: up to the images' own size, never past ODTK's 800
    assert R.resolution(tiny, torch.full((4,), 480.0, dtype=torch.float64), aspect)[0] == 480
    assert R.resolution(tiny, torch.full((4,), 3000.0, dtype=torch.float64), aspect)[0] == R.MAX_RESIZE
    # large objects (or small images): never under MIN_RESIZE
    assert R.resolution(large, torch.full((4,), 480.0, dtype=torch.float64), aspect)[0] == R.MIN_RESIZE
    assert R.resolution(tiny, torch.full((4,), 100.0, dtype=torch.float64), aspect)[0] == R.MIN_RESIZE
    # very wide images: max-size capped at ODTK's ratio
    wide = torch.full((4,), 4.0, dtype=torch.float64)
    assert R.resolution(large, torch.full((4,), 480.0, dtype=torch.float64), wide)[1] == R.round_to(256 * R.MAX_ASPECT)


def test_schedule_has_the_readme_recipes_shape():
    warmup, milestones = R.schedule(650)
    assert warmup == 98 and milestones == (481, 598)     # the README's 100 / 480 600 for 650 iterations
    assert R.schedule(1) == (1, (1, 1))


def test_iterations_fit_the_budget():
    # 30 min, 2 s a step, 40 validation images at batch 4: (1800 - 20 - 0.5 * 2 * 10) / (2 * 1.1)
    assert R.iterations(1800, 2.0, images_per_step=4, val_images=40) == int((1800 - 20 - 10) / 2.2)
    assert R.iterations(10, 2.0, images_per_step=4, val_images=0) == 0


def test_remaining_iterations_leave_room_for_validation_and_the_end():
    # 600 s left at 1.5 s an iteration (its own pace: no margin), 40 validation images at batch 4 (7.5 s)
    end = R.end_seconds(1.5, images_per_step=4, val_images=40)
    assert end == R.END_S + 7.5
    assert R.remaining_iterations(600, 1.5, end_s=end) == int((600 - R.END_S - 7.5) / 1.5)
    assert R.remaining_iterations(5, 1.5, end_s=R.END_S) == 0


def test_replan_points_come_before_the_warmup_ends_and_before_the_first_milestone():
    iters = 1500
    points = R.replan_points(iters)
    warmup, milestones = R.schedule(iters)
    assert len(points) == 2 and R.PACE_FROM < points[0] < warmup and points[1] < milestones[0]
    assert R.replan_points(16) == [] or all(p < 16 for p in R.replan_points(16))
    assert R.replan_points(10) == []   # too short to time a pace


def test_rescale_moves_the_schedule_it_chose_and_keeps_what_was_given():
    cfg = TrainConfig(model="m.pth", annotations="a.json", iters=1500, warmup=225, milestones=(1110, 1380),
                      val_iters=1500)
    R.rescale(cfg, 1200, done=75, given={})
    warmup, milestones = R.schedule(1200)
    assert (cfg.iters, cfg.warmup, cfg.milestones, cfg.val_iters) == (1200, warmup, milestones, 1200)
    cfg = TrainConfig(model="m.pth", annotations="a.json", iters=1500, warmup=225, milestones=(1110, 1380),
                      val_iters=100)
    R.rescale(cfg, 1800, done=750, given={"val_iters": 100})   # past the warm-up: it stays
    assert (cfg.iters, cfg.warmup, cfg.milestones, cfg.val_iters) == (1800, 225, R.schedule(1800)[1], 100)
    cfg = TrainConfig(model="m.pth", annotations="a.json", iters=1500, warmup=225, milestones=(100, 1380))
    R.rescale(cfg, 1000, done=750, given={"warmup": 225})   # a milestone passed: the milestones stay
    assert (cfg.warmup, cfg.milestones) == (225, (100, 1380))


def test_time_budget_replans_from_the_runs_own_pace(synthetic, tmp_path, caplog, monkeypatch):
    # a plan from a step timed far too fast (1 ms): the run finds its real pace and ends near the budget instead
    images, train, val = synthetic
    monkeypatch.setattr(R, "step_seconds", lambda *a, **k: 0.001)
    monkeypatch.setattr(R, "OVERHEAD_S", 0.0)
    monkeypatch.setattr(R, "END_S", 0.0)
    monkeypatch.setattr(R, "REPLAN_AT", (0.0,))   # once, after PACE_FROM + 10 steps
    model = str(tmp_path / "m.pth")
    with caplog.at_level("INFO", logger="odtk"):
        assert main(["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
                     "--time-budget", "0.25", "--resize", "128", "--loader-workers", "0",
                     "--val-annotations", val]) == 0
    planned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--time-budget 0.25:")]
    planned_iters = int(planned[0].split("--iters ")[1].split()[0])
    replanned = [r.getMessage() for r in caplog.records if "s per iteration so far" in r.getMessage()]
    assert planned_iters > 5000 and len(replanned) == 1, replanned
    assert replanned[0].startswith("--time-budget: ") and f": {planned_iters} -> " in replanned[0]
    target = int(replanned[0].split(" -> ")[1].split()[0])
    saved = torch.load(model, weights_only=False)
    cfg, done = saved["train_config"], R.PACE_FROM + 10
    # the re-planned length, or a little less where the pace slowed after the re-plan and the deadline came first
    assert done < saved["iteration"] == cfg["iters"] == cfg["val_iters"] <= target < 200
    assert saved["iteration"] == target or "out of time at iteration" in caplog.text
    warmup, milestones = R.schedule(target)
    assert cfg["warmup"] == max(warmup, done)
    assert tuple(cfg["milestones"]) == tuple(max(m, done + 1) for m in milestones)
    # the lr schedule followed the new milestones to the last step
    factor = lr_factor(saved["iteration"], warmup=cfg["warmup"], milestones=cfg["milestones"], gamma=cfg["gamma"])
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg["lr"] * factor)


def test_time_budget_ends_at_the_deadline(synthetic, tmp_path, caplog, monkeypatch):
    # no re-planning and a plan far too long: the run stops at the budget's end, validates and saves there
    images, train, val = synthetic
    monkeypatch.setattr(R, "step_seconds", lambda *a, **k: 0.001)
    monkeypatch.setattr(R, "OVERHEAD_S", 0.0)
    monkeypatch.setattr(R, "END_S", 0.0)
    monkeypatch.setattr(R, "REPLAN_AT", ())
    model = str(tmp_path / "m.pth")
    with caplog.at_level("INFO", logger="odtk"):
        assert main(["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
                     "--time-budget", "0.1", "--resize", "128", "--loader-workers", "0",
                     "--val-annotations", val]) == 0
    saved = torch.load(model, weights_only=False)
    ended = saved["iteration"]
    assert 1 <= ended == saved["train_config"]["iters"] < 100
    assert f"out of time at iteration {ended} of " in caplog.text
    assert f"validation at iteration {ended}:" in caplog.text


def test_the_deadline_counts_from_the_commands_start(synthetic, tmp_path, monkeypatch):
    from odtk.constants import LOADED
    from odtk.train import Trainer
    images, train, _ = synthetic
    monkeypatch.setattr(R, "step_seconds", lambda *a, **k: 0.01)
    started = time.time() - 30            # 30 s of imports and start-up before the trainer
    cfg = TrainConfig(model=str(tmp_path / "m.pth"), annotations=train, images=images, backbone=["MobileNetV2FPN"],
                      time_budget=2, loader_workers=0, device="cpu")
    assert Trainer(cfg=cfg, started=started).pace.deadline == started + 120
    # the command line passes odtk's import time; a call from Python its own start
    seen = {}
    monkeypatch.setattr(sys.modules["odtk.train"], "train", lambda cfg, started: seen.setdefault("started", started))
    before = time.time()
    assert main(["train", "m.pth", "--annotations", train, "--images", images]) == 0
    assert before <= seen["started"] <= time.time() and LOADED < before


class Squares:
    """relative_sides' view of a dataset: 8 square 1000 px images with a 100 px box each."""
    ids = list(range(8))
    boxes = {i: torch.tensor([[0.0, 0.0, 100.0, 100.0]]) for i in ids}

    def original_size(self, image_id):
        return 1000, 1000


def test_the_head_narrows_when_the_budget_buys_too_few_steps():
    def measure(size, channels):   # a step costs its pixels and the square of the width
        return size[0] * size[1] / 256 ** 2 * (channels / 256) ** 2

    def plan(minutes, **given):
        return R.make_recipe(budget_min=minutes, dataset=Squares(), measure=measure, world_size=1, val_images=0,
                             given=given)
    resize = plan(60).resize
    wide = R.step_size(torch.full((8, 2), 1000.0, dtype=torch.float64), jitter=R.jitter_for(resize),
                       max_size=R.max_size_for(resize, 1.0), batch=4)
    enough = R.FULL_WIDTH_ITERS * R.MARGIN * measure(wide, 256) / 60 + 1    # minutes that buy enough wide steps
    assert plan(enough).head_channels == R.HEAD_WIDTHS[0] and plan(enough).iters >= R.FULL_WIDTH_ITERS
    narrow = plan(enough / 2)
    assert narrow.head_channels == R.HEAD_WIDTHS[1] and narrow.resize == resize
    assert narrow.iters == R.iterations(enough / 2 * 60, measure(wide, R.HEAD_WIDTHS[1]), images_per_step=4,
                                        val_images=0)
    assert plan(enough / 2, head_channels=256).head_channels == 256   # given: kept, however few the steps


def test_a_given_jitter_is_timed_as_given():
    """--jitter without --resize: the training sizes are the user's, so the recipe times them and fits nothing."""
    seen = []

    def measure(size, channels):
        seen.append(size)
        return 1.0

    chosen = R.make_recipe(budget_min=1, dataset=Squares(), measure=measure, world_size=1, val_images=0,
                           given={"jitter": (96, 96), "head_channels": 64})
    assert seen == [(96, 96)] and chosen.jitter == (96, 96) and chosen.head_channels == 64


def test_fit_resolution_lowers_the_size_until_the_budget_buys_enough_steps():
    seen = []

    def measure(size):   # a step costs its pixels: 1 s at 256 x 256
        seen.append(size)
        return size[0] * size[1] / 256 ** 2

    square = torch.full((8, 2), 1000.0, dtype=torch.float64)
    budget = 800 * 1.1 * 1.0 + R.OVERHEAD_S    # 800 steps of 1 s
    resize, max_size, step_s, iters = R.fit_resolution(640, 864, measure=measure, sizes=square, budget_s=budget,
                                                       batch=4, val_images=0)
    assert iters >= R.MIN_ITERS and resize < 640 and resize % R.RESIZE_STEP == 0
    assert seen[0] == R.step_size(square, jitter=R.jitter_for(640), max_size=864, batch=4)
    assert seen[-1] == R.step_size(square, jitter=R.jitter_for(resize), max_size=max_size, batch=4)
    assert max_size == R.max_size_for(resize, 864 / 640)
    # a budget too small for MIN_ITERS even at MIN_RESIZE: it stops there, with what the budget buys
    resize, _, step_s, iters = R.fit_resolution(640, 864, measure=measure, sizes=square, budget_s=R.OVERHEAD_S + 110,
                                                batch=4, val_images=0)
    assert resize == R.MIN_RESIZE and step_s == (288 / 256) ** 2            # batches of 4 at 224-288 pad to 288
    assert iters == R.iterations(R.OVERHEAD_S + 110, step_s, images_per_step=4, val_images=0)
    assert 70 < iters < R.MIN_ITERS
    # with two workers a step pads each worker's 4 images, and the validation is shared
    R.fit_resolution(640, 864, measure=measure, sizes=square, budget_s=budget, batch=8, val_images=0, world_size=2)
    assert seen[-1] == R.step_size(square, jitter=R.jitter_for(resize), max_size=max_size, batch=4)


def test_steps_are_timed_at_the_padded_shape_of_a_typical_batch():
    """Batches drawn from the images' own sizes, sized and padded as the loader does."""
    square = torch.full((8, 2), 256.0, dtype=torch.float64)
    # 192 +- 12.5%: the largest of 4 draws from 168-216 is mostly over 192, so batches are mostly 224 px
    assert R.step_size(square, jitter=(168, 216), max_size=256, batch=4) == (224, 224)
    assert R.step_size(square, jitter=(168, 216), max_size=256, batch=1) == (192, 192)   # one image: half are 192
    bccd = torch.tensor([[480.0, 640.0]] * 8, dtype=torch.float64)      # 4:3 at 252-324, capped at 384 wide
    assert R.step_size(bccd, jitter=(252, 324), max_size=384, batch=4) == (288, 384)
    wide = torch.tensor([[1000.0, 1500.0]] * 8, dtype=torch.float64)    # capped by --max-size: 235 x 352 padded
    assert R.step_size(wide, jitter=(252, 324), max_size=352, batch=4) == (256, 352)
    # portrait and landscape photos in one batch pad to a square: 288 x 384 and 384 x 288 make 384 x 384
    mixed = torch.tensor([[480.0, 640.0], [640.0, 480.0]] * 4, dtype=torch.float64)
    assert R.step_size(mixed, jitter=(288, 288), max_size=416, batch=4) == (384, 384)
    assert R.step_size(bccd, jitter=(288, 288), max_size=416, batch=4) == (288, 384)


def test_learning_rate_scales_with_the_batch_up_to_odtks():
    assert R.learning_rate(4) == 0.005 and R.learning_rate(2) == 0.0025
    assert R.learning_rate(16) == R.learning_rate(64) == R.MAX_LR == 0.01


def test_given_fields_are_what_differs_from_the_defaults():
    cfg = TrainConfig(model="m.pth", annotations="a.json", iters=300, jitter=(640, 1024))
    assert R.given_fields(cfg) == {"iters": 300}


def test_flags_given_at_their_default_values_are_kept():
    args = parse(["train", "m.pth", "--annotations", "a.json", "--lr", "0.01", "--iters=90000", "--resize", "512"])
    assert set(args.given) == {"lr", "iters", "resize"}          # 0.01 and 90000 are the defaults
    assert parse(["train", "m.pth", "--annotations", "a.json"]).given == ()
    cfg = TrainConfig(model="m.pth", annotations="a.json", lr=0.01, resize=512, given=args.given)
    assert R.given_fields(cfg) == {"lr": 0.01, "iters": 90000, "resize": 512}


def test_step_seconds_times_a_training_step_without_touching_the_model():
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = R.step_seconds(model, size=(64, 96), batch=2, device=torch.device("cpu"), reps=1)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_time_budget_trains_with_the_recipe_and_resume_keeps_it(synthetic, tmp_path, caplog):
    images, train, val = synthetic
    model = str(tmp_path / "m.pth")
    args = ["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--time-budget", "20", "--iters", "4", "--loader-workers", "0", "--val-annotations", val]
    with caplog.at_level("INFO", logger="odtk"):
        assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--time-budget 20:")]
    assert said and "--iters 4 " in said[0] and "kept yours: iters" in said[0]
    saved = torch.load(model, weights_only=False)
    cfg = saved["train_config"]
    assert saved["iteration"] == 4 and cfg["time_budget"] == 20 and cfg["iters"] == 4
    assert cfg["resize"] == R.MIN_RESIZE and cfg["clip_grad"] == R.CLIP_GRAD and cfg["batch"] == R.BATCH_PER_WORKER
    assert cfg["lr"] == R.learning_rate(R.BATCH_PER_WORKER) == 0.005
    assert (cfg["warmup"], tuple(cfg["milestones"])) == R.schedule(4) and cfg["val_iters"] == 4
    caplog.clear()
    with caplog.at_level("INFO", logger="odtk"):   # same command again: the saved recipe, nothing re-measured
        assert main(args) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("resuming with the recipe" in m for m in messages)
    assert any("already trained for 4 iterations" in m for m in messages)
    assert not any(m.startswith("--time-budget 20:") for m in messages)


def test_time_budget_must_be_positive(synthetic, tmp_path, caplog):
    images, train, _ = synthetic
    assert main(["train", str(tmp_path / "m.pth"), "--annotations", train, "--images", images,
                 "--time-budget", "0"]) == 2
    assert "--time-budget 0.0: must be a positive finite number" in caplog.text
