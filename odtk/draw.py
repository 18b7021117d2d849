"""Detections drawn on images, to see what a model found (`odtk infer --save-images`, `Detector.predict_video`).

    >>> from odtk.draw import draw_detections, save_jpeg
    >>> found = detector("photo.jpg")
    >>> save_jpeg(draw_detections(to_uint8("photo.jpg"), found, class_names=detector.class_names), "seen.jpg")

Each class has a fixed colour (PALETTE by class index), boxes and labels scale with the image, and ground truth is
drawn under the detections as thin white boxes labelled below their bottom-left corner. Rotated boxes (rows x1 y1 x2
y2 theta, odtk.rotated) are drawn as their 4-corner polygons, labelled at their top-most corner (ground truth: below
the bottom-most).
"""
import functools
import math
import os
import zlib
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from .rotated import corners
from .utils import OdtkError, atomic_path

if TYPE_CHECKING:      # draw is imported by detector: no import back at run time
    from .detector import Detections

RGB = Tuple[int, int, int]
Rect = Tuple[int, int, int, int]        # x0, y0, x1, y1, inclusive pixels
GroundTruth = Tuple[Tensor, Sequence[str]]   # boxes [N, 4] x1 y1 x2 y2 (or [N, 5] rotated) in pixels, their names

# distinct, saturated colours (no white or grey: those are the ground truth's); class index i gets PALETTE[i % 20]
PALETTE: Tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (255, 225, 25), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0),
    (250, 190, 212), (170, 255, 195), (220, 190, 255), (255, 215, 180), (0, 255, 127), (255, 99, 71))
GROUND_TRUTH_COLOR: RGB = (255, 255, 255)
LABEL_PAD = 1          # pixels between a label's text and the edge of its filled background


def class_color(index: int) -> RGB:
    """The fixed colour of class `index` (the model's class order), the same in every image and run."""
    return PALETTE[index % len(PALETTE)]


def name_color(name: str, class_names: Sequence[str]) -> RGB:
    """The colour of a class by name: its index in `class_names`, else a stable hash of the name."""
    index = class_names.index(name) if name in class_names else zlib.crc32(name.encode())
    return class_color(index)


def line_width(height: int, width: int) -> int:
    """Box outline width in pixels: 2 up to 750-pixel images, then 1 more per 300 pixels of the shorter side."""
    return max(2, round(min(height, width) / 300))


def font_size(height: int, width: int) -> int:
    """Label text size: about 1.5% of the shorter side, at least 10 pixels (readable on small images)."""
    return max(10, round(min(height, width) * 0.015))


@functools.lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (no font file needed). torchvision's draw_bounding_boxes ignores
    font_size without a font file, so odtk draws its labels with this font itself."""
    try:
        return ImageFont.load_default(size)       # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):     # older Pillow or no FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def pixel_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """x1 y1 x2 y2 boxes -> whole pixels inside the image, so every outline is visible (a box clipped at the
    image's width would have its right edge drawn off the image)."""
    b = boxes.float().floor().long()
    x1, x2 = b[:, 0].clamp(0, width - 1), b[:, 2].clamp(0, width - 1)
    y1, y2 = b[:, 1].clamp(0, height - 1), b[:, 3].clamp(0, height - 1)
    return torch.stack([x1, y1, torch.maximum(x1, x2), torch.maximum(y1, y2)], 1)


def label_rect(box: Sequence[int], text: str, font: ImageFont.ImageFont, height: int, width: int, *,
               below: bool = False) -> Rect:
    """Where a label's filled background goes: above the box's top-left corner (ground truth: below its
    bottom-left), moved inside the box where the image ends, and left so it stays on the image."""
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD
    x0 = max(0, min(box[0], width - w))
    if below:
        y0 = box[3] + 1 if box[3] + h < height else box[3] - h
    else:
        y0 = box[1] - h if box[1] - h >= 0 else box[1]
    y0 = max(0, y0)
    return x0, y0, x0 + w - 1, y0 + h - 1


def text_color(background: RGB) -> RGB:
    """Black text on light backgrounds, white on dark ones."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _from_pil(pil: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def _draw_labels(image: Tensor, labels: List[Tuple[Rect, str, RGB]], font: ImageFont.ImageFont) -> Tensor:
    """Filled label backgrounds with their text, in order (later ones on top)."""
    pil = _to_pil(image)
    draw = ImageDraw.Draw(pil)
    for rect, text, color in labels:
        draw.rectangle(rect, fill=color)
        left, top, _, _ = font.getbbox(text)    # the ink's offset from the text origin
        draw.text((rect[0] + LABEL_PAD - left, rect[1] + LABEL_PAD - top), text, fill=text_color(color), font=font)
    return _from_pil(pil)


def corner_anchor(points: Sequence[Sequence[float]], height: int, width: int, *, below: bool = False) -> Rect:
    """Where label_rect puts a rotated box's label: a one-pixel box at the top-most of its corners [4, 2] (`below`:
    the bottom-most; the left one of a tie, so an unrotated box's is its top-left or bottom-left corner), in whole
    pixels inside the image."""
    x, y = min(points, key=lambda p: (-p[1] if below else p[1], p[0]))
    x, y = min(max(math.floor(x), 0), width - 1), min(max(math.floor(y), 0), height - 1)
    return x, y, x, y


def draw_outlines(image: Tensor, boxes: Tensor, colors: Sequence[RGB], width: int, *, below: bool = False
                  ) -> Tuple[Tensor, List[Rect]]:
    """Outlines of `width` pixels inside boxes [N, 4] (pixel_boxes, torchvision) or along the inside of rotated
    boxes' [N, 5] corner polygons (Pillow), in `colors` -> the drawn copy and each box's label anchor for
    label_rect (its pixel box; rotated: corner_anchor's, `below` for the ground truth)."""
    height, image_width = image.shape[1:]
    if boxes.shape[1] == 4:
        pixels = pixel_boxes(boxes, height, image_width)
        return draw_bounding_boxes(image, pixels, colors=list(colors), width=width), pixels.tolist()
    points = corners(boxes.double()).tolist()
    pil = _to_pil(image)
    draw = ImageDraw.Draw(pil)
    for polygon, color in zip(points, colors):
        draw.polygon([tuple(p) for p in polygon], outline=color, width=width)
    return _from_pil(pil), [corner_anchor(p, height, image_width, below=below) for p in points]


def draw_detections(image: Tensor, detections: "Detections", *, class_names: Sequence[str], threshold: float = 0.3,
                    ground_truth: Optional[GroundTruth] = None) -> Tensor:
    """A copy of `image` (uint8 [3, H, W]) with the detections of score >= `threshold` drawn: an outline of
    `line_width` pixels inside each box in its class's colour (`class_names`: the model's classes, whose order
    fixes the colours) and a label "name 0.87" above it. `ground_truth` (boxes, names) is drawn first, under
    the detections, as thin white outlines (half the width) labelled below their bottom-left corner, so misses
    (a white box alone) and false alarms (a coloured box alone) stand out. Highest scores are drawn last (on top).
    Rotated boxes ([N, 5], detections or ground truth) are their corner polygons, labelled above the top-most
    corner (ground truth: below the bottom-most)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise OdtkError(f"draw_detections: image of shape {tuple(image.shape)} and dtype {image.dtype}: "
                        f"expected uint8 3 x H x W (odtk.detector.to_uint8 makes one)")
    height, width = image.shape[1:]
    lw, font = line_width(height, width), load_font(font_size(height, width))
    labels: List[Tuple[Rect, str, RGB]] = []
    if ground_truth is not None and len(ground_truth[0]):
        boxes, names = ground_truth
        image, anchors = draw_outlines(image, boxes, [GROUND_TRUTH_COLOR] * len(boxes), max(1, lw // 2),
                                       below=True)
        labels += [(label_rect(anchor, name, font, height, width, below=True), name, GROUND_TRUTH_COLOR)
                   for anchor, name in zip(anchors, names)]
    keep = (detections.scores >= threshold).nonzero()[:, 0].flip(0)     # lowest score first: the best on top
    if len(keep):
        names = [detections.names[i] for i in keep.tolist()]
        colors = [name_color(name, class_names) for name in names]
        image, anchors = draw_outlines(image, detections.boxes[keep], colors, lw)
        texts = [f"{name} {detections.scores[i]:.2f}" for name, i in zip(names, keep.tolist())]
        labels += [(label_rect(anchor, text, font, height, width), text, color)
                   for anchor, text, color in zip(anchors, texts, colors)]
    return _draw_labels(image, labels, font) if labels else image.clone()


def drawn_name(name: Optional[str], index: int) -> str:
    """The file name of a drawn image: the input's own name (a JPEG name as is, any other gets .jpg added:
    a.png -> a.png.jpg, so a.png and a.jpg never collide), or a number for an input that is not a file."""
    if name is None:
        return f"{index:06d}.jpg"
    name = os.path.normpath(name)
    if os.path.isabs(name) or name.startswith(os.pardir):     # never outside the output folder
        name = os.path.basename(name)
    return name if name.lower().endswith((".jpg", ".jpeg")) else name + ".jpg"


def save_jpeg(image: Tensor, path: str, *, quality: int = 90) -> None:
    """uint8 [3, H, W] -> a JPEG file, written atomically (parent folders created)."""
    with atomic_path(path, ".jpg") as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="JPEG", quality=quality)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file: a drawn image must never replace its input."""
    return os.path.realpath(a) == os.path.realpath(b)
