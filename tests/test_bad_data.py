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
from PIL import Image

from odtk.data import CocoDataset
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
