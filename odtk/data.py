"""COCO datasets and loaders: resize, augment, normalise, pad to the stride, batch ragged boxes."""
import json
import math
import os
import random
import signal
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.ops import box_iou
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .constants import (CROP_ASPECT, CROP_ATTEMPTS, CROP_SCALING, CROP_THRESHOLDS, IMAGE_EXTENSIONS,
                        IMAGENET_MEAN, IMAGENET_STD)
from .convert import displayed_size, fold_angle, read_size
from .rotated import crop_reference
from .utils import OdtkError, log, padded

Batch = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@runtime_checkable
class Loader(Protocol):
    """What training and inference use of a loader, make_loader's or odtk.dali's.

    Iterating runs one epoch: batches (images [B, 3, H, W], boxes [B, M, 4] (a rotated dataset's [B, M, 5]: x1, y1,
    x2, y2, theta), labels [B, M] with -1 padding, image ids [B], resize ratios [B]), or None for a batch whose
    images were all unreadable. `start(epoch, batch)` positions the next epoch (its shuffle, the batch to resume
    at); `batches` counts the batches of a whole epoch.
    """

    @property
    def batches(self) -> int: ...

    def start(self, epoch: int, batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Optional[Batch]]: ...


@dataclass
class Augment:
    """Training-time augmentation (ODTK's flags); all off for inference."""
    flip: bool = True
    rotate: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop: bool = False      # SSD-style random crop keeping boxes, before the resize (random_crop_window)


def load_image(path: str) -> Tensor:
    """uint8 RGB [3, H, W] as displayed (EXIF orientation applied); grayscale, RGBA and palettes converted.

    torchvision's libjpeg-turbo/libpng decoders (JPEG in half PIL's time); PIL for the formats they lack.
    """
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:              # BMP, TIFF, ... (or a corrupt file, which PIL then reports too)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file as displayed (EXIF orientation applied, as load_image does), from its
    header alone."""
    width, height = displayed_size(*read_size(path))
    return height, width


def find_images(folder: str) -> List[str]:
    """Names of the image files in `folder`, sorted."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def resize_image(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing (PIL's BILINEAR within one grey level) of a uint8 [3, H, W] image.

    uint8 channels-last input takes PyTorch's vectorised kernel: 4x faster than PIL's resize.
    """
    if tuple(x.shape[1:]) == tuple(size):
        return x
    x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_ratio(width, height, resize, max_size):
    """Scale taking the shorter side to `resize`, capped so the longer side is at most `max_size`: for numbers, or
    elementwise for tensors (recipe.step_size sizes many random batches at once)."""
    if isinstance(width, Tensor):
        short, long = torch.minimum(width, height), torch.maximum(width, height)
        ratio = resize / short
        return torch.where(ratio * long > max_size, max_size / long, ratio)
    ratio = resize / min(width, height)
    if ratio * max(width, height) > max_size:
        ratio = max_size / max(width, height)
    return ratio


def scaled_size(height: int, width: int, *, resize: int, max_size: int, fit: Optional[Tuple[int, int]] = None
                ) -> Tuple[Tuple[int, int], float]:
    """The resized (height, width) of an image and its scale: shorter side to `resize` capped by `max_size`, or,
    for a fixed-size model, the largest size that fits inside `fit` (height, width)."""
    if fit:
        ratio = min(fit[0] / height, fit[1] / width)
    else:
        ratio = resize_ratio(width, height, resize, max_size)
    size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    if fit:
        size = (min(size[0], fit[0]), min(size[1], fit[1]))
    return size, ratio


def normalize_image(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [3, H, W] -> float, 0-1, normalised with the model's mean and std."""
    return TF.normalize(x.float().div_(255), list(mean), list(std), inplace=True)


def random_crop_window(width: int, height: int, boxes: Tensor, rng) -> Optional[Tuple[int, int, int, int]]:
    """An SSD-style crop (x1, y1, x2, y2) in whole pixels, or None to keep the whole image.

    DALI's fn.random_bbox_crop rule (all_boxes_above_threshold=False), so both loaders crop alike: draw "no crop"
    or a minimum IoU from CROP_THRESHOLDS; try CROP_ATTEMPTS windows with sides U(0.3, 1) of the image's and an
    aspect ratio in [0.5, 2]; a window is valid when some box has IoU >= the threshold with it and some box
    centre lies inside it (an image without boxes takes any window). After CROP_ATTEMPTS failures draw again:
    "no crop" is one of the draws, so the loop ends.
    """
    while True:
        threshold = rng.choice((None, *CROP_THRESHOLDS))
        if threshold is None:
            return None
        for _ in range(CROP_ATTEMPTS):
            w, h = rng.uniform(*CROP_SCALING) * width, rng.uniform(*CROP_SCALING) * height
            if not CROP_ASPECT[0] <= w / h <= CROP_ASPECT[1]:
                continue
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            x1, y1 = min(round(x), width - 1), min(round(y), height - 1)
            window = (x1, y1, max(x1 + 1, round(x + w)), max(y1 + 1, round(y + h)))   # >= 1 pixel
            if not len(boxes) or _valid_crop(boxes, window, threshold):
                return window


def _valid_crop(boxes: Tensor, window: Tuple[int, int, int, int], threshold: float) -> bool:
    """Some box has IoU >= threshold with the window and some box centre is inside it (the crop keeps a box)."""
    iou = box_iou(boxes[:, :4], torch.tensor([window], dtype=boxes.dtype))[:, 0]
    return bool((iou >= threshold).any()) and bool(_centres_inside(boxes, window).any())


def _centres_inside(boxes: Tensor, window: Tuple[int, int, int, int]) -> Tensor:
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= window[0]) & (cx <= window[2]) & (cy >= window[1]) & (cy <= window[3])


def crop_boxes(boxes: Tensor, labels: Tensor, window: Tuple[int, int, int, int]) -> Tuple[Tensor, Tensor]:
    """Boxes whose centre lies in the window, in its coordinates, clipped to it (zero-area ones dropped); rotated
    boxes unclipped, as clipping would change their shape."""
    x1, y1, x2, y2 = window
    keep = _centres_inside(boxes, window)
    boxes, labels = shift_boxes(boxes[keep], -x1, -y1), labels[keep]
    if boxes.shape[1] == 5:
        return boxes, labels
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([x2 - x1, y2 - y1] * 2, dtype=boxes.dtype))
    area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[area], labels[area]


def shift_boxes(boxes: Tensor, dx: float, dy: float) -> Tensor:
    """Boxes (x1, y1, x2, y2[, theta]) moved by (dx, dy); theta unchanged."""
    return boxes + torch.tensor([dx, dy, dx, dy, 0][:boxes.shape[1]], dtype=boxes.dtype)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """Boxes of an image resized by (sx, sy): corners scaled; a rotated box's unrotated box scaled and theta kept
    (exact when sx == sy, as the loaders' resize keeps the aspect ratio to the rounding of a pixel)."""
    return boxes * torch.tensor([sx, sy, sx, sy, 1][:boxes.shape[1]], dtype=boxes.dtype)


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes of an image of `width` mirrored left to right; a rotated box's theta changes sign (the mirror image
    turns the other way)."""
    mirrored = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return torch.cat([mirrored, -boxes[:, 4:]], dim=1)


def turn_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes of an image of `width` turned a quarter counter-clockwise (Tensor.rot90(1, (1, 2)) of [3, H, W]): a
    point (x, y) goes to (y, width - x). A rotated box's centre moves so, its width and height swap and theta
    stays: a quarter turn added to theta is the same rectangle with the sides swapped. Both come out as the
    unrotated box (y1, width - x2, y2, width - x1)."""
    turned = torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)
    return torch.cat([turned, boxes[:, 4:]], dim=1)


def read_coco(path: str) -> dict:
    if not os.path.isfile(path):
        raise OdtkError(f"{path}: annotations file not found")
    try:
        with open(path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdtkError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(coco, dict) or "images" not in coco:
        raise OdtkError(f"{path}: not a COCO annotations file (no 'images' list)")
    coco.setdefault("annotations", [])
    coco.setdefault("categories", [])
    return coco


def _no_categories(path: str, coco: dict) -> str:
    """Why a COCO file without 'categories' cannot define a model's classes, and the fix."""
    ids = sorted({a["category_id"] for a in coco["annotations"]
                  if isinstance(a, dict) and isinstance(a.get("category_id"), int)})
    used = f" (its annotations use category_id {', '.join(map(str, ids[:10]))}{', ...' if len(ids) > 10 else ''})"
    return (f"{path}: no 'categories', so no classes to train; add one entry per class, e.g. "
            f"\"categories\": [{{\"id\": 1, \"name\": \"cat\"}}]" + (used if ids else ""))


MALFORMED = "malformed (needs image_id, category_id and a finite bbox [x, y, width, height])"
MALFORMED_ROTATED = ("malformed (needs image_id, category_id and a finite bbox [x, y, width, height, theta] or "
                     "[x, y, width, height])")
ROTATED_IN_AXIS_ALIGNED = ("rotated (a 5-value bbox [x, y, width, height, theta]; this dataset reads axis-aligned "
                           "boxes: --rotated-bbox reads rotated ones)")
# why an annotation is dropped -> the field the warning quotes from the first such annotation
DROPPED = {
    MALFORMED: None,
    MALFORMED_ROTATED: None,
    ROTATED_IN_AXIS_ALIGNED: "bbox",
    "image_id not in 'images'": None,
    "category_id not in 'categories'": "category_id",
    "crowd (iscrowd)": None,
    "invalid (negative size)": "bbox",
    "zero-area": "bbox",
    "outside the image": "bbox",
}


def annotation_box(a: dict, sizes: Dict[int, Tuple[Optional[int], Optional[int]]], categories: set, *,
                   rotated: bool = False) -> Tuple[Optional[Tuple[float, ...]], Optional[str]]:
    """(x1, y1, x2, y2) clipped to the image when `sizes` has its size, or (None, why it is unusable: a DROPPED key).

    `rotated`: (x1, y1, x2, y2, theta) of a bbox [x, y, w, h, theta] (theta 0 for [x, y, w, h]), theta as given,
    dropped when its centre is not inside the image (clipping would change its shape) instead of clipped.
    """
    malformed = MALFORMED_ROTATED if rotated else MALFORMED
    try:
        values = [float(v) for v in a["bbox"]]
        known_image, known_category = a["image_id"] in sizes, a["category_id"] in categories
    except (KeyError, TypeError, ValueError):     # a missing key, a list as an id
        return None, malformed
    if len(values) == 5 and not rotated:
        return None, ROTATED_IN_AXIS_ALIGNED
    if len(values) not in (4, 5) or not all(map(math.isfinite, values)):
        return None, malformed
    x, y, w, h, theta = (*values, 0.0)[:5]
    if not known_image:
        return None, "image_id not in 'images'"
    if not known_category:
        return None, "category_id not in 'categories'"
    if a.get("iscrowd", 0):
        return None, "crowd (iscrowd)"
    if w < 0 or h < 0:
        return None, "invalid (negative size)"
    if w == 0 or h == 0:
        return None, "zero-area"
    x1, y1, x2, y2 = x, y, x + w, y + h
    width, height = sizes[a["image_id"]]
    if rotated:
        if width and height and not (0 < x + w / 2 < width and 0 < y + h / 2 < height):
            return None, "outside the image"
        return (x1, y1, x2, y2, theta), None
    if width and height:
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if x2 <= x1 or y2 <= y1:
            return None, "outside the image"
    return (x1, y1, x2, y2), None


ANGLE_SLACK = 1e-6    # radians past pi/4 that folding fixes without a warning (float32 round trips)


def fold_box(box: Tuple[float, ...]) -> Tuple[float, ...]:
    """A rotated box (x1, y1, x2, y2, theta) with theta folded into [-pi/4, pi/4] (convert.fold_angle): the same
    rectangle about the same centre."""
    x1, y1, x2, y2, theta = box
    w, h, theta = fold_angle(x2 - x1, y2 - y1, theta)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta


def _describe(a, field: Optional[str]) -> str:
    """The annotation a warning points at: its id, its image and the field at fault (if any)."""
    if not isinstance(a, dict):
        return repr(a)[:80]
    parts = [f"annotation {a.get('id', '?')}", f"image_id {a.get('image_id', '?')}"]
    if field:
        parts.append(f"{field} {a.get(field)}")
    return ", ".join(parts)


# images a loader process found unreadable: said once, skipped every epoch
_UNREADABLE: set = set()


class CocoDataset(Dataset):
    """Images of a COCO file (or of a folder, with no annotations) -> normalised tensors and boxes.

    Class indices follow `category_ids` (the model's), else the file's category ids in sorted order: a file with
    no 'categories' is then an error, not classes guessed from its annotations (whose names it would lack).
    Annotations that cannot be used are dropped with one warning per reason (DROPPED) naming the first one.
    A file without a single usable box is an error with `require_boxes` (training), else a warning.
    `check_files` off skips the check that every image file exists (reports that read only the annotations).

    `rotated`: boxes are rows (x1, y1, x2, y2, theta), the unrotated box's corners and its turn about the centre,
    from bbox [x, y, w, h, theta] (ODTK's rotated COCO; [x, y, w, h] is theta 0). theta is in radians, in
    [-pi/4, pi/4] (others folded in: see fold_box), its sign as ODTK's rotate_boxes applies it: an offset (dx, dy)
    from the centre goes to (dx cos + dy sin, -dx sin + dy cos), y pointing down, so a positive theta turns the
    box counter-clockwise as displayed: [51, 43, 20, 10, 0.6435] (sin 0.6, cos 0.8) has corners (50, 50),
    (66, 38), (72, 46), (56, 58). A box whose centre is outside the image is dropped, not clipped.
    """

    def __init__(self, images: str, annotations: Optional[str] = None, *, resize: int = 800,
                 max_size: int = 1333, jitter: Optional[Tuple[int, int]] = None, augment: Optional[Augment] = None,
                 category_ids: Optional[Sequence[int]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, fit: Optional[Tuple[int, int]] = None,
                 require_boxes: bool = False, check_files: bool = True, rotated: bool = False):
        self.root = images
        self.rotated = rotated
        self.box_columns = 5 if rotated else 4
        self.resize, self.max_size, self.jitter = resize, max_size, jitter
        self.fit = fit      # (height, width) of a fixed-size model: scale the image to fit inside it
        self.augment = augment or Augment(flip=False)
        self.mean, self.std = list(mean), list(std)
        self.boxes: Dict[int, Tensor] = {}
        self.labels: Dict[int, Tensor] = {}
        self.sizes: Dict[int, Tuple[int, int]] = {}   # (height, width) where the annotations give both
        self.rotated_annotations: Optional[bool] = None   # whether the file's boxes are rotated (None: no boxes)
        if annotations:
            coco = read_coco(annotations)
            self.coco_path = annotations
            cats = sorted(c["id"] for c in coco["categories"])
            if category_ids is None and not cats:
                raise OdtkError(_no_categories(annotations, coco))
            self.category_ids = list(category_ids) if category_ids is not None else cats
            self.class_names = {c["id"]: c.get("name", str(c["id"])) for c in coco["categories"]}
            unknown = sorted(set(cats) - set(self.category_ids))
            if unknown:
                raise OdtkError(f"{annotations}: categories {unknown} are not among the model's classes "
                                f"{self.category_ids} (train a new model, or --fine-tune from this one)")
            self.ids = [im["id"] for im in coco["images"]]
            self.files = {im["id"]: im["file_name"] for im in coco["images"]}
            self.sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]
                          if isinstance(im.get("width"), int) and isinstance(im.get("height"), int)
                          and im["width"] > 0 and im["height"] > 0}
            self._index_boxes(coco, annotations, require_boxes)
        else:
            if not os.path.isdir(images):
                raise OdtkError(f"{images}: images folder not found")
            if require_boxes:
                raise OdtkError(f"{images}: no annotations to train on (give a COCO file with --annotations)")
            names = find_images(images)
            if not names:
                raise OdtkError(f"{images}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
            self.coco_path = None
            self.category_ids = list(category_ids) if category_ids is not None else []
            self.class_names = {}
            self.ids = list(range(1, len(names) + 1))
            self.files = dict(zip(self.ids, names))
        missing = [f for f in self.files.values() if check_files and not os.path.isfile(os.path.join(images, f))]
        if missing:
            raise OdtkError(f"{os.path.join(images, missing[0])}: image file not found"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def _index_boxes(self, coco: dict, path: str, require_boxes: bool) -> None:
        index = {c: i for i, c in enumerate(self.category_ids)}
        sizes = {im["id"]: (im.get("width"), im.get("height")) for im in coco["images"]}
        categories = {c["id"] for c in coco["categories"]}
        per_image: Dict[int, list] = {i: [] for i in self.ids}
        dropped: Dict[str, Tuple[int, dict]] = {}      # why -> (count, first annotation)
        folded: List[dict] = []
        bboxes = [a.get("bbox") for a in coco["annotations"] if isinstance(a, dict)]
        self.rotated_annotations = any(isinstance(b, list) and len(b) == 5 for b in bboxes) if bboxes else None
        for a in coco["annotations"]:
            box, why = annotation_box(a, sizes, categories, rotated=self.rotated)
            if why:
                n, first = dropped.get(why, (0, a))
                dropped[why] = (n + 1, first)
                continue
            if self.rotated:
                if abs(box[4]) > math.pi / 4 + ANGLE_SLACK:
                    folded.append(a)
                box = fold_box(box)
            per_image[a["image_id"]].append((*box, index[a["category_id"]]))
        for i, rows in per_image.items():
            t = torch.tensor(rows, dtype=torch.float32).reshape(-1, self.box_columns + 1)
            self.boxes[i], self.labels[i] = t[:, :-1], t[:, -1].long()
        for why, (n, first) in dropped.items():
            log.warning(f"{path}: dropped {n} box{'es' if n > 1 else ''}: {why}; "
                        f"first: {_describe(first, DROPPED[why])}")
        if folded:
            log.warning(f"{path}: {len(folded)} rotated box{'es' if len(folded) > 1 else ''} with theta outside "
                        f"[-pi/4, pi/4] folded in (theta shifted by quarter turns, width and height swapped for an "
                        f"odd number: the same rectangle); first: {_describe(folded[0], 'bbox')}")
        if not any(len(rows) for rows in per_image.values()):
            detail = (f"all {len(coco['annotations'])} annotations were dropped (see above)" if coco["annotations"]
                      else "it has no 'annotations'")
            if require_boxes:
                bbox = "[x, y, width, height, theta]" if self.rotated else "[x, y, width, height]"
                raise OdtkError(f"{path}: no boxes to train on ({detail}); each object needs an annotation with "
                                f"image_id, category_id and bbox {bbox}")
            log.warning(f"{path}: not a single box in any image ({detail})")

    def __len__(self) -> int:
        return len(self.ids)

    def original_size(self, image_id: int) -> Tuple[int, int]:
        """(height, width) of an image before the resize: the annotations' width and height, else its file's
        header."""
        if image_id in self.sizes:
            return self.sizes[image_id]
        path = os.path.join(self.root, self.files[image_id])
        if not os.path.isfile(path):
            raise OdtkError(f"{self.coco_path or self.root}: image {image_id} ({self.files[image_id]}) has no "
                            f"width/height and {path} is not there to read them from (give --images)")
        return image_size(path)

    def __getitem__(self, index):
        """`index`, or (index, seed) from TrainSampler: the sample's augmentation then depends only on the seed,
        not on the process or worker that loads it (DDP parity, exact resume)."""
        index, rng = (index[0], random.Random(index[1])) if isinstance(index, tuple) else (index, random)
        image_id = self.ids[index]
        path = os.path.join(self.root, self.files[image_id])
        try:
            x = load_image(path)
        except Exception as e:   # a corrupt file mid-run: skip it, say which (once: it recurs every epoch)
            if path not in _UNREADABLE:
                _UNREADABLE.add(path)
                log.warning(f"{path}: cannot read image ({e.__class__.__name__}: {e}); skipped")
            return None
        boxes = self.boxes.get(image_id, torch.zeros(0, self.box_columns)).clone()
        labels = self.labels.get(image_id, torch.zeros(0, dtype=torch.long))
        if self.augment.crop:   # before the resize, so --jitter and --max-size size the crop
            window = random_crop_window(x.shape[2], x.shape[1], crop_reference(boxes, x.shape[2], x.shape[1]), rng)
            if window is not None:
                x = x[:, window[1]:window[3], window[0]:window[2]]
                boxes, labels = crop_boxes(boxes, labels, window)
        height, width = x.shape[1:]
        resize = rng.randint(*self.jitter) if self.jitter and not self.fit else self.resize
        size, ratio = scaled_size(height, width, resize=resize, max_size=self.max_size, fit=self.fit)
        # rounding makes x and y scales differ slightly from ratio: scale boxes by the real ones
        boxes = scale_boxes(boxes, size[1] / width, size[0] / height)
        x, boxes = self._augment(resize_image(x, size), boxes, rng)
        return x, boxes, labels, image_id, ratio

    def _augment(self, x: Tensor, boxes: Tensor, rng) -> Tuple[Tensor, Tensor]:
        """Geometry on the uint8 image, colour on [0, 1] floats; returns the normalised float image."""
        aug = self.augment
        if aug.rotate and rng.random() < 0.5:
            k = rng.choice((1, 2, 3))                  # quarter turns counter-clockwise
            for _ in range(k):
                boxes = turn_boxes(boxes, x.shape[2])
                x = x.rot90(1, (1, 2))
        if aug.flip and rng.random() < 0.5:
            x = x.flip(2)
            boxes = flip_boxes(boxes, x.shape[2])
        x = x.float().div_(255)
        if aug.brightness:
            x = TF.adjust_brightness(x, rng.uniform(1 - aug.brightness, 1 + aug.brightness))
        if aug.contrast:
            x = TF.adjust_contrast(x, rng.uniform(1 - aug.contrast, 1 + aug.contrast))
        if aug.saturation:
            x = TF.adjust_saturation(x, rng.uniform(1 - aug.saturation, 1 + aug.saturation))
        if aug.hue:
            hue = rng.uniform(-aug.hue, aug.hue)
            # torchvision's PIL path (odtk's before) shifted hue in whole uint8 steps, so |hue| < 1/255 (the
            # default 0.0002) changed nothing; skipping it also skips a costly RGB -> HSV -> RGB round trip
            if abs(hue) >= 1 / 255:
                x = TF.adjust_hue(x, hue)
        return TF.normalize(x, self.mean, self.std, inplace=True), boxes


def collate(samples: list, size_divisible: int = 32, pad_to: Optional[Tuple[int, int]] = None):
    """Pad images to a common size divisible by the stride (or to `pad_to`); pad boxes (4 or, rotated, 5 columns)
    with label -1."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    h = max(s[0].shape[1] for s in samples)
    w = max(s[0].shape[2] for s in samples)
    h, w = pad_to or (padded(v, size_divisible) for v in (h, w))
    shape = (len(samples), 3, h, w)
    if get_worker_info() is not None:
        # in a DataLoader worker the batch goes to the main process through shared memory: build it there
        # (as torch's default_collate does), saving a copy and a round of page faults per batch
        storage = samples[0][0]._typed_storage()._new_shared(math.prod(shape))
        images = samples[0][0].new(storage).view(shape).zero_()
    else:
        images = samples[0][0].new_zeros(shape)
    m = max(1, max(s[1].shape[0] for s in samples))
    boxes = torch.zeros(len(samples), m, samples[0][1].shape[1])
    labels = torch.full((len(samples), m), -1, dtype=torch.long)
    for i, (x, b, l, _, _) in enumerate(samples):
        images[i, :, :x.shape[1], :x.shape[2]] = x
        boxes[i, :b.shape[0]] = b
        labels[i, :l.shape[0]] = l
    ids = torch.tensor([s[3] for s in samples])
    ratios = torch.tensor([s[4] for s in samples], dtype=torch.float64)
    return images, boxes, labels, ids, ratios


class _Collate:
    # a picklable callable: DataLoader workers may be spawned processes
    def __init__(self, size_divisible: int, pad_to: Optional[Tuple[int, int]]):
        self.size_divisible, self.pad_to = size_divisible, pad_to

    def __call__(self, samples):
        return collate(samples, self.size_divisible, self.pad_to)


class TrainSampler(Sampler):
    """Epoch-seeded shuffle split into global batches; each rank takes its slice of every global batch.

    Yields (index, sample seed). One process with batch B and N processes with B/N each see the same images in
    the same steps, and `start(epoch, batch)` resumes mid-epoch without loading the skipped images.
    """

    def __init__(self, size: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.batches = size // self.global_batch     # full global batches per epoch (the rest wait a reshuffle)
        self.epoch, self.first = 0, 0

    def start(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.first = epoch, batch

    def __len__(self) -> int:
        return (self.batches - self.first) * self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for b in range(self.first, self.batches):
            start = b * self.global_batch + self.rank * self.batch_size
            for index in order[start:start + self.batch_size]:
                yield index, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index


class ShardSampler(Sampler):
    """Every `world_size`-th image from `rank`: each image exactly once over all ranks (evaluation)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def _ignore_sigint(_worker: int) -> None:
    # Ctrl-C reaches the whole process group: loader processes must not die while training finishes its step and
    # saves. (SIGTERM keeps its default: multiprocessing stops these processes with it at exit.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_factory(with_dali: bool) -> Callable[..., Loader]:
    """make_loader, or for --with-dali odtk.dali.make_dali_loader: the same arguments, the same batches."""
    if with_dali:
        from .dali import make_dali_loader
        return make_dali_loader
    return make_loader


class TorchLoader(DataLoader):
    """make_loader's DataLoader, a Loader: `start` and `batches` are its TrainSampler's when training; inference
    reads its shard once, in order, from the start. (`loader.sampler.start` still works, as before.)"""

    @property
    def batches(self) -> int:
        """Batches in a whole epoch (training: full global batches, however many start() skips)."""
        return self.sampler.batches if isinstance(self.sampler, TrainSampler) else len(self)

    def start(self, epoch: int, batch: int = 0) -> None:
        """Training: the shuffle of `epoch` and the batch to resume it at. Inference has one order: nothing to do."""
        if isinstance(self.sampler, TrainSampler):
            self.sampler.start(epoch, batch)


def make_loader(dataset: CocoDataset, *, batch_size: int, training: bool, workers: int = 2,
                size_divisible: int = 32, rank: int = 0, world_size: int = 1, seed: int = 0,
                device: Optional[torch.device] = None) -> TorchLoader:
    """Training: `batch_size` per process from TrainSampler (call `loader.start(epoch, batch)` before each epoch).
    Inference: this rank's shard in order. `device`: where the batches go (pinned memory for a GPU; default: a GPU
    when present); the batches themselves stay on the CPU."""
    if training:
        sampler = TrainSampler(len(dataset), batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
        if not sampler.batches:
            raise OdtkError(f"{getattr(dataset, 'coco_path', None) or dataset.root}: {len(dataset)} images, fewer "
                            f"than one batch of {sampler.global_batch}")
    else:
        sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
    return TorchLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       collate_fn=_Collate(size_divisible, dataset.fit), drop_last=training,
                       worker_init_fn=_ignore_sigint if workers else None, persistent_workers=training and workers > 0,
                       pin_memory=torch.device(device).type == "cuda" if device else torch.cuda.is_available())
