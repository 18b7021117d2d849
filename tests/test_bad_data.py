"""Bad input to train and convert (the "Bad input" issue): one clear line or a warning that keeps going, never a
traceback, never a lost or poisoned file."""
import glob
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from odtk.convert import convert_voc, exif_box
from odtk.data import CocoDataset, load_image
from odtk.utils import atomic_save, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def odtk(*argv, cwd=None):
    """`python -m odtk ARGV` from this checkout: (exit code, stdout + stderr)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "odtk", *map(str, argv)], capture_output=True, text=True, env=env,
                         cwd=cwd)
    return out.returncode, out.stdout + out.stderr


def _coco(path, images, anns=None, cats=({"id": 5, "name": "thing"},)):
    coco = {"images": images}
    if anns is not None:
        coco["annotations"] = anns
    if cats is not None:
        coco["categories"] = list(cats)
    path.write_text(json.dumps(coco))
    return str(path)


def _train(annotations, images, model):
    return odtk("train", model, "--annotations", annotations, "--images", images, "--backbone", "MobileNetV2FPN",
                "--batch", "2", "--iters", "3", "--resize", "96", "--max-size", "96", "--jitter", "96", "96",
                "--loader-workers", "0", "--override")


def _synthetic_images(synthetic):
    images, train, _ = synthetic
    with open(train) as f:
        return images, json.load(f)["images"][:4]


# 5: EXIF orientation in convert

def _rotated_jpeg(path, box=(50, 10, 90, 40)):
    """A JPEG displayed as 96x64 with a white `box`, stored as 64x96 with EXIF orientation 6 (a phone photo)."""
    shown = Image.new("RGB", (96, 64))
    ImageDraw.Draw(shown).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill="white")
    exif = Image.Exif()
    exif[0x0112] = 6
    shown.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def _mean(image, box):
    x1, y1, x2, y2 = (round(v) for v in box)
    return image[:, y1:y2, x1:x2].float().mean().item()


def test_yolo_convert_uses_the_displayed_size(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _rotated_jpeg(tmp_path / "images" / "phone.jpg")
    (tmp_path / "labels" / "phone.txt").write_text(f"0 {70 / 96} {25 / 64} {40 / 96} {30 / 64}\n")
    rc, out = odtk("convert", tmp_path / "labels", tmp_path / "out.json", "--format", "yolo",
                   "--images", tmp_path / "images")
    assert rc == 0, out
    coco = json.loads((tmp_path / "out.json").read_text())
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (96, 64)
    bbox = coco["annotations"][0]["bbox"]
    assert bbox == pytest.approx([50, 10, 40, 30])
    # the box lies on the white rectangle of the image as the loaders read it
    x = load_image(str(tmp_path / "images" / "phone.jpg"))
    assert x.shape == (3, 64, 96)
    box = (bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3])
    assert _mean(x, box) > 240 and x.float().mean() < 255 * 40 * 30 / (96 * 64) + 5


VOC = ("<annotation><filename>phone.jpg</filename><size><width>{w}</width><height>{h}</height></size>"
       "<object><name>cell</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
       "<ymax>{b[3]}</ymax></bndbox></object></annotation>")


@pytest.mark.parametrize("xml_size, xml_box, warning", [
    ((96, 64), (50, 10, 90, 40), None),                                        # drawn on the displayed image
    ((64, 96), (10, 6, 40, 46), "is phone.jpg's stored size, but it displays as 96x64 (EXIF orientation 6)"),
    ((192, 128), (100, 20, 180, 80), "<size> 192x128 differs from phone.jpg's 96x64"),   # resized after labelling
])
def test_voc_boxes_follow_the_displayed_image(tmp_path, caplog, xml_size, xml_box, warning):
    os.makedirs(tmp_path / "Annotations")
    os.makedirs(tmp_path / "JPEGImages")
    _rotated_jpeg(tmp_path / "JPEGImages" / "phone.jpg")
    (tmp_path / "Annotations" / "phone.xml").write_text(VOC.format(w=xml_size[0], h=xml_size[1], b=xml_box))
    coco, skipped = convert_voc(str(tmp_path))
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (96, 64) and not skipped
    assert coco["annotations"][0]["bbox"] == pytest.approx([50, 10, 40, 30])
    if warning:
        assert f"phone.xml: <size> {xml_size[0]}x{xml_size[1]} " in caplog.text and warning in caplog.text
    else:
        assert "phone.xml" not in caplog.text


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_box_matches_pil(tmp_path, orientation):
    stored = Image.new("L", (7, 5))
    stored.putpixel((4, 1), 255)                    # the box (4, 1, 5, 2) on the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        shown = ImageOps.exif_transpose(im)
    x1, y1, x2, y2 = exif_box((4, 1, 5, 2), (7, 5), orientation)
    assert shown.getpixel((x1, y1)) == 255 and (x2 - x1, y2 - y1) == (1, 1)


# 7: category_id not in categories

def test_unknown_category_is_dropped_and_named(tmp_path, caplog):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    anns = [{"id": 6, "image_id": 3, "category_id": 5, "bbox": [1, 1, 10, 10]},
            {"id": 7, "image_id": 3, "category_id": 99, "bbox": [2, 2, 10, 10]},
            {"id": 8, "image_id": 3, "category_id": 98, "bbox": [3, 3, 10, 10]}]
    ds = CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", [{"id": 3, "file_name": "a.png", "width": 40,
                                                                  "height": 30}], anns))
    assert ds.boxes[3].tolist() == [[1, 1, 11, 11]] and ds.labels[3].tolist() == [0]
    assert ("a.json: dropped 2 boxes: category_id not in 'categories'; first: annotation 7, image_id 3, "
            "category_id 99") in caplog.text


# 8: no categories

def test_no_categories_is_one_line_and_keeps_the_model(synthetic, tmp_path):
    images, entries = _synthetic_images(synthetic)
    anns = [{"id": 1, "image_id": entries[0]["id"], "category_id": 2, "bbox": [10, 10, 20, 20]}]
    annotations = _coco(tmp_path / "nocats.json", entries, anns, cats=None)
    (tmp_path / "m.pth").write_bytes(b"the previous model")
    rc, out = _train(annotations, images, tmp_path / "m.pth")
    assert rc == 2 and "Traceback" not in out
    assert (f"{annotations}: no 'categories', so no classes to train; add one entry per class, e.g. \"categories\": "
            f"[{{\"id\": 1, \"name\": \"cat\"}}] (its annotations use category_id 2)") in out
    assert (tmp_path / "m.pth").read_bytes() == b"the previous model"


# 11: no boxes

@pytest.mark.parametrize("anns, detail", [
    (None, "it has no 'annotations'"),
    ([{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 0, 5]}], "all 1 annotations were dropped"),
])
def test_no_boxes_refuses_to_train(synthetic, tmp_path, anns, detail):
    images, entries = _synthetic_images(synthetic)
    entries = [{**im, "id": i} for i, im in enumerate(entries, 1)]
    annotations = _coco(tmp_path / "empty.json", entries, anns)
    rc, out = _train(annotations, images, tmp_path / "m.pth")
    assert rc == 2 and "Traceback" not in out and not (tmp_path / "m.pth").exists()
    assert f"{annotations}: no boxes to train on ({detail}" in out
    assert "each object needs an annotation with image_id, category_id and bbox [x, y, width, height]" in out


def test_no_boxes_is_a_warning_outside_training(synthetic, tmp_path, caplog):
    images, entries = _synthetic_images(synthetic)
    ds = CocoDataset(images, _coco(tmp_path / "empty.json", entries), category_ids=[5])
    assert len(ds) == 4
    assert "empty.json: not a single box in any image (it has no 'annotations')" in caplog.text


# 14: flat VOC layouts

def _flat(root, annotations="annotations", images="images"):
    os.makedirs(root / annotations)
    os.makedirs(root / images)
    Image.new("RGB", (100, 80)).save(root / images / "a.jpg")
    (root / annotations / "a.xml").write_text(VOC.replace("phone.jpg", "a.jpg").format(w=100, h=80, b=(5, 5, 50, 40)))


@pytest.mark.parametrize("annotations, images", [("annotations", "images"), ("Labels", "Images"),
                                                 ("Annotations", "JPEGImages")])
def test_flat_voc_layout(tmp_path, annotations, images):
    _flat(tmp_path, annotations, images)
    rc, out = odtk("convert", tmp_path, tmp_path / "out.json")
    assert rc == 0, out
    coco = json.loads((tmp_path / "out.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.jpg"] and coco["annotations"][0]["bbox"] == [5, 5, 45, 35]


def test_unknown_layout_names_the_accepted_ones(tmp_path):
    (tmp_path / "data" / "labels").mkdir(parents=True)
    (tmp_path / "data" / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "out.json").write_text("{}")
    rc, out = odtk("convert", tmp_path / "data", tmp_path / "out.json")
    assert rc == 2 and "Traceback" not in out
    assert (f"{tmp_path / 'data'}: no VOC .xml annotations found; accepted layouts: DIR/Annotations/*.xml with "
            f"DIR/JPEGImages/ (Pascal VOC), DIR/annotations/*.xml or DIR/labels/*.xml with DIR/images/ (any case), "
            f"or DIR/*.xml with ../JPEGImages/ or ../images/; YOLO .txt labels need --format yolo --images "
            f"IMAGES") in out
    assert (tmp_path / "out.json").read_text() == "{}"


# 15: negative sizes are invalid, not zero-area

def test_negative_size_is_invalid_not_zero_area(tmp_path, caplog):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [20, 5, -3, 4]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 4]},
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [5, 5, 10, 10]}]
    for images in ([{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], [{"id": 1, "file_name": "a.png"}]):
        caplog.clear()
        ds = CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", images, anns))
        assert ds.boxes[1].tolist() == [[5, 5, 15, 15]]
        assert "a.json: dropped 1 box: invalid (negative size); first: annotation 1, image_id 1, bbox [20, 5, -3, 4]" \
            in caplog.text
        assert "a.json: dropped 1 box: zero-area; first: annotation 2" in caplog.text


def test_convert_negative_size_is_invalid(tmp_path):
    _flat(tmp_path)
    (tmp_path / "annotations" / "a.xml").write_text(VOC.replace("phone.jpg", "a.jpg").format(w=100, h=80,
                                                                                             b=(50, 5, 20, 40)))
    coco, skipped = convert_voc(str(tmp_path))
    assert skipped == {"invalid box (negative size)": 1} and not coco["annotations"]


# 16: temp files of killed saves, and file modes

def test_killed_save_leaves_a_temp_that_the_next_save_removes(tmp_path):
    target = tmp_path / "model.pth"
    code = ("import os, signal, sys\nfrom odtk.utils import atomic_path\n"
            "with atomic_path(sys.argv[1], '.pth') as tmp:\n"
            "    open(tmp, 'wb').write(b'x' * 100000)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == -signal.SIGKILL
    killed = glob.glob(str(tmp_path / ".model.pth.*.tmp-*.pth"))
    assert len(killed) == 1 and os.path.getsize(killed[0]) == 100000 and not target.exists()
    # a save in progress in a live process (this one), and a killed save of another file: both left alone
    owner = re.match(r"(\.model\.pth\.[\w-]+\.)(\d+)\.tmp-", os.path.basename(killed[0]))
    live = str(tmp_path / f"{owner[1]}{os.getpid()}.tmp-live.pth")
    other = killed[0].replace(".model.pth.", ".other.pth.")
    for path in (live, other):
        open(path, "wb").close()
    atomic_save({"weights": torch.ones(2)}, str(target))
    assert not os.path.exists(killed[0]) and os.path.exists(live) and os.path.exists(other)
    assert torch.load(str(target))["weights"].tolist() == [1, 1]


def test_saved_files_get_the_mode_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text("{}", str(tmp_path / "a.json"))
        atomic_save({}, str(tmp_path / "m.pth"))
        os.umask(0o002)
        atomic_write_text("{}", str(tmp_path / "b.json"))
        (tmp_path / "c.json").write_text("old")
        os.chmod(tmp_path / "c.json", 0o640)             # an existing file keeps its mode, as with open()
        atomic_write_text("{}", str(tmp_path / "c.json"))
    finally:
        os.umask(old)
    modes = {p: os.stat(tmp_path / p).st_mode & 0o777 for p in ("a.json", "m.pth", "b.json", "c.json")}
    assert modes == {"a.json": 0o644, "m.pth": 0o644, "b.json": 0o664, "c.json": 0o640}
