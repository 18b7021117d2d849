"""A small synthetic COCO dataset made by the project itself: coloured shapes on textured noise."""
import json
import math
import os
import random
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .convert import bbox_corners, rotate_points
from .utils import atomic_write_text, log

CLASSES = ["square", "circle", "triangle"]
MAX_ASPECT = 1.5   # varied sizes: the longer side at most this times the shorter, as most photos
ROTATED_CLASSES = ["rectangle", "ellipse"]
ROTATED_ASPECT = (2.5, 5.0)     # long side / short side of a rotated object: elongated, where rotation matters
ELLIPSE_POINTS = 72
BACKGROUND = (60, 190)          # the rotated images' background channels: never an object colour (_colour)


def _colour(rng: random.Random) -> Tuple[int, int, int]:
    """An object colour: each channel dark (0-50) or bright (205-255)."""
    return tuple(rng.choice((rng.randint(0, 50), rng.randint(205, 255))) for _ in range(3))


def _free(box: Sequence[float], taken: List[Sequence[float]], margin: float = 2) -> bool:
    """Whether box (x1, y1, x2, y2) stays `margin` away from every box in `taken`."""
    x1, y1, x2, y2 = box
    return not any(x1 < bx2 + margin and bx1 < x2 + margin and y1 < by2 + margin and by1 < y2 + margin
                   for bx1, by1, bx2, by2 in taken)


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: Tuple[int, int, int, int], color) -> None:
    x1, y1, x2, y2 = box
    if kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def image_shape(rng: random.Random, vary: Tuple[int, int]) -> Tuple[int, int]:
    """(height, width), each side in `vary` (MIN, MAX), redrawn until the aspect is within MAX_ASPECT."""
    while True:
        h, w = rng.randint(*vary), rng.randint(*vary)
        if max(h, w) <= MAX_ASPECT * min(h, w):
            return h, w


def make_image(rng: random.Random, size: Union[int, Tuple[int, int]], *, max_objects: int = 4,
               min_side: int = None, max_side: int = None) -> Tuple[Image.Image, List[dict]]:
    """One image of `size` (a side, or height width) and its boxes [{'bbox': [x, y, w, h], 'category': name}],
    objects not overlapping."""
    height, width = (size, size) if isinstance(size, int) else size
    short = min(height, width)
    min_side = min_side or max(8, short // 8)
    max_side = max_side or max(min_side + 1, short // 2)
    base = tuple(rng.randint(60, 190) for _ in range(3))
    im = Image.new("RGB", (width, height), base)
    noise = Image.effect_noise((width, height), rng.uniform(20, 50)).convert("RGB")
    im = Image.blend(im, noise, 0.3).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    draw = ImageDraw.Draw(im)
    objects, taken = [], []
    for _ in range(rng.randint(0 if rng.random() < 0.05 else 1, max_objects)):
        side = rng.randint(min_side, max_side)
        w = side if rng.random() < 0.5 else int(side * rng.uniform(0.6, 1.0))
        h = side if rng.random() < 0.5 else int(side * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        if not _free((x, y, x + w, y + h), taken):
            continue
        kind = rng.choice(CLASSES)
        color = _colour(rng)
        _draw(draw, kind, (x, y, x + w - 1, y + h - 1), color)
        taken.append((x, y, x + w, y + h))
        objects.append({"bbox": [x, y, w, h], "category": kind})
    return im, objects


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Blurred grey noise on a random colour, every channel within BACKGROUND, drawn from `rng` alone: the same
    for the same seed in any process (PIL's effect_noise draws from the C library's rand())."""
    base = np.array([rng.randint(*BACKGROUND) for _ in range(3)], dtype=np.float64)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.uniform(20, 50), (height, width, 1))
    pixels = 0.7 * base + 0.3 * noise.clip(*BACKGROUND)
    return Image.fromarray(pixels.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def _shape_outline(kind: str, bbox: Sequence[float]) -> np.ndarray:
    """The [N, 2] outline of a rotated rectangle (its corners) or of the ellipse inscribed in it."""
    if kind == "rectangle":
        return bbox_corners(bbox)
    x, y, w, h, theta = bbox
    t = np.linspace(0, 2 * math.pi, ELLIPSE_POINTS, endpoint=False)
    return rotate_points(np.stack([w / 2 * np.cos(t), h / 2 * np.sin(t)], axis=1), (x + w / 2, y + h / 2), theta)


def fill_convex(pixels: np.ndarray, outline: np.ndarray, color: Sequence[int]) -> None:
    """Paint the pixels of an [H, W, 3] image whose centre lies inside the convex [N, 2] outline (PIL's polygon
    rounds the corners to whole pixels: a rotated box's edge would be off by up to a pixel)."""
    height, width = pixels.shape[:2]
    x1, y1 = np.floor(outline.min(axis=0)).astype(int).clip(0, (width, height))
    x2, y2 = np.ceil(outline.max(axis=0)).astype(int).clip(0, (width, height))
    ys, xs = np.mgrid[y1:y2, x1:x2] + 0.5
    inside = np.ones(xs.shape, dtype=bool)
    centre = outline.mean(axis=0)
    for a, b in zip(outline, np.roll(outline, -1, axis=0)):
        nx, ny = b[1] - a[1], a[0] - b[0]              # a normal of edge a-b; the centre's side is inside
        side = np.sign((centre[0] - a[0]) * nx + (centre[1] - a[1]) * ny)
        inside &= ((xs - a[0]) * nx + (ys - a[1]) * ny) * side >= 0
    pixels[y1:y2, x1:x2][inside] = color


def make_rotated_image(rng: random.Random, size: Tuple[int, int], *, max_objects: int = 4
                       ) -> Tuple[Image.Image, List[dict]]:
    """One (height, width) image of elongated rectangles and ellipses (aspect ROTATED_ASPECT) turned up to 45
    degrees either way, not overlapping, and its objects [{'bbox': [x, y, w, h, theta], 'corners': [4, 2],
    'category': name, 'color': (r, g, b)}] (the rotated-box convention of odtk.convert.bbox_corners).

    A pixel (i, j) covers [i, i + 1) x [j, j + 1): it is the shape's colour when its centre is inside the outline.
    """
    height, width = size
    short = min(height, width)
    pixels = np.array(_background(rng, width, height))
    objects, taken = [], []
    for _ in range(rng.randint(0 if rng.random() < 0.05 else 1, max_objects)):
        long = rng.uniform(max(12, short / 5), max(13, short / 2))
        w, h = long, long / rng.uniform(*ROTATED_ASPECT)
        if rng.random() < 0.5:      # the long side across as often as along: every direction within 90 degrees
            w, h = h, w
        theta = round(rng.uniform(-math.pi / 4, math.pi / 4), 4)
        half_x = (w * abs(math.cos(theta)) + h * abs(math.sin(theta))) / 2
        half_y = (w * abs(math.sin(theta)) + h * abs(math.cos(theta))) / 2
        cx, cy = rng.uniform(half_x, width - half_x), rng.uniform(half_y, height - half_y)
        enclosing = (cx - half_x, cy - half_y, cx + half_x, cy + half_y)
        if not _free(enclosing, taken):
            continue
        kind, color = rng.choice(ROTATED_CLASSES), _colour(rng)
        bbox = [round(cx - w / 2, 2), round(cy - h / 2, 2), round(w, 2), round(h, 2), theta]
        fill_convex(pixels, _shape_outline(kind, bbox), color)
        taken.append(enclosing)
        objects.append({"bbox": bbox, "corners": bbox_corners(bbox), "category": kind, "color": color})
    return Image.fromarray(pixels), objects


def _enclosing(corners: np.ndarray) -> List[float]:
    """COCO [x, y, w, h] of the axis-aligned box around [N, 2] points."""
    (x1, y1), (x2, y2) = corners.min(axis=0), corners.max(axis=0)
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def write_dataset(folder: str, *, train: int = 200, val: int = 50, size: int = 256, seed: int = 0,
                  max_objects: int = 4, vary: Optional[Tuple[int, int]] = None, rotated: bool = False
                  ) -> Tuple[str, str]:
    """Write folder/images/*.jpg, folder/train.json, folder/val.json; returns the two JSON paths. Images are
    `size` squares, or with `vary` (MIN, MAX) each its own height and width in that range (aspect up to
    MAX_ASPECT), for models that must handle varied sizes.

    `rotated`: make_rotated_image's objects as rotated COCO (bbox [x, y, w, h, theta], segmentation their 4
    corners), and beside each file the same images with the objects' enclosing boxes, {split}_aabb.json, to
    compare an axis-aligned model on them.
    """
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    classes = ROTATED_CLASSES if rotated else CLASSES
    for split, count in (("train", train), ("val", val)):
        # ids that are not 1..N on purpose: loaders must map them
        categories = [{"id": 10 * (i + 1), "name": n} for i, n in enumerate(classes)]
        coco = {"images": [], "annotations": [], "categories": categories}
        aabb = {"images": coco["images"], "annotations": [], "categories": categories}
        for i in range(count):
            shape = image_shape(rng, vary) if vary else (size, size)
            if rotated:
                im, objects = make_rotated_image(rng, shape, max_objects=max_objects)
            else:
                im, objects = make_image(rng, shape, max_objects=max_objects)
            name = f"{split}_{i:05d}.jpg"
            im.save(os.path.join(images_dir, name), quality=92)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": shape[1], "height": shape[0]})
            for o in objects:
                w, h = o["bbox"][2:4]
                a = {"id": len(coco["annotations"]) + 1, "image_id": image_id,
                     "category_id": 10 * (classes.index(o["category"]) + 1), "bbox": o["bbox"], "area": w * h,
                     "iscrowd": 0}
                if rotated:
                    box = _enclosing(o["corners"])
                    aabb["annotations"].append({**a, "bbox": box, "area": box[2] * box[3]})
                    a["segmentation"] = [o["corners"].ravel().tolist()]
                coco["annotations"].append(a)
        for name, data in {split: coco, f"{split}_aabb": aabb}.items() if rotated else {split: coco}.items():
            path = os.path.join(folder, f"{name}.json")
            atomic_write_text(json.dumps(data), path)
            log.info(f"wrote {path}: {count} images, {len(data['annotations'])} boxes")
    return os.path.join(folder, "train.json"), os.path.join(folder, "val.json")
