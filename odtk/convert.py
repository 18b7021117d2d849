"""Turn Pascal VOC XML folders or YOLO txt labels into one COCO JSON."""
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from PIL import Image

from .constants import IMAGE_EXTENSIONS
from .utils import OdtkError, atomic_write_text, log


@dataclass
class _Coco:
    """Accumulates a COCO dict; category ids are 1..N in first-seen (or given) order."""
    classes: List[str] = field(default_factory=list)
    fixed_classes: bool = False
    images: List[dict] = field(default_factory=list)
    annotations: List[dict] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)

    def category(self, name: str, where: str) -> Optional[int]:
        if name not in self.classes:
            if self.fixed_classes:
                self.skip(f"class '{name}' not in --classes", where)
                return None
            self.classes.append(name)
        return self.classes.index(name) + 1

    def skip(self, why: str, where: str) -> None:
        if why not in self.skipped:
            log.warning(f"{where}: {why} (skipped)")
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, category: int, x1: float, y1: float, x2: float, y2: float,
                where: str, iscrowd: int = 0) -> None:
        if x2 <= x1 or y2 <= y1:
            self.skip("zero-area box", where)
            return
        w, h = x2 - x1, y2 - y1
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
                                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": iscrowd})

    def to_json(self, *, sort_classes: bool = False) -> dict:
        """With `sort_classes`, ids follow the sorted names, so every split of a dataset gets the same ids."""
        names = sorted(self.classes) if sort_classes and not self.fixed_classes else self.classes
        new_id = {self.classes.index(n) + 1: names.index(n) + 1 for n in names}
        for a in self.annotations:
            a["category_id"] = new_id[a["category_id"]]
        return {"images": self.images, "annotations": self.annotations,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def _voc_folders(source: str, images: Optional[str]) -> Tuple[str, str]:
    """(annotations folder, images folder) from a VOC root or an Annotations folder."""
    if os.path.isdir(os.path.join(source, "Annotations")):
        return os.path.join(source, "Annotations"), images or os.path.join(source, "JPEGImages")
    if not os.path.isdir(source):
        raise OdtkError(f"{source}: no such folder")
    return source, images or os.path.join(os.path.dirname(os.path.abspath(source)), "JPEGImages")


def _read_ids(image_set: str) -> List[str]:
    if not os.path.isfile(image_set):
        raise OdtkError(f"{image_set}: image set list not found")
    with open(image_set) as f:
        return [line.split()[0] for line in f if line.strip()]


def _image_size(path: str) -> Tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise OdtkError(f"{path}: cannot read image ({e.__class__.__name__})") from None


def convert_voc(source: str, *, images: Optional[str] = None, split: Optional[str] = None,
                image_set: Optional[str] = None, classes: Optional[List[str]] = None) -> Tuple[dict, dict]:
    """VOC XML -> (COCO dict, skip counts). `split` picks ImageSets/Main/<split>.txt under a VOC root."""
    ann_dir, img_dir = _voc_folders(source, images)
    if split and not image_set:
        image_set = os.path.join(os.path.dirname(ann_dir), "ImageSets", "Main", f"{split}.txt")
    if image_set:
        files = [os.path.join(ann_dir, i + ".xml") for i in _read_ids(image_set)]
    else:
        files = sorted(os.path.join(ann_dir, f) for f in os.listdir(ann_dir) if f.endswith(".xml"))
    if not files:
        raise OdtkError(f"{ann_dir}: no VOC .xml annotations found")
    coco = _Coco(classes=list(classes or []), fixed_classes=bool(classes))
    for path in files:
        where = os.path.basename(path)
        if not os.path.isfile(path):
            raise OdtkError(f"{path}: annotation listed in {image_set} not found")
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise OdtkError(f"{path}: not valid XML ({e})") from None
        # <path> points at the annotator's machine: trust only <filename> and the images folder
        name = (root.findtext("filename") or "").strip() or os.path.splitext(where)[0] + ".jpg"
        if not os.path.splitext(name)[1]:
            name += ".jpg"
        size = root.find("size")
        width = int(float(size.findtext("width", "0"))) if size is not None else 0
        height = int(float(size.findtext("height", "0"))) if size is not None else 0
        if width <= 0 or height <= 0:
            width, height = _image_size(os.path.join(img_dir, name))
        image_id = coco.add_image(name, width, height)
        for obj in root.iter("object"):
            cat = coco.category((obj.findtext("name") or "").strip(), where)
            bb = obj.find("bndbox")
            if cat is None or bb is None:
                continue
            x1, y1, x2, y2 = (float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
            x1, x2 = max(0.0, x1), min(float(width), x2)
            y1, y2 = max(0.0, y1), min(float(height), y2)
            coco.add_box(image_id, cat, x1, y1, x2, y2, where, iscrowd=int(obj.findtext("difficult", "0") or 0))
    return coco.to_json(sort_classes=True), coco.skipped


def convert_yolo(source: str, *, images: str, classes: Optional[List[str]] = None) -> Tuple[dict, dict]:
    """YOLO labels (class cx cy w h, normalised) + images folder -> COCO dict."""
    if not images or not os.path.isdir(images):
        raise OdtkError(f"{images}: YOLO conversion needs --images, the folder of the labelled images")
    if not os.path.isdir(source):
        raise OdtkError(f"{source}: no such folder")
    coco = _Coco(classes=list(classes or []), fixed_classes=bool(classes))
    stems = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(images))
             if f.lower().endswith(IMAGE_EXTENSIONS)}
    if not stems:
        raise OdtkError(f"{images}: no images found")
    for stem, file_name in stems.items():
        width, height = _image_size(os.path.join(images, file_name))
        image_id = coco.add_image(file_name, width, height)
        label = os.path.join(source, stem + ".txt")
        if not os.path.isfile(label):
            continue        # YOLO's convention: an image without a label file has no objects
        with open(label) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                where = f"{os.path.basename(label)}:{n}"
                try:
                    idx, cx, cy, w, h = int(parts[0]), *map(float, parts[1:5])
                except (ValueError, TypeError):
                    coco.skip("malformed label line", where)
                    continue
                if idx < 0 or (classes and idx >= len(classes)):
                    coco.skip("class index out of range", where)
                    continue
                cat = idx + 1
                while len(coco.classes) < cat:     # unnamed classes are called by their index
                    coco.classes.append(str(len(coco.classes)))
                x1, y1 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
                x2, y2 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
                coco.add_box(image_id, cat, x1, y1, x2, y2, where)
    return coco.to_json(), coco.skipped


def write_coco(coco: dict, skipped: dict, output: str) -> None:
    atomic_write_text(json.dumps(coco), output)
    counts = {c["id"]: 0 for c in coco["categories"]}
    for a in coco["annotations"]:
        counts[a["category_id"]] += 1
    per_class = ", ".join(f"{c['name']} {counts[c['id']]}" for c in coco["categories"])
    log.info(f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations'])} boxes ({per_class})")
    for why, n in skipped.items():
        log.warning(f"skipped {n} x {why}")
