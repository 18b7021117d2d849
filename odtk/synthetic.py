"""A small synthetic COCO dataset made by the project itself: coloured shapes on textured noise."""
import json
import os
import random
from typing import List, Optional, Tuple, Union

from PIL import Image, ImageDraw, ImageFilter

from .utils import atomic_write_text, log

CLASSES = ["square", "circle", "triangle"]
MAX_ASPECT = 1.5   # varied sizes: the longer side at most this times the shorter, as most photos


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
        if any(x < bx2 + 2 and bx1 < x + w + 2 and y < by2 + 2 and by1 < y + h + 2 for bx1, by1, bx2, by2 in taken):
            continue
        kind = rng.choice(CLASSES)
        color = tuple(rng.choice((rng.randint(0, 50), rng.randint(205, 255))) for _ in range(3))
        _draw(draw, kind, (x, y, x + w - 1, y + h - 1), color)
        taken.append((x, y, x + w, y + h))
        objects.append({"bbox": [x, y, w, h], "category": kind})
    return im, objects


def write_dataset(folder: str, *, train: int = 200, val: int = 50, size: int = 256, seed: int = 0,
                  max_objects: int = 4, vary: Optional[Tuple[int, int]] = None) -> Tuple[str, str]:
    """Write folder/images/*.jpg, folder/train.json, folder/val.json; returns the two JSON paths. Images are
    `size` squares, or with `vary` (MIN, MAX) each its own height and width in that range (aspect up to
    MAX_ASPECT), for models that must handle varied sizes."""
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    paths = []
    for split, count in (("train", train), ("val", val)):
        coco = {"images": [], "annotations": [],
                # ids that are not 1..N on purpose: loaders must map them
                "categories": [{"id": 10 * (i + 1), "name": n} for i, n in enumerate(CLASSES)]}
        for i in range(count):
            shape = image_shape(rng, vary) if vary else (size, size)
            im, objects = make_image(rng, shape, max_objects=max_objects)
            name = f"{split}_{i:05d}.jpg"
            im.save(os.path.join(images_dir, name), quality=92)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": shape[1], "height": shape[0]})
            for o in objects:
                x, y, w, h = o["bbox"]
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": 10 * (CLASSES.index(o["category"]) + 1),
                                            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        path = os.path.join(folder, f"{split}.json")
        atomic_write_text(json.dumps(coco), path)
        paths.append(path)
        log.info(f"wrote {path}: {count} images, {len(coco['annotations'])} boxes")
    return paths[0], paths[1]
