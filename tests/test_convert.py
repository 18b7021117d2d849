"""VOC and YOLO conversion to COCO."""
import json
import os

import pytest
from PIL import Image

from odtk.convert import convert_voc, convert_yolo, write_coco
from odtk.utils import OdtkError

VOC = """<annotation><folder>JPEGImages</folder><filename>{name}</filename>
<path>/elsewhere/{name}</path><size><width>100</width><height>80</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = "<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>" \
      "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"


def _voc(root, items):
    os.makedirs(root / "Annotations")
    os.makedirs(root / "ImageSets" / "Main")
    for stem, objs in items.items():
        objects = "".join(OBJ.format(c=c, b=b, d=d) for c, b, d in objs)
        (root / "Annotations" / f"{stem}.xml").write_text(VOC.format(name=stem + ".jpg", objects=objects))
    (root / "ImageSets" / "Main" / "test.txt").write_text("b\n")


def test_voc_to_coco(tmp_path):
    _voc(tmp_path, {"a": [("dog", (5, 5, 5, 5), 0), ("cat", (10, 10, 50, 40), 0)],
                    "b": [("dog", (0, 0, 120, 30), 1), ("cat", (20, 20, 30, 30), 0)]})
    coco, skipped = convert_voc(str(tmp_path))
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]   # sorted, whatever the file order
    assert skipped == {"zero-area box": 1}
    assert coco["annotations"][0]["bbox"] == [10, 10, 40, 30]
    assert coco["annotations"][0]["category_id"] == 1
    assert coco["annotations"][1]["bbox"] == [0, 0, 100, 30]      # clipped to the image width
    assert coco["annotations"][1]["iscrowd"] == 1                 # VOC 'difficult' -> ignored by COCOeval
    coco, _ = convert_voc(str(tmp_path), split="test")
    assert [im["file_name"] for im in coco["images"]] == ["b.jpg"]
    out = tmp_path / "out.json"
    write_coco(coco, {}, str(out))
    assert json.loads(out.read_text())["images"][0]["width"] == 100


def test_voc_errors(tmp_path):
    with pytest.raises(OdtkError, match="no such folder"):
        convert_voc(str(tmp_path / "nope"))
    _voc(tmp_path, {"a": []})
    with pytest.raises(OdtkError, match="image set list not found"):
        convert_voc(str(tmp_path), split="train")
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><broken")
    with pytest.raises(OdtkError, match="a.xml: not valid XML"):
        convert_voc(str(tmp_path))


def test_yolo_to_coco(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("RGB", (200, 100)).save(images / "x.png")
    Image.new("RGB", (50, 50)).save(images / "y.jpg")
    (labels / "x.txt").write_text("1 0.5 0.5 0.2 0.4\nbad line\n")
    coco, skipped = convert_yolo(str(labels), images=str(images), classes=["a", "b"])
    assert len(coco["images"]) == 2 and skipped == {"malformed label line": 1}
    ann = coco["annotations"][0]
    assert ann["category_id"] == 2 and ann["bbox"] == pytest.approx([80, 30, 40, 40])
    with pytest.raises(OdtkError, match="needs --images"):
        convert_yolo(str(labels), images=None)


def test_bccd_conversion(bccd, tmp_path):
    coco, skipped = convert_voc(bccd, split="trainval")
    assert len(coco["images"]) == 292 and skipped == {"zero-area box": 2}
    assert sorted(c["name"] for c in coco["categories"]) == ["Platelets", "RBC", "WBC"]
    test, _ = convert_voc(bccd, split="test", classes=[c["name"] for c in coco["categories"]])
    assert len(test["images"]) == 72 and len(test["annotations"]) == 945
