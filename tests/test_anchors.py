"""Anchor fit (odtk.anchors, `odtk data`) and fitted anchors (`--anchor-scales auto`, `--anchor-ratios auto`): the
analytic IoU against the full anchor grid, reports on COCO files with known box sizes, the fit, and fitted anchors
through checkpoints, resume and ONNX export."""
import json
import logging
import math
import random
import re
import shutil

import pytest
import torch

from conftest import mobilenet_weights
from odtk import anchors as A
from odtk.box import batched_box_iou, generate_anchors, grid_anchors
from odtk.main import main
from odtk.model import Model, ModelConfig
from odtk.train import TrainConfig, check_resume
from odtk.utils import OdtkError

ODTK = ModelConfig()
BCCD_SCALES = [2.0, 2.52, 3.17]     # the README's blood-cell recipe


def random_boxes(n: int, *, size=(352, 288), sides=(8, 280), seed: int = 0) -> torch.Tensor:
    """n boxes [n, 4] with log-uniform sides in `sides`, centred anywhere in an image of `size` (h, w), clipped."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    wh = torch.empty(n, 2).uniform_(math.log(sides[0]), math.log(sides[1]), generator=g).exp()
    centres = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], 1)
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], 1)


def coco_file(path, sides, *, image: int = 640, per_image: int = 1, seed: int = 0) -> str:
    """A COCO file of `image`-pixel square images (no image files), each with `per_image` boxes of (w, h) `sides`
    in turn, placed at random inside the image."""
    rng = random.Random(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "cell"}, {"id": 9, "name": "blob"}]}
    for i, (w, h) in enumerate(sides):
        if i % per_image == 0:
            coco["images"].append({"id": len(coco["images"]) + 1, "file_name": f"{i}.jpg", "width": image,
                                   "height": image})
        x, y = rng.uniform(0, image - w), rng.uniform(0, image - h)
        coco["annotations"].append({"id": i + 1, "image_id": len(coco["images"]), "category_id": 7 if i % 3 else 9,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path.write_text(json.dumps(coco))
    return str(path)


# -- the analytic IoU --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scales, ratios", [(ODTK.scales, ODTK.ratios), (BCCD_SCALES, [0.7, 1.0, 1.4])])
def test_best_iou_equals_the_full_anchor_grid(scales, ratios):
    """The nearest grid position per level gives the best IoU of all the anchors the model places on the image."""
    height, width = 352, 288
    boxes = random_boxes(400, size=(height, width))
    best, level = A.best_anchor_ious(boxes, scales, ratios)
    grids = [grid_anchors(generate_anchors(s, ratios, scales), s, math.ceil(height / s), math.ceil(width / s))
             for s in A.LEVEL_STRIDES]
    brute = torch.stack([batched_box_iou(g, boxes[None])[0].max(0).values for g in grids], 1)
    assert torch.allclose(best, brute.max(1).values, atol=1e-5)
    assert torch.equal(level, brute.argmax(1)) or torch.allclose(brute.gather(1, level[:, None])[:, 0], best,
                                                                  atol=1e-5)
    assert float(best.min()) < 0.5 < float(best.max()) <= 1, "boxes that fit and boxes that do not"


def test_offsets_matter_on_coarse_levels():
    """A box centred between two P7 anchors overlaps them less than one centred on an anchor."""
    on_grid = torch.tensor([[0.0, 0.0, 128.0, 128.0]])      # centre (64, 64): a P7 anchor's
    between = on_grid + 64                                  # centre (128, 128): 64 px from the nearest on each axis
    ious = [float(A.level_ious(b, [1.0], [1.0], strides=[128])[0, 0, 0]) for b in (on_grid, between)]
    assert ious[0] == pytest.approx(1.0) and ious[1] == pytest.approx(64 * 64 / (2 * 128 * 128 - 64 * 64))


# -- the report on known sizes -----------------------------------------------------------------------------------
def test_boxes_that_match_the_default_anchors_fit(tmp_path, capsys):
    path = coco_file(tmp_path / "64.json", [(64, 64)] * 30, per_image=3)
    d = A.describe_data(path, resize=640, max_size=640)
    fit = d["choice"].final.fit
    assert (d["images"], d["boxes"], d["per_image"], d["empty"]) == (10, 30, (3.0, 3), 0)
    assert dict(d["classes"]) == {"cell": 20, "blob": 10}
    assert d["side"] == pytest.approx([64] * 5) and d["aspect"] == pytest.approx([1] * 5)
    assert fit.recall == 1.0 and fit.mean_iou > 0.6 and not fit.poor
    assert sum(fit.levels) == pytest.approx(1.0)
    assert main(["data", path, "--resize", "640", "--max-size", "640"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  images +10 \(0 without boxes\)\n  boxes +30: cell 20, blob 10\n", out)
    assert re.search(r"\n  box side px +5% 64  25% 64  50% 64", out)
    assert "anchors (ODTK default)" in out and "recall 1.00 at IoU 0.5" in out and "warning" not in out


def test_the_resize_scales_the_boxes_as_training_does(tmp_path):
    """320-px boxes on 640-px images at --resize 320: 160 px, as the loader's scaled_size."""
    path = coco_file(tmp_path / "a.json", [(320, 320)] * 4)
    d = A.describe_data(path, resize=320, max_size=1333)
    assert d["side"] == pytest.approx([160] * 5)
    assert A.describe_data(path, resize=800, max_size=700)["side"] == pytest.approx([350] * 5)   # the cap


def test_large_objects_with_blood_cell_anchors_warn(tmp_path, capsys):
    path = coco_file(tmp_path / "big.json", [(600, 600)] * 12)
    fit = A.describe_data(path, resize=640, max_size=640, scales=BCCD_SCALES)["choice"].final.fit
    assert fit.recall < 0.5 and fit.poor
    assert main(["data", path, "--resize", "640", "--max-size", "640", "--anchor-scales", "2", "2.52", "3.17"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "anchors (given)" in "\n".join(lines)
    assert lines[-1].startswith("warning: the anchors (scales 2 2.52 3.17, ratios 1 2 0.5) fit these boxes poorly "
                                "(recall 0.00 < 0.9)") and "--anchor-scales auto" in lines[-1]


def test_boxes_mostly_on_p6_p7_warn(tmp_path):
    """Issue 17's failure: large objects with the blood-cell scales fit (recall 1.00) but land on P6, where the
    head learns a prior; fitted anchors move them down to P4/P5 and the warning goes."""
    path = coco_file(tmp_path / "big.json", [(150, 150), (130, 180), (180, 130)] * 4, image=256)
    given = A.describe_data(path, resize=256, max_size=256, scales=BCCD_SCALES)["choice"].final
    assert not given.fit.poor and given.fit.coarse > A.MAX_COARSE_SHARE
    assert "of the boxes on P6/P7" in A.fit_warning(given) and "--anchor-scales auto" in A.fit_warning(given)
    fitted = A.describe_data(path, resize=256, max_size=256, scales="auto")["choice"].final
    assert fitted.fit.coarse <= A.MAX_COARSE_SHARE and A.fit_warning(fitted) is None


# -- the fit -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sides, given", [((300, 600), [1.0, 1.26, 1.59]), ((16, 48), [8.0, 10.08, 12.7])],
                         ids=["large objects, small anchors", "small objects, large anchors"])
def test_auto_recovers_scales_for_known_sizes(sides, given):
    boxes = random_boxes(3000, size=(640, 640), sides=sides, seed=1)
    before = A.anchor_fit(boxes, given, ODTK.ratios, fg_iou=0.5)
    scales, ratios = A.fit_anchors(boxes, ratios=ODTK.ratios, fg_iou=0.5)
    after = A.anchor_fit(boxes, scales, ratios, fg_iou=0.5)
    assert before.recall < 0.5 and after.recall >= 0.95, (before, after, scales)
    assert ratios == ODTK.ratios and len(scales) == 3
    assert scales[1] / scales[0] == pytest.approx(2 ** (1 / 3), rel=0.01), "three scales per octave"


def test_fitted_ratios_follow_the_boxes_aspect():
    """Tall boxes (height 2.5-3.5 x width): fitted ratios cover them better than ODTK's 1 2 0.5."""
    g = torch.Generator().manual_seed(2)
    w = torch.empty(2000).uniform_(20, 60, generator=g)
    h = w * torch.empty(2000).uniform_(2.5, 3.5, generator=g)
    boxes = torch.stack([100 - w / 2, 200 - h / 2, 100 + w / 2, 200 + h / 2], 1)
    scales, ratios = A.fit_anchors(boxes, fg_iou=0.5)
    assert 2.2 < sorted(ratios)[1] < 3.6
    assert (A.anchor_fit(boxes, scales, ratios, fg_iou=0.5).mean_iou >
            A.anchor_fit(boxes, *A.fit_anchors(boxes, ratios=ODTK.ratios, fg_iou=0.5), fg_iou=0.5).mean_iou)


def test_the_fit_is_deterministic_and_samples_large_sets():
    boxes = random_boxes(10000, seed=3)
    first = A.fit_anchors(boxes, fg_iou=0.5)
    assert A.fit_anchors(boxes, fg_iou=0.5) == first
    assert len(first[0]) == len(first[1]) == 3
    assert all(isinstance(v, float) for v in first[0] + first[1])


def test_choose_anchors_switches_only_poor_defaults():
    small = random_boxes(500, sides=(14, 28), seed=4)
    kwargs = dict(fg_iou=0.5, default_scales=ODTK.scales, default_ratios=ODTK.ratios)
    switched = A.choose_anchors(small, scales=None, ratios=None, fit_poor_defaults=True, **kwargs)
    assert switched.switched and switched.start.fit.poor and not switched.final.fit.poor
    kept = A.choose_anchors(small, scales=ODTK.scales, ratios=None, fit_poor_defaults=True, **kwargs)
    assert not kept.switched and kept.fitted is None and kept.final.scales == ODTK.scales
    fits = random_boxes(500, sides=(40, 300), seed=4)
    good = A.choose_anchors(fits, scales=None, ratios=None, fit_poor_defaults=True, **kwargs)
    assert good.fitted is None and not good.switched
    only_ratios = A.choose_anchors(small, scales=BCCD_SCALES, ratios="auto", **kwargs)
    assert only_ratios.final.scales == BCCD_SCALES and only_ratios.fitted is not None


def test_a_class_the_anchors_miss_makes_the_fit_poor_even_when_the_whole_is_fine():
    # BCCD's shape: many boxes the defaults fit, a few small ones (7%) they miss
    big, small = random_boxes(560, sides=(48, 200), seed=4), random_boxes(40, sides=(16, 22), seed=6)
    boxes, labels = torch.cat([big, small]), torch.cat([torch.zeros(560), torch.ones(40)]).long()
    whole = A.anchor_fit(boxes, ODTK.scales, ODTK.ratios, fg_iou=0.5)
    by_class = A.anchor_fit(boxes, ODTK.scales, ODTK.ratios, fg_iou=0.5, labels=labels, names=["cell", "dot"])
    assert whole.recall >= A.MIN_RECALL and not whole.poor
    assert by_class.recall == whole.recall and by_class.worst_class[0] == "dot" and by_class.poor
    assert by_class.worst_class[1] == pytest.approx(
        float((A.best_anchor_ious(small, ODTK.scales, ODTK.ratios)[0] >= 0.5).double().mean()))
    choice = A.choose_anchors(boxes, scales=None, ratios=None, fg_iou=0.5, default_scales=ODTK.scales,
                              default_ratios=ODTK.ratios, fit_poor_defaults=True, labels=labels, names=["cell", "dot"])
    assert choice.switched and choice.final.fit.worst_class[1] >= A.MIN_RECALL
    assert "recall of the dot boxes" in A.poor_fit_warning(choice.start)
    # a class under MIN_CLASS_BOXES is not held to it alone
    few = A.anchor_fit(boxes[:570], ODTK.scales, ODTK.ratios, fg_iou=0.5, labels=labels[:570], names=["cell", "dot"])
    assert few.worst_class[0] == "cell" and not few.poor


# -- fitted anchors in models, configs and the CLI ---------------------------------------------------------------
def test_fitted_anchors_survive_model_config_save_and_load(tmp_path):
    scales, ratios = A.fit_anchors(random_boxes(1000, sides=(100, 300), seed=5), fg_iou=0.5)
    assert (scales, ratios) != (ODTK.scales, ODTK.ratios)
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=2, scales=scales, ratios=ratios))
    model.save(str(tmp_path / "m.pth"))
    loaded, _ = Model.load(str(tmp_path / "m.pth"))
    assert loaded.config.scales == scales and loaded.config.ratios == ratios
    for a, b in zip(loaded.cell_anchors, model.cell_anchors):
        assert torch.equal(a, b)


def test_anchor_flags_are_checked():
    assert TrainConfig(model="m", annotations="a", anchor_scales="auto", anchor_ratios="auto").anchor_ratios == "auto"
    for kwargs, message in [({"anchor_ratios": [2.0, "auto"]}, "--anchor-ratios 2.0 auto: give numbers, or auto"),
                            ({"anchor_scales": "fit"}, "--anchor-scales fit: give numbers, or auto alone"),
                            ({"anchor_ratios": [1.0, -2.0]}, "--anchor-ratios -2.0: must be a positive")]:
        with pytest.raises(OdtkError, match=message):
            TrainConfig(model="m", annotations="a", **kwargs)
    saved = ModelConfig(scales=[1.0, 2.0], ratios=[1.0])
    check_resume(TrainConfig(model="m", annotations="a", anchor_scales="auto", anchor_ratios="auto"), saved)
    check_resume(TrainConfig(model="m", annotations="a", anchor_scales=[1, 2], anchor_ratios=[1]), saved)
    with pytest.raises(OdtkError, match="resuming keeps the checkpoint's --anchor-ratios 1.0, not 1.0 2.0"):
        check_resume(TrainConfig(model="m", annotations="a", anchor_ratios=[1.0, 2.0]), saved)


def _one_error(argv, caplog) -> str:
    caplog.clear()
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text, errors
    return errors[0]


def test_odtk_data_bad_input_is_one_line(tmp_path, caplog):
    missing = str(tmp_path / "nope.json")
    assert _one_error(["data", missing], caplog) == f"odtk data: error: {missing}: annotations file not found"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}],
                                 "categories": [{"id": 1, "name": "a"}]}))
    assert f"{empty}: no boxes" in _one_error(["data", str(empty)], caplog)
    sizeless = tmp_path / "sizeless.json"
    sizeless.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
                                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]}))
    assert "image 1 (a.jpg) has no width/height" in _one_error(["data", str(sizeless)], caplog)
    good = coco_file(tmp_path / "good.json", [(64, 64)] * 3)
    assert "--anchor-ious 0.6 0.5: need" in _one_error(["data", good, "--anchor-ious", "0.6", "0.5"], caplog)
    assert "--anchor-scales 2.0 auto: give numbers" in _one_error(["data", good, "--anchor-scales", "2", "auto"],
                                                                  caplog)


def test_odtk_data_reads_missing_sizes_from_the_images(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    sizeless = tmp_path / "sizeless.json"
    sizeless.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
                                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                                     "bbox": [10, 10, 50, 50]}]}))
    assert main(["data", str(sizeless), "--images", str(tmp_path), "--resize", "200", "--max-size", "1000"]) == 0
    assert re.search(r"box side px +5% 100  25% 100", capsys.readouterr().out)   # 100 px high -> 200: boxes x2


def test_odtk_data_auto_prints_flags_that_reproduce_the_fit(tmp_path, capsys):
    path = coco_file(tmp_path / "big.json", [(600, 560), (400, 450), (500, 500)] * 4)
    assert main(["data", path, "--resize", "640", "--max-size", "640", "--anchor-scales", "auto",
                 "--anchor-ratios", "auto"]) == 0
    out = capsys.readouterr().out
    flags = next(line for line in out.splitlines() if "to keep them:" in line).split("to keep them: ")[1].split()
    scales = [float(v) for v in flags[1:flags.index("--anchor-ratios")]]
    ratios = [float(v) for v in flags[flags.index("--anchor-ratios") + 1:]]
    d = A.describe_data(path, resize=640, max_size=640, scales=scales, ratios=ratios)
    assert not d["choice"].final.fit.poor and "fit these boxes poorly" not in out


# -- training with auto anchors, resume, ONNX --------------------------------------------------------------------
class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def train_argv(model, train, images, *extra):
    argv = ["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "2", "--resize", "96", "--max-size", "96", "--jitter", "96", "96", "--warmup", "1",
            "--val-iters", "1000", "--loader-workers", "0", *extra]
    weights = mobilenet_weights()
    return argv + (["--backbone-weights", weights] if weights else [])


@pytest.fixture(scope="module")
def auto_model(tmp_path_factory):
    """A MobileNetV2FPN trained 1 iteration with --anchor-scales auto --anchor-ratios auto on synthetic shapes of
    96-px images: (model, train.json, images, what training logged)."""
    folder = tmp_path_factory.mktemp("auto")
    assert main(["synthetic", str(folder), "--train", "6", "--val", "1", "--size", "96"]) == 0
    model, train, images = str(folder / "m.pth"), str(folder / "train.json"), str(folder / "images")
    handler, odtk_log = Lines(), logging.getLogger("odtk")
    level = odtk_log.level
    odtk_log.addHandler(handler)
    odtk_log.setLevel(logging.INFO)
    try:
        assert main(train_argv(model, train, images, "--iters", "1", "--anchor-scales", "auto",
                               "--anchor-ratios", "auto")) == 0
    finally:
        odtk_log.removeHandler(handler)
        odtk_log.setLevel(level)
    return model, train, images, "\n".join(handler.lines)


def test_training_with_auto_stores_the_fit_and_resumes_with_it(auto_model, tmp_path, caplog):
    trained, train, images, logged = auto_model
    config = Model.load(trained)[0].config
    expected = A.describe_data(train, resize=96, max_size=96, scales="auto", ratios="auto")["choice"].final
    assert (config.scales, config.ratios) == (expected.scales, expected.ratios)
    assert f"after:  {expected.describe()}" in logged and "before: scales 4 5.04 6.35, ratios 1 2 0.5" in logged
    model = str(tmp_path / "m.pth")
    shutil.copy(trained, model)
    caplog.set_level(logging.INFO, logger="odtk")
    assert main(train_argv(model, train, images, "--iters", "2", "--anchor-scales", "auto",
                           "--anchor-ratios", "auto")) == 0
    assert f"resuming {model} at iteration 1" in caplog.text and f"anchors: {expected.describe()}" in caplog.text
    resumed, state = Model.load(model)
    assert state["iteration"] == 2 and (resumed.config.scales, resumed.config.ratios) == (config.scales,
                                                                                           config.ratios)


def test_default_anchors_that_fit_poorly_are_fitted_and_said(auto_model, tmp_path, caplog):
    _, train, images, _ = auto_model
    caplog.set_level(logging.INFO, logger="odtk")
    model = str(tmp_path / "d.pth")
    assert main(train_argv(model, train, images, "--iters", "1")) == 0
    assert re.search(rf"anchor fit of the default anchors on {re.escape(train)}: recall 0\.\d\d, mean IoU "
                     r"0\.\d\d(, \w+ [\d.]+)?: fitting anchors to the data \(--anchor-scales auto", caplog.text)
    assert Model.load(model)[0].config.scales != ODTK.scales


def test_auto_anchors_export_to_onnx_with_the_same_detections(auto_model, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'odtk[onnx]')")
    pytest.importorskip("onnx")
    from test_export import _assert_same_detections
    from odtk.data import CocoDataset, collate
    trained, train, images, _ = auto_model
    path = str(tmp_path / "m.pth")
    model, state = Model.load(trained)
    assert model.config.scales != ODTK.scales
    with torch.no_grad():   # spread the scores well above the threshold: a model trained 1 step sits at the prior
        model.cls_head[-1].weight.mul_(300)
        model.cls_head[-1].bias.zero_()
        model.box_head[-1].weight.mul_(30)
    model.save(path)
    onnx_path = str(tmp_path / "m.onnx")
    assert main(["export", path, onnx_path, "--size", "96", "--batch", "1"]) == 0
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    dataset = CocoDataset(images, train, fit=(96, 96))
    model.eval()
    for i in range(2):
        x = collate([dataset[i]], pad_to=(96, 96))[0]
        scores, boxes, classes = session.run(None, {"input_1": x.numpy()})
        ref_s, ref_b, ref_c = model.predict(x)
        assert (ref_s > 0.05).sum() > 10
        _assert_same_detections(scores[0], boxes[0], classes[0], ref_s[0].numpy(), ref_b[0].numpy(),
                                ref_c[0].numpy())
