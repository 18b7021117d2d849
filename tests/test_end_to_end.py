"""Tiny train -> infer -> evaluate on synthetic data, through the CLI."""
import json
import logging

import pytest
import torch

from odtk.data import CocoDataset, make_loader
from odtk.main import main
from odtk.model import Model
from odtk.train import TrainConfig, build_model


def mean_loss(model: Model, images: str, annotations: str) -> float:
    """The model's mean training loss (focal + box) over a set, without augmentation."""
    dataset = CocoDataset(images, annotations, resize=128, max_size=128, category_ids=model.config.category_ids)
    loader = make_loader(dataset, batch_size=8, training=False, workers=0, size_divisible=model.config.size_divisible)
    losses = []
    with torch.no_grad():
        for x, boxes, labels, _, _ in loader:
            parts = model.eval().loss(model(x), boxes, labels)
            losses.append(float(parts["cls"] + parts["box"]))
    return sum(losses) / len(losses)


def test_loss_falls_and_checkpoint_is_complete(trained):
    model, images, train, _, weights = trained
    m, state = Model.load(model)
    assert state["iteration"] == 60 and "optimizer" in state and "scheduler" in state
    assert m.config.category_ids == [10, 20, 30] and m.config.class_names == ["square", "circle", "triangle"]
    # the model training started from: the recipe's build, same seed
    torch.manual_seed(0)
    cfg = TrainConfig(model=model, annotations=train, images=images, backbone=["MobileNetV2FPN"],
                      anchor_scales=[2.0, 2.52, 3.17], backbone_weights=weights)
    start, _ = build_model(cfg, CocoDataset(images, train))
    before, after = mean_loss(start, images, train), mean_loss(m, images, train)
    assert after < 0.9 * before, (before, after)


def test_infer_ap_positive_and_equals_pycocotools(trained, synthetic, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from odtk.infer import InferConfig, infer

    model, images, _, out, _ = trained
    val = synthetic[2]              # images the model never trained on
    detections = str(out / "dets.json")
    results = infer(InferConfig(model=model, images=images, annotations=val, output=detections, batch=4,
                                resize=128, max_size=128, loader_workers=0))
    assert results["AP"] > 0
    assert "square" in results["table"] and "AP50" in results["table"]   # the per-class table, for main to print
    rows = json.load(open(detections))
    assert {r["category_id"] for r in rows} <= {10, 20, 30}
    gt = COCO(val)
    ev = COCOeval(gt, gt.loadRes(detections), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert round(ev.stats[0], 4) == round(results["AP"], 4)
    assert round(ev.stats[1], 4) == round(results["AP50"], 4)


def test_train_resumes_and_stops_at_iters(trained, caplog):
    caplog.set_level(logging.INFO, logger="odtk")
    model, images, train, _, weights = trained
    args = ["train", model, "--annotations", train, "--images", images, "--iters", "60"]
    assert main(args) == 0
    assert "already trained for 60 iterations" in caplog.text


def test_infer_folder_without_annotations(trained, tmp_path):
    model, images, *_ = trained
    out = tmp_path / "d.json"
    assert main(["infer", model, "--images", images, "--output", str(out), "--resize", "128", "--max-size", "128",
                 "--batch", "8", "--loader-workers", "0"]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(len(r["bbox"]) == 4 for r in rows)


def test_cli_prints_the_evaluation_table(trained, synthetic, capsys):
    """infer() returns the report; `odtk infer` prints it."""
    from odtk.main import main
    model, images, _, out, _ = trained
    assert main(["infer", model, "--images", images, "--annotations", synthetic[2], "--output",
                 str(out / "cli.json"), "--resize", "128", "--max-size", "128", "--loader-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "square" in printed and "AP50" in printed and "Average Precision" in printed
