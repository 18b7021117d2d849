"""Turn Pascal VOC XML folders, YOLO txt labels or DOTA labelTxt files into one COCO JSON."""
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .constants import IMAGE_EXTENSIONS
from .utils import OdtkError, atomic_write_text, log

# VOC layouts: annotation and image folder names, matched in any case (VOC's Annotations/ and flat annotations/)
ANNOTATION_FOLDERS = ("annotations", "labels")
IMAGE_FOLDERS = ("jpegimages", "images")
VOC_LAYOUTS = ("DIR/Annotations/*.xml with DIR/JPEGImages/ (Pascal VOC), DIR/annotations/*.xml or "
               "DIR/labels/*.xml with DIR/images/ (any case), or DIR/*.xml with ../JPEGImages/ or ../images/")
EXIF_ORIENTATION = 0x0112

Box = Tuple[float, float, float, float]
RotatedBbox = Tuple[float, float, float, float, float]     # COCO's rotated bbox: x, y, w, h, theta
DOTA_HEADERS = ("imagesource", "gsd")
DOTA_LINE = "x1 y1 x2 y2 x3 y3 x4 y4 class difficult"


# Rotated boxes (issue 13) in plain numbers, for reading and writing datasets (odtk.rotated has the tensor API).

def rotate_points(offsets: np.ndarray, centre: Sequence[float], theta: float) -> np.ndarray:
    """Points given as [N, 2] offsets from `centre` of an unrotated shape, turned by theta about the centre as
    ODTK's rotate_boxes turns them: (dx, dy) -> (dx cos + dy sin, -dx sin + dy cos), in image coordinates (y
    down). So a positive theta turns a box counter-clockwise as displayed: see bbox_corners' example."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = offsets[:, 0], offsets[:, 1]
    return np.stack([dx * c + dy * s, -dx * s + dy * c], axis=1) + np.asarray(centre, dtype=np.float64)


def bbox_corners(bbox: Sequence[float]) -> np.ndarray:
    """The 4 corners [4, 2] of a rotated COCO bbox [x, y, w, h, theta] (x, y, w, h of the box before the rotation,
    turned about its centre): the unrotated box's top-left, top-right, bottom-right and bottom-left, turned.

    Example, y pointing down: [51, 43, 20, 10, 0.6435] (sin 0.6, cos 0.8) has corners (50, 50), (66, 38),
    (72, 46), (56, 58): the top edge rises to the right, the box turned counter-clockwise on screen.
    """
    x, y, w, h, theta = (float(v) for v in bbox)
    offsets = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64) / 2
    return rotate_points(offsets, (x + w / 2, y + h / 2), theta)


def fold_angle(width: float, height: float, theta: float) -> Tuple[float, float, float]:
    """The same rectangle with theta in [-pi/4, pi/4] (ODTK's range): theta shifted by k quarter turns, width and
    height swapped when k is odd."""
    k = round(theta / (math.pi / 2))
    theta -= k * math.pi / 2
    return (height, width, theta) if k % 2 else (width, height, theta)


def min_area_rect(points: np.ndarray) -> Optional[RotatedBbox]:
    """The smallest rectangle around the [N, 2] points as a rotated COCO bbox, theta in [-pi/4, pi/4]; None when
    the points span no area.

    The smallest rectangle has a side along an edge of the points' convex hull, and every hull edge joins two of
    the points: try each pair's direction as the width axis, (cos theta, -sin theta) in bbox_corners' convention.
    """
    points = np.asarray(points, dtype=np.float64)
    best = None
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            edge = points[j] - points[i]
            length = math.hypot(*edge)
            if length == 0:
                continue
            u = edge / length
            v = np.array([-u[1], u[0]])            # the height axis, (sin theta, cos theta)
            along, across = points @ u, points @ v
            area = np.ptp(along) * np.ptp(across)
            if best is None or area < best[0]:
                best = (area, u, v, along, across)
    if best is None or best[0] <= 0:
        return None
    _, u, v, along, across = best
    centre = (along.max() + along.min()) / 2 * u + (across.max() + across.min()) / 2 * v
    w, h, theta = fold_angle(float(np.ptp(along)), float(np.ptp(across)), math.atan2(-u[1], u[0]))
    return float(centre[0]) - w / 2, float(centre[1]) - h / 2, w, h, theta + 0.0     # + 0.0: -0.0 -> 0.0


@dataclass
class _Coco:
    """Accumulates a COCO dict; category ids are 1..N in first-seen (or given) order."""
    classes: List[str] = field(default_factory=list)
    fixed_classes: bool = False
    images: List[dict] = field(default_factory=list)
    annotations: List[dict] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)
    notes: Dict[str, int] = field(default_factory=dict)      # fix-ups made to whole images' boxes

    def category(self, name: str, where: str) -> Optional[int]:
        if name not in self.classes:
            if self.fixed_classes:
                self.skip(f"class '{name}' not in --class-names", where)
                return None
            self.classes.append(name)
        return self.classes.index(name) + 1

    def skip(self, why: str, where: str) -> None:
        if why not in self.skipped:
            log.warning(f"{where}: {why} (skipped)")
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def note(self, why: str, detail: str) -> None:
        """A fix-up of an image's boxes: warned in full the first time, counted (log_notes) every time."""
        if why not in self.notes:
            log.warning(detail)
        self.notes[why] = self.notes.get(why, 0) + 1

    def log_notes(self, where: str) -> None:
        for why, n in self.notes.items():
            if n > 1:
                log.warning(f"{where}: {n} images: {why}")

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, category: int, box: Box, size: Tuple[int, int], where: str,
                iscrowd: int = 0) -> None:
        """Add (x1, y1, x2, y2) clipped to the image's (width, height); skip an invalid, empty or outside box."""
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            self.skip("invalid box (negative size)", where)
            return
        if x2 == x1 or y2 == y1:
            self.skip("zero-area box", where)
            return
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(size[0]), x2), min(float(size[1]), y2)
        if x2 <= x1 or y2 <= y1:
            self.skip("box outside the image", where)
            return
        w, h = x2 - x1, y2 - y1
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
                                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": iscrowd})

    def add_rotated(self, image_id: int, category: int, bbox: RotatedBbox, size: Tuple[int, int], where: str,
                    iscrowd: int = 0) -> None:
        """Add a rotated bbox [x, y, w, h, theta] with its corners as the segmentation; skip one whose centre is not
        inside the image (width, height): clipping would change its shape, and the loaders drop those too."""
        x, y, w, h, _ = bbox
        if not (0 < x + w / 2 < size[0] and 0 < y + h / 2 < size[1]):
            self.skip("box centre outside the image", where)
            return
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
                                 "bbox": list(bbox), "segmentation": [bbox_corners(bbox).ravel().tolist()],
                                 "area": w * h, "iscrowd": iscrowd})

    def to_json(self, *, sort_classes: bool = False) -> dict:
        """With `sort_classes`, ids follow the sorted names, so every split of a dataset gets the same ids."""
        names = sorted(self.classes) if sort_classes and not self.fixed_classes else self.classes
        new_id = {self.classes.index(n) + 1: names.index(n) + 1 for n in names}
        for a in self.annotations:
            a["category_id"] = new_id[a["category_id"]]
        return {"images": self.images, "annotations": self.annotations,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def _subfolder(root: str, names: Tuple[str, ...]) -> Optional[str]:
    """The subfolder of `root` named (in any case) the first of `names` present, or None."""
    found = {e.lower(): os.path.join(root, e) for e in sorted(os.listdir(root), reverse=True)
             if os.path.isdir(os.path.join(root, e))}
    return next((found[n] for n in names if n in found), None)


def _has(folder: str, extension: str) -> bool:
    return any(f.lower().endswith(extension) for f in os.listdir(folder))


def _voc_folders(source: str, images: Optional[str]) -> Tuple[str, str]:
    """(annotations folder, images folder) of the layouts in VOC_LAYOUTS.

    The XML is in `source`'s Annotations/ or labels/ subfolder (any case) when that has some, else in `source`;
    the images in --images, else in JPEGImages/ or images/ (any case) beside the annotations folder.
    """
    if not os.path.isdir(source):
        raise OdtkError(f"{source}: no such folder")
    sub = _subfolder(source, ANNOTATION_FOLDERS)
    candidates = [sub, source] if sub else [source]
    ann_dir = next((d for d in candidates if _has(d, ".xml")), None)
    if ann_dir is None:
        txt = any(_has(d, ".txt") for d in candidates)
        yolo = "; YOLO .txt labels need --format yolo --images IMAGES" if txt else ""
        raise OdtkError(f"{source}: no VOC .xml annotations found; accepted layouts: {VOC_LAYOUTS}{yolo}")
    root = os.path.dirname(os.path.abspath(ann_dir))
    return ann_dir, images or _subfolder(root, IMAGE_FOLDERS) or os.path.join(root, "JPEGImages")


def _read_ids(image_set: str) -> List[str]:
    if not os.path.isfile(image_set):
        raise OdtkError(f"{image_set}: image set list not found")
    with open(image_set) as f:
        return [line.split()[0] for line in f if line.strip()]


def read_size(path: str) -> Tuple[Tuple[int, int], int]:
    """(stored width, height) and EXIF orientation (1 when none) of an image, reading only its header."""
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            return im.size, orientation if orientation in range(1, 9) else 1
    except Exception as e:
        raise OdtkError(f"{path}: cannot read image ({e.__class__.__name__})") from None


def displayed_size(size: Tuple[int, int], orientation: int) -> Tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, as the loaders do: 5-8 turn the image a quarter."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def exif_box(box: Box, size: Tuple[int, int], orientation: int) -> Box:
    """A box on the stored pixels (`size` = stored width, height) -> the same pixels once displayed, as PIL's
    exif_transpose turns them (2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise, 7 transverse,
    8 quarter turn anticlockwise)."""
    x1, y1, x2, y2 = box
    w, h = size
    return {2: (w - x2, y1, w - x1, y2), 3: (w - x2, h - y2, w - x1, h - y1), 4: (x1, h - y2, x2, h - y1),
            5: (y1, x1, y2, x2), 6: (h - y2, x1, h - y1, x2), 7: (h - y2, w - x2, h - y1, w - x1),
            8: (y1, w - x2, y2, w - x1)}.get(orientation, box)


def _xml_size(root: ET.Element) -> Tuple[int, int]:
    """VOC's <size> (width, height); 0 where missing or not a number."""
    def number(key: str) -> int:
        try:
            return int(float(root.findtext(f"size/{key}", "0") or 0))
        except ValueError:
            return 0
    return number("width"), number("height")


def _unchanged(box: Box) -> Box:
    return box


def _voc_frame(xml: str, xml_size: Tuple[int, int], image: str,
               coco: _Coco) -> Tuple[Tuple[int, int], Callable[[Box], Box]]:
    """The image's (width, height) as displayed and how the XML's boxes map onto it (see convert_voc)."""
    if not os.path.isfile(image):
        if min(xml_size) <= 0:
            raise OdtkError(f"{xml}: no <size>, and its image {image} is not there to read it from (--images)")
        return xml_size, _unchanged
    try:
        stored, orientation = read_size(image)
    except OdtkError as e:
        if min(xml_size) <= 0:
            raise
        # the loaders skip an unreadable image with a warning when training: no reason to stop here
        coco.note("unreadable, their XML <size> kept", f"{e}: its XML <size> is kept")
        return xml_size, _unchanged
    shown = displayed_size(stored, orientation)
    if min(xml_size) <= 0 or xml_size == shown:
        return shown, _unchanged
    name = os.path.basename(image)
    if xml_size == stored:   # an annotator that ignored EXIF (LabelImg does) drew on the stored pixels
        coco.note("boxes turned with the EXIF orientation",
                  f"{xml}: <size> {xml_size[0]}x{xml_size[1]} is {name}'s stored size, but it displays as "
                  f"{shown[0]}x{shown[1]} (EXIF orientation {orientation}) and odtk loads it so: boxes turned with it")
        return shown, lambda box: exif_box(box, stored, orientation)
    sx, sy = shown[0] / xml_size[0], shown[1] / xml_size[1]
    coco.note("boxes scaled to the image's size",
              f"{xml}: <size> {xml_size[0]}x{xml_size[1]} differs from {name}'s {shown[0]}x{shown[1]} "
              f"(resized after labelling?): boxes scaled to the image")
    return shown, lambda box: (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def convert_voc(source: str, *, images: Optional[str] = None, split: Optional[str] = None,
                image_set: Optional[str] = None, classes: Optional[List[str]] = None) -> Tuple[dict, dict]:
    """VOC XML -> (COCO dict, skip counts). `split` picks ImageSets/Main/<split>.txt under a VOC root.

    Boxes are recorded on the image as displayed (EXIF orientation applied), as the loaders read it. When the image
    is there and its displayed size differs from the XML's <size>: if <size> is the stored (un-rotated) size, the
    boxes were drawn on the stored pixels (LabelImg ignores EXIF) and are turned with the image; otherwise they are
    scaled to the image (resized after labelling). Both are warned about. A half turn or a mirror (orientations
    2-4) keeps the size, so it cannot be told apart: those boxes are taken as drawn on the displayed image. Without
    the image (or when it cannot be read) the XML's <size> is trusted.
    """
    ann_dir, img_dir = _voc_folders(source, images)
    if split and not image_set:
        image_set = os.path.join(os.path.dirname(ann_dir), "ImageSets", "Main", f"{split}.txt")
    if image_set:
        files = [os.path.join(ann_dir, i + ".xml") for i in _read_ids(image_set)]
    else:
        files = sorted(os.path.join(ann_dir, f) for f in os.listdir(ann_dir) if f.endswith(".xml"))
    if not files:
        raise OdtkError(f"{image_set}: lists no images")
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
        image_size, to_image = _voc_frame(path, _xml_size(root), os.path.join(img_dir, name), coco)
        image_id = coco.add_image(name, *image_size)
        for obj in root.iter("object"):
            cat = coco.category((obj.findtext("name") or "").strip(), where)
            bb = obj.find("bndbox")
            if cat is None or bb is None:
                continue
            try:
                box = tuple(float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:
                coco.skip("malformed <bndbox>", where)
                continue
            coco.add_box(image_id, cat, to_image(box), image_size, where,
                         iscrowd=int(obj.findtext("difficult", "0") or 0))
    coco.log_notes(ann_dir)
    return coco.to_json(sort_classes=True), coco.skipped


def _labelled_images(source: str, images: Optional[str], name: str) -> Dict[str, str]:
    """Stem -> file name of the images of a label-file format (YOLO, DOTA: one SOURCE/stem.txt per image), after
    checking both folders."""
    if not images:
        raise OdtkError(f"{name} conversion needs --images, the folder of the labelled images")
    if not os.path.isdir(images):
        raise OdtkError(f"{images}: images folder not found")
    if not os.path.isdir(source):
        raise OdtkError(f"{source}: no such folder")
    stems = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(images)) if f.lower().endswith(IMAGE_EXTENSIONS)}
    if not stems:
        raise OdtkError(f"{images}: no images found")
    return stems


def convert_yolo(source: str, *, images: str, classes: Optional[List[str]] = None) -> Tuple[dict, dict]:
    """YOLO labels (class cx cy w h, fractions of the image as displayed) + images folder -> COCO dict."""
    stems = _labelled_images(source, images, "YOLO")
    coco = _Coco(classes=list(classes or []), fixed_classes=bool(classes))
    for image_id, (width, height), where, parts in _label_lines(coco, stems, images, source):
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
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        coco.add_box(image_id, cat, box, (width, height), where)
    return coco.to_json(), coco.skipped


def _label_lines(coco: "_Coco", stems: Dict[str, str], images: str, folder: str,
                 header: Callable[[str], bool] = lambda line: False) -> Iterator[Tuple[int, Tuple[int, int], str,
                                                                                        List[str]]]:
    """Add each image of `stems` to `coco` and yield (image id, (width, height), 'file:line', fields) for each
    non-empty, non-`header` line of its label file `folder`/stem.txt (an image without one has no objects, as YOLO
    and DOTA have it). Sizes are as displayed: the labels were drawn on the EXIF-oriented image."""
    for stem, file_name in stems.items():
        size = displayed_size(*read_size(os.path.join(images, file_name)))
        image_id = coco.add_image(file_name, *size)
        label = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(label):
            continue
        with open(label) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if parts and not header(line):
                    yield image_id, size, f"{os.path.basename(label)}:{n}", parts


def _dota_object(parts: List[str]) -> Tuple[np.ndarray, str, int]:
    """(4 points [4, 2], class name, difficult) of a DOTA object line's fields (difficult may be left out: 0);
    ValueError when the line is not DOTA_LINE."""
    if len(parts) not in (9, 10):
        raise ValueError
    points = np.array([float(v) for v in parts[:8]]).reshape(4, 2)
    if not np.isfinite(points).all():
        raise ValueError
    return points, parts[8], int(parts[9]) if len(parts) == 10 else 0


def convert_dota(source: str, *, images: Optional[str], classes: Optional[List[str]] = None) -> Tuple[dict, dict]:
    """DOTA labelTxt files (in `source` or its labelTxt/ subfolder, one per image: stem.txt) + images folder ->
    rotated COCO dict.

    Each object line (DOTA_LINE) becomes the smallest rectangle around its 4 points (min_area_rect): bbox
    [x, y, w, h, theta] with theta in [-pi/4, pi/4], segmentation its 4 corners (bbox_corners), area w * h;
    difficult 1 -> iscrowd 1 (ignored in training and by COCOeval, as VOC's difficult). Header lines
    (imagesource:..., gsd:...) are skipped; an image without a label file has no objects. Classes are the names
    sorted, or `classes` (others skipped).
    """
    stems = _labelled_images(source, images, "DOTA")
    folder = _subfolder(source, ("labeltxt",)) or source
    coco = _Coco(classes=list(classes or []), fixed_classes=bool(classes))
    header = lambda line: line.split(":", 1)[0].strip() in DOTA_HEADERS   # noqa: E731
    for image_id, size, where, parts in _label_lines(coco, stems, images, folder, header):
        try:
            points, name, difficult = _dota_object(parts)
        except ValueError:
            coco.skip(f"malformed line (not '{DOTA_LINE}')", where)
            continue
        # the class first: a class seen only in skipped boxes still gets its id (the same in every split)
        category = coco.category(name, where)
        bbox = min_area_rect(points)
        if bbox is None:
            coco.skip("zero-area polygon", where)
        elif category is not None:
            coco.add_rotated(image_id, category, bbox, size, where, iscrowd=int(difficult != 0))
    orphans = sorted(f for f in os.listdir(folder) if f.endswith(".txt") and os.path.splitext(f)[0] not in stems)
    if orphans:
        log.warning(f"{folder}: {len(orphans)} label file{'s' if len(orphans) > 1 else ''} without an image in "
                    f"{images} (first: {orphans[0]}): skipped")
    return coco.to_json(sort_classes=True), coco.skipped


def write_coco(coco: dict, skipped: dict, output: str) -> None:
    atomic_write_text(json.dumps(coco), output)
    counts = {c["id"]: 0 for c in coco["categories"]}
    for a in coco["annotations"]:
        counts[a["category_id"]] += 1
    per_class = ", ".join(f"{c['name']} {counts[c['id']]}" for c in coco["categories"])
    log.info(f"wrote {output}: {len(coco['images'])} images, {len(coco['annotations'])} boxes ({per_class})")
    for why, n in skipped.items():
        log.warning(f"skipped {n} x {why}")
