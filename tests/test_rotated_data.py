"""Rotated boxes on the data side (issue 13): loading, augmentation, collate, DALI, DOTA conversion, synthetic."""
import json
import logging
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from odtk.convert import bbox_corners, convert_dota, fold_angle, min_area_rect
from odtk.data import (Augment, CocoDataset, collate, crop_boxes, flip_boxes, make_loader,
                       scale_boxes, turn_boxes)
from odtk.main import main
from odtk.rotated import crop_reference
from odtk.synthetic import ROTATED_CLASSES, fill_convex, make_rotated_image, write_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
DOTA = os.path.join(HERE, "data", "dota")
THETA = math.atan2(0.6, 0.8)            # sin 0.6, cos 0.8: 3-4-5 rectangles have whole-pixel corners


def corners(box) -> torch.Tensor:
    """[4, 2] corners of (x1, y1, x2, y2, theta), written out from ODTK's rotate_boxes: an offset (dx, dy) from
    the centre goes to (dx cos + dy sin, -dx sin + dy cos)."""
    x1, y1, x2, y2, theta = (float(v) for v in box)
    cx, cy, c, s = (x1 + x2) / 2, (y1 + y2) / 2, math.cos(theta), math.sin(theta)
    offsets = [(x1 - cx, y1 - cy), (x2 - cx, y1 - cy), (x2 - cx, y2 - cy), (x1 - cx, y2 - cy)]
    return torch.tensor([(cx + dx * c + dy * s, cy - dx * s + dy * c) for dx, dy in offsets], dtype=torch.float64)


def same_points(a, b, tol=1e-3) -> bool:
    """The same set of points, in any order."""
    d = torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return bool(d.min(0).values.max() < tol and d.min(1).values.max() < tol)


def outside_by(points, polygon) -> np.ndarray:
    """How far each of the [N, 2] points lies outside the convex polygon (<= 0: inside)."""
    polygon, points = np.asarray(polygon, dtype=np.float64), np.asarray(points, dtype=np.float64)
    centre = polygon.mean(axis=0)
    worst = np.full(len(points), -np.inf)
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        normal = np.array([b[1] - a[1], a[0] - b[0]]) / np.hypot(*(b - a))
        normal *= -np.sign((centre - a) @ normal)            # pointing away from the centre
        worst = np.maximum(worst, (points - a) @ normal)
    return worst


def _coco(path, anns, width=100, height=80):
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
                                "annotations": anns, "categories": [{"id": 3, "name": "ship"}]}))
    Image.new("RGB", (width, height)).save(path.parent / "a.png")
    return str(path)


def _ann(i, bbox, **extra):
    return {"id": i, "image_id": 1, "category_id": 3, "bbox": bbox, "iscrowd": 0, **extra}


# the convention

def test_corners_follow_odtk_rotate_boxes_with_y_down():
    bbox = [51, 43, 20, 10, THETA]                          # the docstrings' example
    expected = [(50, 50), (66, 38), (72, 46), (56, 58)]     # positive theta: counter-clockwise on screen
    assert np.allclose(bbox_corners(bbox), expected)
    assert np.allclose(corners([51, 43, 71, 53, THETA]), expected)
    assert bbox_corners([5, 6, 4, 2, 0]).tolist() == [[5, 6], [9, 6], [9, 8], [5, 8]]


def test_folding_keeps_the_rectangle():
    assert fold_angle(20, 10, 0.5) == (20, 10, 0.5)
    assert fold_angle(20, 10, math.pi / 4) == (20, 10, math.pi / 4)          # the range's ends stay
    w, h, theta = fold_angle(20, 10, THETA + math.pi / 2)
    assert (w, h) == (10, 20) and theta == pytest.approx(THETA)
    w, h, theta = fold_angle(20, 10, THETA - math.pi)                        # a half turn: no swap
    assert (w, h) == (20, 10) and theta == pytest.approx(THETA)
    for raw in (1.0, -1.0, 2.5, -3.0, 7.0):
        w, h, theta = fold_angle(20, 10, raw)
        assert abs(theta) <= math.pi / 4 + 1e-12
        assert same_points(corners([40 - w / 2, 30 - h / 2, 40 + w / 2, 30 + h / 2, theta]),
                           corners([30, 25, 50, 35, raw]))


# 1. loading

def test_rotated_coco_loads_as_corners_and_theta(tmp_path, caplog):
    anns = [_ann(1, [51, 43, 20, 10, THETA]),
            _ann(2, [10, 10, 20, 10]),                           # 4 values: theta 0
            _ann(3, [30, 25, 20, 10, 1.0]),                      # outside [-pi/4, pi/4]: folded
            _ann(4, [20, 20, 10, 10, 2.0]),                      # folded too: one warning for both
            _ann(5, [90, 70, 30, 6, 0.2]),                       # crosses the edge, centre (105, 73) outside
            _ann(6, [-10, 60, 30, 10, -0.3]),                    # crosses the edge, centre (5, 65) inside
            _ann(7, [1, 2, 3, 4, 5, 6]),
            _ann(8, [1, 2, 3, 4, 0.1], iscrowd=1)]
    ds = CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", anns), rotated=True)
    boxes = ds.boxes[1]
    assert boxes.shape == (5, 5) and ds.labels[1].tolist() == [0] * 5
    assert boxes[0].tolist() == pytest.approx([51, 43, 71, 53, THETA])
    assert boxes[1].tolist() == [10, 10, 30, 20, 0]
    assert boxes[2].tolist() == pytest.approx([35, 20, 45, 40, 1 - math.pi / 2], abs=1e-5)   # w/h swapped
    assert boxes[3].tolist() == pytest.approx([20, 20, 30, 30, 2 - math.pi / 2], abs=1e-5)
    assert boxes[4].tolist() == pytest.approx([-10, 60, 20, 70, -0.3])                        # not clipped
    for original, loaded in ((anns[2]["bbox"], boxes[2]), (anns[3]["bbox"], boxes[3])):
        x, y, w, h, theta = original
        assert same_points(corners(loaded), corners([x, y, x + w, y + h, theta]))
    text = caplog.text
    assert "a.json: 2 rotated boxes with theta outside [-pi/4, pi/4] folded in" in text
    assert "first: annotation 3, image_id 1, bbox [30, 25, 20, 10, 1.0]" in text
    assert "dropped 1 box: outside the image; first: annotation 5" in text
    assert "dropped 1 box: malformed (needs image_id, category_id and a finite bbox [x, y, width, height, " \
           "theta] or [x, y, width, height]); first: annotation 7" in text
    assert "dropped 1 box: crowd (iscrowd)" in text


def test_axis_aligned_loading_is_unchanged_and_names_rotated_boxes(tmp_path, caplog):
    path = _coco(tmp_path / "a.json", [_ann(1, [90, 70, 30, 6]), _ann(2, [51, 43, 20, 10, THETA])])
    ds = CocoDataset(str(tmp_path), path, resize=80)
    assert ds.boxes[1].tolist() == [[90, 70, 100, 76]]            # clipped, as ever
    assert ("dropped 1 box: rotated (a 5-value bbox [x, y, width, height, theta]; this dataset reads "
            "axis-aligned boxes: --rotated-bbox reads rotated ones); first: annotation 2, image_id 1, bbox [51, 43, 20, 10, 0.6435") in caplog.text
    x, boxes, labels, _, _ = ds[0]
    assert boxes.shape == (1, 4)


# 2. augmentation

BOX = torch.tensor([[51, 43, 71, 53, THETA], [10, 60, 40, 70, -0.5]])


def test_each_transform_moves_the_corners_with_the_image():
    width = 100
    # resize by 1.5 (the loaders keep the aspect ratio): every corner scales
    for box, out in zip(BOX, scale_boxes(BOX, 1.5, 1.5)):
        assert same_points(corners(out), corners(box) * 1.5)
    # horizontal flip: x -> width - x
    for box, out in zip(BOX, flip_boxes(BOX, width)):
        mirrored = corners(box) * torch.tensor([-1, 1]) + torch.tensor([width, 0])
        assert same_points(corners(out), mirrored) and out[4] == -box[4]
    # quarter turn counter-clockwise (rot90 of [3, H, W]): (x, y) -> (y, width - x), theta kept in range
    for box, out in zip(BOX, turn_boxes(BOX, width)):
        c = corners(box)
        assert same_points(corners(out), torch.stack([c[:, 1], width - c[:, 0]], dim=1)) and out[4] == box[4]
    # crop: boxes whose centre is inside, in the window's coordinates, not clipped
    window = (30, 20, 90, 60)
    out, labels = crop_boxes(BOX, torch.tensor([4, 7]), window)
    assert labels.tolist() == [4]                                    # the second's centre (25, 65) is outside
    assert same_points(corners(out[0]), corners(BOX[0]) - torch.tensor([30, 20]))
    assert out[0, 2] - out[0, 0] == 20                               # unclipped
    # axis-aligned boxes as before: clipped by the crop, no theta anywhere
    aligned = BOX[:, :4]
    assert flip_boxes(aligned, width).tolist() == [[29, 43, 49, 53], [60, 60, 90, 70]]
    assert turn_boxes(aligned, width).tolist() == [[43, 29, 53, 49], [60, 60, 70, 90]]
    assert crop_boxes(aligned, torch.tensor([4, 7]), (0, 0, 64, 60))[0].tolist() == [[51, 43, 64, 53]]


def test_crop_measures_enclosing_boxes_inside_the_image():
    boxes = torch.tensor([[51, 43, 71, 53, THETA], [-10, 60, 20, 70, 0.0]])
    ref = crop_reference(boxes, 100, 80)
    assert ref[0].tolist() == pytest.approx([50, 38, 72, 58])       # around the corners (50, 50) ... (72, 46)
    assert ref[1].tolist() == pytest.approx([0, 60, 10, 70])        # shrunk about its centre (5, 65)
    assert torch.equal(crop_reference(boxes[:, :4], 100, 80), boxes[:, :4])    # axis-aligned: themselves


def _drawn(tmp_path, box, colour=(250, 20, 230), size=(96, 72)):
    """tmp_path/a.json, a rotated COCO file of one box, and a.png: black with the box filled in `colour`."""
    x1, y1, x2, y2, theta = box
    path = _coco(tmp_path / "a.json", [_ann(1, [x1, y1, x2 - x1, y2 - y1, theta])], *size)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    fill_convex(pixels, corners(box).numpy(), colour)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    return path


def test_augmented_samples_keep_the_object_in_its_box(tmp_path):
    colour = torch.tensor([250, 20, 230]) / 255
    path = _drawn(tmp_path, [30, 30, 70, 44, 0.5])
    ds = CocoDataset(str(tmp_path), path, resize=72, max_size=1000, rotated=True,
                     augment=Augment(flip=True, rotate=True, crop=True))
    seen = set()
    for seed in range(40):
        x, boxes, labels, _, ratio = ds[(0, seed)]
        image = x * torch.tensor(ds.std)[:, None, None] + torch.tensor(ds.mean)[:, None, None]
        on_object = ((image - colour[:, None, None]).abs().max(0).values < 0.05).nonzero().numpy()
        if not len(boxes):                       # a crop without the box's centre
            seen.add("dropped")
            continue
        (box,) = boxes
        assert labels.tolist() == [0] and abs(box[4]) <= math.pi / 4 + 1e-6
        sides = sorted((box[2:4] - box[:2]).tolist())
        assert sides == pytest.approx([14 * ratio, 40 * ratio], rel=0.02)      # the object's, resized
        centres = on_object[:, ::-1] + 0.5                             # (x, y) of the object's pixel centres
        # the resize blurs the edge by up to a pixel of the original
        assert len(centres) and outside_by(centres, corners(box)).max() < max(1.0, ratio)
        seen.add("turned" if (box[2] - box[0]) < (box[3] - box[1]) else "along")
        seen.add("mirrored" if box[4] < 0 else "kept")
    assert {"turned", "along", "mirrored", "kept"} <= seen


def test_collate_pads_rotated_boxes():
    a = (torch.ones(3, 50, 70), torch.tensor([[1.0, 2, 3, 4, 0.5]]), torch.tensor([2]), 1, 1.0)
    b = (torch.ones(3, 64, 40), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 2, 0.5)
    images, boxes, labels, ids, ratios = collate([a, b])
    assert boxes.shape == (2, 1, 5) and boxes[0, 0].tolist() == [1, 2, 3, 4, 0.5]
    assert labels.tolist() == [[2], [-1]]
    _, boxes, labels, _, _ = collate([b, b])
    assert boxes.shape == (2, 1, 5) and labels.tolist() == [[-1], [-1]]


# 4. synthetic (before DALI, which reads it)

@pytest.fixture(scope="module")
def rotated_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rotated")
    assert main(["synthetic", str(folder), "--rotated", "--train", "8", "--val", "2", "--size", "96",
                 "--seed", "3"]) == 0
    return folder


def test_synthetic_corners_hold_the_drawn_shapes():
    rng = random.Random(5)
    kinds, thetas = set(), []
    for _ in range(8):
        im, objects = make_rotated_image(rng, (128, 160))
        pixels = np.asarray(im).astype(int)
        for o in objects:
            kinds.add(o["category"])
            x, y, w, h, theta = o["bbox"]
            thetas.append(theta)
            assert 2.5 - 0.05 <= max(w, h) / min(w, h) <= 5 + 0.05
            assert np.allclose(o["corners"], bbox_corners(o["bbox"]))
            ys, xs = np.nonzero((pixels == o["color"]).all(axis=2))
            centres = np.stack([xs, ys], axis=1) + 0.5
            assert len(centres) and outside_by(centres, o["corners"]).max() <= 1e-9     # inside the corners ...
            for a, b in zip(o["corners"], np.roll(o["corners"], -1, axis=0)):          # ... and touching each side
                normal = np.array([b[1] - a[1], a[0] - b[0]]) / np.hypot(*(b - a))
                assert np.abs((centres - a) @ normal).min() < 1
    assert kinds == set(ROTATED_CLASSES)
    assert max(map(abs, thetas)) <= math.pi / 4 and min(thetas) < -0.3 and max(thetas) > 0.3


def test_synthetic_rotated_files(rotated_set, tmp_path):
    names = sorted(os.listdir(rotated_set))
    assert names == ["images", "train.json", "train_aabb.json", "val.json", "val_aabb.json"]
    coco = json.loads((rotated_set / "train.json").read_text())
    aabb = json.loads((rotated_set / "train_aabb.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ROTATED_CLASSES
    assert coco["images"] == aabb["images"] and len(coco["annotations"]) == len(aabb["annotations"]) > 8
    for a, b in zip(coco["annotations"], aabb["annotations"]):
        x, y, w, h, theta = a["bbox"]
        assert abs(theta) <= math.pi / 4 and a["area"] == pytest.approx(w * h)
        c = np.array(a["segmentation"][0]).reshape(4, 2)
        assert np.allclose(c, bbox_corners(a["bbox"]))
        bx, by, bw, bh = b["bbox"]
        assert (b["id"], b["image_id"], b["category_id"]) == (a["id"], a["image_id"], a["category_id"])
        assert c[:, 0].min() == pytest.approx(bx) and c[:, 0].max() == pytest.approx(bx + bw)
        assert c[:, 1].min() == pytest.approx(by) and c[:, 1].max() == pytest.approx(by + bh)
    # the same seed, the same files (no C-library random numbers in the rotated set)
    write_dataset(str(tmp_path), train=8, val=2, size=96, seed=3, rotated=True)
    for name in names[1:]:
        assert (tmp_path / name).read_text() == (rotated_set / name).read_text()
    first = sorted(os.listdir(tmp_path / "images"))[0]
    assert (tmp_path / "images" / first).read_bytes() == (rotated_set / "images" / first).read_bytes()
    # both load: rotated boxes and their enclosing boxes
    rotated = CocoDataset(str(rotated_set / "images"), str(rotated_set / "train.json"), rotated=True)
    aligned = CocoDataset(str(rotated_set / "images"), str(rotated_set / "train_aabb.json"))
    assert sum(len(b) for b in rotated.boxes.values()) == sum(len(b) for b in aligned.boxes.values())


def test_rotated_batches_from_the_pytorch_loader(rotated_set):
    ds = CocoDataset(str(rotated_set / "images"), str(rotated_set / "train.json"), jitter=(80, 112), max_size=112,
                     rotated=True, augment=Augment(flip=True, rotate=True, crop=True))
    loader = make_loader(ds, batch_size=4, training=True, workers=0)
    loader.start(0)
    for images, boxes, labels, ids, ratios in loader:
        assert boxes.shape[0] == 4 and boxes.shape[2] == 5 and images.shape[2] % 32 == 0
        valid = boxes[labels >= 0]
        assert (valid[:, 4].abs() <= math.pi / 4 + 1e-6).all() and (valid[:, 2] > valid[:, 0]).all()


# 2. DALI

@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'odtk[dali]')")


def _by_id(loader):
    out = {}
    for images, boxes, labels, ids, ratios in loader:
        for x, b, l, i, r in zip(images, boxes, labels, ids.tolist(), ratios.tolist()):
            out[i] = (x.cpu(), b[l >= 0].cpu(), l[l >= 0].cpu(), r)
    return out


def _dali(ds, **kwargs):
    from odtk.dali import make_dali_loader
    return make_dali_loader(ds, **{"batch_size": 2, "training": False, "workers": 1, "size_divisible": 1,
                                   "device": torch.device("cpu"), **kwargs})


def test_dali_carries_theta_like_the_pytorch_loader(dali, rotated_set):
    images, train = str(rotated_set / "images"), str(rotated_set / "train.json")
    plain = CocoDataset(images, train, resize=80, max_size=200, rotated=True)
    ours = _by_id(_dali(plain))
    ref = _by_id(make_loader(plain, batch_size=2, training=False, workers=0, size_divisible=1))
    assert sorted(ours) == sorted(ref) == sorted(plain.ids)
    for i, (x, b, l, r) in ours.items():
        assert b.shape[1] == 5 and torch.equal(l, ref[i][2]) and torch.allclose(b, ref[i][1], atol=1e-3)
    seen = set()
    flip = CocoDataset(images, train, jitter=(80, 80), max_size=200, rotated=True, augment=Augment(flip=True))
    for i, (x, b, l, r) in _by_id(_dali(flip, training=True)).items():
        px, pb = ours[i][0], ours[i][1]
        mirrored = torch.allclose(x, px.flip(-1), atol=1e-5) and not torch.allclose(x, px, atol=1e-5)
        seen.add(mirrored)
        assert torch.allclose(b, flip_boxes(pb, x.shape[2]) if mirrored else pb, atol=1e-3)
    assert seen == {True, False}


def test_dali_crop_keeps_rotated_boxes_whole(dali, rotated_set):
    images, train = str(rotated_set / "images"), str(rotated_set / "train.json")
    ds = CocoDataset(images, train, jitter=(96, 96), max_size=1000, rotated=True,
                     augment=Augment(flip=False, crop=True))
    loader = _dali(ds, batch_size=1, training=True)
    cropped = 0
    for epoch in range(3):
        for i, (x, b, l, r) in _by_id(loader).items():
            original, labels = ds.boxes[i], ds.labels[i]
            cropped += r > 1 + 1e-9
            corners_at = []                 # where the crop starts in the original, by each box
            for box, label in zip(b, l):
                # each box is one of the image's, scaled by the ratio and moved, with its size and theta
                size = (box[2:4] - box[:2]) / r
                match = [o for o, ol in zip(original, labels) if ol == label and
                         torch.allclose(o[2:4] - o[:2], size, rtol=0.02, atol=0.1) and abs(o[4] - box[4]) < 1e-5]
                assert match, (box, original)
                centre = (box[:2] + box[2:4]) / 2
                assert (centre >= -1e-3).all() and centre[0] <= x.shape[2] + 1e-3 and centre[1] <= x.shape[1] + 1e-3
                corners_at.append((match[0][:2] + match[0][2:4]) / 2 - centre / r)
            assert all(torch.allclose(c, corners_at[0], atol=0.5) for c in corners_at)      # all moved alike
    assert cropped >= 4


# 3. DOTA

def _dota_images(folder):
    folder.mkdir()
    for name, size in (("P0001", (100, 80)), ("P0002", (64, 48)), ("P0004", (32, 32))):
        Image.new("RGB", size).save(folder / f"{name}.png")
    return str(folder)


def test_dota_to_rotated_coco(tmp_path, caplog):
    images = _dota_images(tmp_path / "images")
    coco, skipped = convert_dota(DOTA, images=images)          # the root: its labelTxt/ is found
    assert [c["name"] for c in coco["categories"]] == ["harbor", "plane", "ship", "small-vehicle"]
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == \
           [("P0001.png", 100, 80), ("P0002.png", 64, 48), ("P0004.png", 32, 32)]
    anns = coco["annotations"]
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in anns] == [(1, 2, 0), (1, 4, 1), (1, 4, 0),
                                                                              (2, 1, 0)]
    assert anns[0]["bbox"] == pytest.approx([51, 43, 20, 10, THETA])
    assert anns[0]["segmentation"][0] == pytest.approx([50, 50, 66, 38, 72, 46, 56, 58])
    assert anns[0]["area"] == pytest.approx(200)
    assert anns[1]["bbox"] == pytest.approx([10, 10, 20, 10, 0]) and anns[1]["area"] == pytest.approx(200)
    assert anns[2]["bbox"] == pytest.approx([60, 60, 10, 10, 0])         # irregular: the smallest rectangle
    assert anns[3]["bbox"] == pytest.approx([25, 25, 10, 20, -THETA])    # 53 degrees: folded, w/h swapped
    assert anns[3]["segmentation"][0] == pytest.approx([32, 24, 40, 30, 28, 46, 20, 40])
    malformed = "malformed line (not 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult')"
    assert skipped == {"zero-area polygon": 1, "box centre outside the image": 1, malformed: 2}
    text = caplog.text
    assert "P0001.txt:6: zero-area polygon (skipped)" in text
    assert "P0001.txt:7: box centre outside the image (skipped)" in text
    assert f"P0001.txt:8: {malformed} (skipped)" in text
    assert "1 label file without an image in" in text and "(first: P0003.txt): skipped" in text
    kept, _ = convert_dota(os.path.join(DOTA, "labelTxt"), images=images, classes=["plane", "harbor"])
    assert [c["name"] for c in kept["categories"]] == ["plane", "harbor"]
    assert [(a["image_id"], a["category_id"]) for a in kept["annotations"]] == [(1, 1), (2, 2)]
    assert "P0001.txt:4: class 'small-vehicle' not in --class-names (skipped)" in caplog.text


def test_min_area_rect_in_any_point_order():
    square = [(60, 60), (70, 60), (70, 70), (60, 65)]
    for points in (square, square[::-1], square[2:] + square[:2]):
        assert min_area_rect(np.array(points)) == pytest.approx((60, 60, 10, 10, 0))
    rectangle = np.array([(66, 38), (56, 58), (50, 50), (72, 46)])
    assert min_area_rect(rectangle) == pytest.approx((51, 43, 20, 10, THETA))
    assert min_area_rect(np.array([(1, 1), (2, 2), (3, 3), (4, 4)])) is None
    assert min_area_rect(np.zeros((4, 2))) is None


def test_cli_convert_dota(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odtk")
    images = _dota_images(tmp_path / "images")
    out = tmp_path / "dota.json"
    assert main(["convert", "--format", "dota", os.path.join(DOTA, "labelTxt"), str(out), "--images", images]) == 0
    coco = json.loads(out.read_text())
    assert len(coco["annotations"]) == 4 and "wrote" in caplog.text and "skipped 2 x malformed line" in caplog.text
    ds = CocoDataset(images, str(out), rotated=True)                # training reads it: difficult ones ignored
    assert ds.boxes[1][:, 4].tolist() == pytest.approx([THETA, 0])
    assert ds.boxes[2][0].tolist() == pytest.approx([25, 25, 35, 45, -THETA])
    caplog.clear()
    assert main(["convert", "--format", "dota", DOTA, str(tmp_path / "x.json")]) == 2
    assert "odtk convert: error: DOTA conversion needs --images, the folder of the labelled images" in caplog.text
    assert not os.path.exists(tmp_path / "x.json")
    assert main(["convert", "--format", "dota", str(tmp_path / "nope"), str(out), "--images", images]) == 2
    assert "nope: no such folder" in caplog.text
