"""Rotated evaluation and output (issue 13): evaluate(rotated=True) against pycocotools' bbox evaluation (theta 0)
and its segm evaluation of the corner polygons (ODTK's method), rotated Detections rows, plots of a rotated run."""
import contextlib
import io
import json
import math
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from odtk.detector import Detections
from odtk.evaluate import RotatedCOCOeval, box_rows, coco_ious, evaluate, rotated_ious
from odtk.plots import confusion_matrix, has_matplotlib, pr_curves, write_plots
from odtk.rotated import enclosing_boxes
from odtk.synthetic import write_dataset
from odtk.utils import OdtkError

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _pycocotools(annotations: str, detections: str, iou_type: str) -> np.ndarray:
    """pycocotools' own evaluation, untouched: its 12 summary figures."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
        ev = COCOeval(gt, gt.loadRes(detections), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.array(ev.stats)


def _ours(results: dict) -> np.ndarray:
    return np.array([results[n] for n in STATS])


def _write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# -- theta 0: pycocotools' bbox evaluation --------------------------------------------------------------------------
def _axis_aligned_set(seed: int = 0):
    """8 images, 3 classes, some crowd boxes; detections near the boxes (some exactly on IoU thresholds: whole
    pixels), duplicates and false alarms with scores in no order."""
    rng = random.Random(seed)
    categories = [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}, {"id": 12, "name": "c"}]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in range(1, 9)]
    anns, dets = [], []
    for image in images:
        for _ in range(rng.randint(1, 6)):
            w, h = rng.uniform(6, 140), rng.uniform(6, 110)      # all three COCO area ranges
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            crowd = int(rng.random() < 0.15)
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": rng.choice([4, 9, 12]),
                         "bbox": [round(v, 2) for v in (x, y, w, h)], "area": round(w * h, 2), "iscrowd": crowd})
            for _ in range(rng.choice([0, 1, 1, 2])):
                near = [x + rng.gauss(0, 0.05 * w), y + rng.gauss(0, 0.05 * h), w * math.exp(rng.gauss(0, 0.05)),
                        h * math.exp(rng.gauss(0, 0.05))]
                dets.append({"image_id": image["id"], "category_id": anns[-1]["category_id"], "score": rng.random(),
                             "bbox": [round(v, 2) for v in near]})
        dets.append({"image_id": image["id"], "category_id": rng.choice([4, 9, 12]), "score": rng.random(),
                     "bbox": [rng.uniform(0, 250), rng.uniform(0, 180), rng.uniform(5, 70), rng.uniform(5, 60)]})
    # whole pixels: IoU exactly 0.5 and 0.75 with a 20 x 20 box, on COCO thresholds
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 4, "bbox": [100, 100, 20, 20], "area": 400,
                 "iscrowd": 0})
    dets += [{"image_id": 1, "category_id": 4, "bbox": [100, 100, 20, 10], "score": 0.5},      # 200 / 400
             {"image_id": 1, "category_id": 4, "bbox": [100, 100, 20, 15], "score": 0.45}]    # 300 / 400
    return {"images": images, "annotations": anns, "categories": categories}, dets


def _with_theta(rows, theta: float):
    return [{**r, "bbox": [*r["bbox"], theta]} for r in rows]


def test_theta_zero_equals_pycocotools_bbox(tmp_path):
    coco, dets = _axis_aligned_set()
    assert sum(a["iscrowd"] for a in coco["annotations"]) >= 2
    gt, dt = _write(tmp_path, "gt.json", coco), _write(tmp_path, "dt.json", dets)
    expected = _pycocotools(gt, dt, "bbox")
    assert 0.2 < expected[0] < 0.8 and (expected[3:6] >= 0).all()    # varied: every area range has boxes
    plain = evaluate(gt, dt)
    rotated = evaluate(gt, dt, rotated=True)
    # 5-value bboxes with theta 0 in both files: the same figures
    gt5 = _write(tmp_path, "gt5.json", {**coco, "annotations": _with_theta(coco["annotations"], 0.0)})
    dt5 = _write(tmp_path, "dt5.json", _with_theta(dets, 0.0))
    rotated5 = evaluate(gt5, dt5, rotated=True)
    for results in (plain, rotated, rotated5):
        assert np.array_equal(np.round(_ours(results), 4), np.round(expected, 4))
    assert rotated5["per_class"] == plain["per_class"] and rotated5["table"] == plain["table"]
    assert np.array_equal(rotated5["precision"], plain["precision"])
    assert rotated5["rotated"] and not plain["rotated"]


def test_polygon_clipping_at_theta_zero_is_pycocotools_box_iou(tmp_path):
    """The rotated IoU itself (not the shortcut coco_ious takes for unrotated pairs): at theta 0 it is
    pycocotools' box IoU, crowd columns (intersection over the detection's area) included; and a theta of 1e-9
    everywhere, which sends every pair through the polygon clipping, gives pycocotools' bbox AP to 4 decimals."""
    coco, dets = _axis_aligned_set(seed=1)
    d, g = [r["bbox"] for r in dets], [a["bbox"] for a in coco["annotations"]]
    crowd = [a["iscrowd"] for a in coco["annotations"]]
    got = rotated_ious(box_rows(d), box_rows(g), crowd)
    expected = np.asarray(coco_mask.iou(d, g, crowd))
    assert (expected > 0).sum() > 50 and np.abs(got - expected).max() < 1e-12
    # the whole-pixel pairs on thresholds excepted (an ulp decides them): drop them for this comparison
    coco["annotations"] = coco["annotations"][:-1]
    dets = [r for r in dets if r["bbox"][:2] != [100, 100]]
    gt = _write(tmp_path, "gt.json", {**coco, "annotations": _with_theta(coco["annotations"], 1e-9)})
    dt = _write(tmp_path, "dt.json", _with_theta(dets, 1e-9))
    expected = _pycocotools(_write(tmp_path, "gt4.json", coco), _write(tmp_path, "dt4.json", dets), "bbox")
    assert np.array_equal(np.round(_ours(evaluate(gt, dt, rotated=True)), 4), np.round(expected, 4))


def test_crowd_boxes_count_the_intersection_over_the_detection():
    """A rotated crowd region: a detection inside it overlaps it fully (1), one half inside by a half (0.5);
    a plain box IoU of the same pair is far lower."""
    region = [[0, 0, 100, 20, math.pi / 4]]
    cx, cy = 50, 10                                   # the region's centre; its long axis runs up to the right
    u = (math.cos(math.pi / 4), -math.sin(math.pi / 4))
    inside = [cx + 20 * u[0] - 5, cy + 20 * u[1] - 5, 10, 10, math.pi / 4]
    half = [cx + 50 * u[0] - 5, cy + 50 * u[1] - 5, 10, 10, math.pi / 4]   # centred on the region's end
    ious = coco_ious([inside, half], region, [1])
    assert ious[:, 0] == pytest.approx([1.0, 0.5], abs=1e-9)
    assert coco_ious([inside], region, [0])[0, 0] == pytest.approx(100 / 2000, abs=1e-9)


def test_rotated_boxes_need_rotated_true(tmp_path):
    coco, dets = _axis_aligned_set()
    gt = _write(tmp_path, "gt.json", coco)
    dt = _write(tmp_path, "dt.json", _with_theta(dets, 0.3))
    with pytest.raises(OdtkError, match=r"dt\.json: rotated boxes \(bbox \[x, y, w, h, theta\]\); evaluate them "
                                        r"as rotated \(rotated=True; odtk: --rotated-bbox\)"):
        evaluate(gt, dt)
    bad = _write(tmp_path, "bad.json", [{**dets[0], "bbox": [1, 2, 3]}])
    with pytest.raises(OdtkError, match=r"bad\.json: bbox \[1, 2, 3\] \(image 1\): needs \[x, y, w, h\] or "
                                        r"\[x, y, w, h, theta\]"):
        evaluate(gt, bad, rotated=True)


# -- rotated data: pycocotools' segm evaluation of the corner polygons (ODTK's method) ------------------------------
@pytest.fixture(scope="module")
def rotated_set(tmp_path_factory):
    """`odtk synthetic --rotated` shapes (256-pixel images, sides 10-128 pixels, aspect 2.5-5), 1 in 9 boxes
    made crowd, and detections (odtk.Detections rows: bbox with theta and the corners) near them: (gt, dets)."""
    folder = tmp_path_factory.mktemp("rotated_eval")
    write_dataset(str(folder), train=0, val=60, size=256, seed=3, rotated=True)
    coco = json.loads((folder / "val.json").read_text())
    for a in coco["annotations"][::9]:
        a["iscrowd"] = 1
    gt = folder / "gt.json"
    gt.write_text(json.dumps(coco))
    dets = folder / "dets.json"
    dets.write_text(json.dumps(_jittered(coco, random.Random(3))))
    return str(gt), str(dets)


def _jittered(coco: dict, rng: random.Random, jitter: float = 0.04) -> list:
    """Per box 0-2 detections with centre, sides and angle off by `jitter` (relative; radians), plus 0-2 false
    alarms per image, all as Detections.to_coco writes them. Each is moved inside its image: pycocotools' segm
    clips masks at the image's border, the rotated IoU of the boxes does not (a difference of method, not the one
    measured here)."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    found = {i: [] for i in sizes}
    for a in coco["annotations"]:
        x, y, w, h, t = a["bbox"]
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            cx, cy = x + w / 2 + rng.gauss(0, jitter * w), y + h / 2 + rng.gauss(0, jitter * h)
            w2, h2 = w * math.exp(rng.gauss(0, jitter)), h * math.exp(rng.gauss(0, jitter))
            found[a["image_id"]].append((a["category_id"], [cx - w2 / 2, cy - h2 / 2, cx + w2 / 2, cy + h2 / 2,
                                                            t + rng.gauss(0, jitter)]))
    for i, (height, width) in sizes.items():
        for _ in range(rng.randint(0, 2)):
            w, h = rng.uniform(20, 80), rng.uniform(6, 20)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            found[i].append((rng.choice([10, 20]), [x, y, x + w, y + h, rng.uniform(-0.78, 0.78)]))
    rows = []
    for i, items in found.items():
        if not items:
            continue
        boxes = torch.tensor([b for _, b in items], dtype=torch.float64)
        outer = enclosing_boxes(boxes)
        height, width = sizes[i]
        shift = outer[:, :2].neg().clamp(min=0) - (outer[:, 2:] - torch.tensor([width, height])).clamp(min=0)
        boxes[:, :4] += shift.repeat(1, 2)
        labels = torch.tensor([c for c, _ in items])
        found_here = Detections(boxes=boxes, scores=torch.rand(len(items), generator=torch.Generator().manual_seed(i)),
                                labels=labels, names=[str(c) for c in labels.tolist()], image_size=(height, width))
        rows += found_here.to_coco(i)
    return rows


def test_rotated_ap_equals_segm_on_the_corner_polygons(rotated_set, tmp_path):
    """ODTK scores rotated boxes with pycocotools' segm evaluation of their corner polygons: masks rasterised on
    the image's pixel grid, so its IoU is the exact one (ours) up to the rasterising. That moves a polygon's area
    by 0.035 pixels per pixel of its perimeter (standard deviation over random rotated rectangles, no bias; up to
    0.3 for 3-pixel-thin ones), so a polygon IoU is off by about perimeter / area / 30: a few thousandths for
    these shapes, more for the thinnest (4-5 pixels across at 256). Measured on odtk synthetic --rotated sets
    like this one (60 images, detections jittered by 0.02-0.08, 8 seeds each), for overlapping pairs (IoU > 0.3)
    the mean |IoU difference| was 0.006 / 0.0025 / 0.0013 at 128 / 256 / 512-pixel images, the largest 0.087 /
    0.040 / 0.012: it halves as the image doubles. A match whose IoU lies that close to a threshold can flip: one
    flip moves a single threshold's AP by about 1 / (the class's boxes), so AP50 and AP75 differed by up to
    0.023 / 0.014 / 0.015, and AP (the mean of 10 thresholds) by up to 0.006 / 0.0032 / 0.002. Asserted here, at
    256 pixels: AP within 0.005, AP50 and AP75 within 0.02, every summary figure within 0.03."""
    gt, dets = rotated_set
    ours = evaluate(gt, dets, rotated=True)
    theirs = _pycocotools(gt, dets, "segm")
    assert 0.25 < ours["AP"] < 0.95
    assert ours["AP"] == pytest.approx(theirs[0], abs=0.005)
    assert ours["AP50"] == pytest.approx(theirs[1], abs=0.02) and ours["AP75"] == pytest.approx(theirs[2], abs=0.02)
    assert np.abs(_ours(ours) - theirs).max() < 0.03   # the area ranges and recalls too
    # the axis-aligned enclosing boxes' IoU is another measure altogether: far from both
    with open(dets) as f:
        outer = json.load(f)
    for row in outer:
        x1, y1, x2, y2 = enclosing_boxes(box_rows([row["bbox"]]))[0].tolist()
        row["bbox"], row["segmentation"] = [x1, y1, x2 - x1, y2 - y1], [[x1, y1, x2, y1, x2, y2, x1, y2]]
    assert abs(_pycocotools(gt, _write(tmp_path, "outer.json", outer), "segm")[0] - ours["AP"]) > 0.05


def test_rotated_ious_follow_segm_to_the_rasterising_error(rotated_set):
    """The IoU matrices behind the AP: pycocotools' segm (rasterised polygons) against the rotated boxes', per
    (image, class), for the pairs that overlap (IoU > 0.3 in either)."""
    gt, dets = rotated_set
    evals = []
    for kind, iou_type in ((COCOeval, "segm"), (RotatedCOCOeval, "bbox")):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(gt)
            evals.append(kind(coco, coco.loadRes(dets), iou_type))
            evals[-1].evaluate()
    segm, ours = evals
    diffs = []
    for key, theirs in segm.ious.items():
        mine, theirs = np.asarray(ours.ious[key]), np.asarray(theirs)
        if mine.size:
            overlap = (mine > 0.3) | (theirs > 0.3)
            diffs += np.abs(mine - theirs)[overlap].tolist()
    assert len(diffs) > 100
    assert np.mean(diffs) < 0.005 and np.max(diffs) < 0.05


# -- detections out: bbox with theta and the corners ----------------------------------------------------------------
def test_rotated_detections_write_theta_and_corners():
    """The square [0, 0, 2, 2] turned by pi/4 (odtk.rotated's docstring): its top-left corner (0, 0) goes straight
    left of the centre (1, 1), its top-right one straight above."""
    r = math.sqrt(2)
    found = Detections(boxes=torch.tensor([[0.0, 0.0, 2.0, 2.0, math.pi / 4], [10.004, 20, 14.996, 23, -0.123456789]]),
                       scores=torch.tensor([0.987654321, 0.5]), labels=torch.tensor([3, 7]), names=["x", "y"],
                       image_size=(30, 30), frame=4, time=0.123456)
    rows = found.to_coco(9)
    assert rows[0] == {"image_id": 9, "category_id": 3, "bbox": [0.0, 0.0, 2.0, 2.0, 0.7854],
                       "segmentation": [[round(1 - r, 2), 1.0, 1.0, round(1 - r, 2), round(1 + r, 2), 1.0,
                                         1.0, round(1 + r, 2)]], "score": 0.98765}
    assert rows[1]["bbox"] == [10.0, 20.0, 4.99, 3.0, -0.12346]
    frame = found.to_frame()
    assert frame["frame"] == 4 and frame["time"] == 0.1235
    assert frame["detections"][0] == {"bbox": rows[0]["bbox"], "segmentation": rows[0]["segmentation"],
                                      "score": 0.98765, "category_id": 3, "name": "x"}
    # four columns: as before, no segmentation
    plain = Detections(boxes=torch.tensor([[1.234, 2.0, 5.0, 7.5]]), scores=torch.tensor([0.5]),
                       labels=torch.tensor([1]), names=["x"], image_size=(10, 10))
    assert plain.to_coco(1) == [{"image_id": 1, "category_id": 1, "bbox": [1.23, 2.0, 3.77, 5.5], "score": 0.5}]
    assert plain.to_frame()["detections"] == [{"bbox": [1.23, 2.0, 3.77, 5.5], "score": 0.5, "category_id": 1,
                                               "name": "x"}]
    empty = Detections(boxes=torch.zeros(0, 5), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long),
                       names=[], image_size=(10, 10))
    assert empty.to_coco(1) == [] and empty.to_frame()["detections"] == []


# -- plots ----------------------------------------------------------------------------------------------------------
def test_confusion_matrix_matches_rotated_boxes_by_their_iou():
    """Two thin boxes crossing at right angles: their enclosing boxes are the same square (IoU 1), the boxes
    themselves overlap by a 10 x 10 square (IoU 100 / 1700). A rotated detection on its box matches it."""
    thin = lambda theta: [45, 10, 10, 90, theta]   # noqa: E731 (centre (50, 55), 10 x 90)
    coco = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": thin(math.pi / 4)}]}
    crossing = [{"image_id": 1, "category_id": 1, "bbox": thin(-math.pi / 4), "score": 0.9}]
    on_it = [{"image_id": 1, "category_id": 1, "bbox": thin(math.pi / 4 + 0.01), "score": 0.9}]
    assert coco_ious([thin(-math.pi / 4)], [thin(math.pi / 4)], [0])[0, 0] == pytest.approx(100 / 1700)
    assert confusion_matrix(coco, crossing)[0].tolist() == [[0, 1], [1, 0]]     # a miss and a false alarm
    assert confusion_matrix(coco, on_it)[0].tolist() == [[1, 0], [0, 0]]


@pytest.mark.skipif(not has_matplotlib(), reason="plots need matplotlib")
def test_plots_of_a_rotated_evaluation(rotated_set, tmp_path):
    gt, dets = rotated_set
    paths = write_plots(gt, dets, str(tmp_path), rotated=True)
    assert sorted(paths) == sorted(["pr_curve.png", "confusion_matrix.png", "per_class_ap.png", "per_class.csv"])
    results = evaluate(gt, dets, rotated=True)
    csv_rows = open(paths["per_class.csv"]).read().splitlines()
    assert csv_rows[0] == "class,boxes,AP,AP50" and len(csv_rows) == 3
    assert [float(r.split(",")[2]) for r in csv_rows[1:]] == [r["AP"] for r in results["per_class"]]
    curves = pr_curves(results)
    assert [c["name"] for c in curves] == ["rectangle", "ellipse"] and all(c["p50"].shape == (101,) for c in curves)
    with pytest.raises(OdtkError, match="rotated=True"):
        write_plots(gt, dets, str(tmp_path))
