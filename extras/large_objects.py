"""A small real data set with large objects, cut from BCCD: one crop per image around its white blood cell(s).

Issue 17's failure (box regression that never learns on CPU) was seen on a single-class set of a few hundred
photos whose objects cover 10-90% of the image side; BCCD's cells cover 5-40%. Cropping around each WBC so that
it fills 30-90% of the crop's longer side gives the same regime from data that is here. RBCs and platelets are
left unlabelled (single class). Crops are JPEG-encoded again at quality 95.

Usage: python extras/large_objects.py BCCD_DIR OUT --train 132 --test 32 [--seed 0]
(BCCD_DIR holds JPEGImages/ and Annotations/; writes OUT/images/, OUT/train.json, OUT/test.json)
"""
import argparse
import json
import os
import random
import sys
import xml.etree.ElementTree as ET

from PIL import Image


def wbc_boxes(xml_path):
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name", "").strip() != "WBC":
            continue
        b = obj.find("bndbox")
        boxes.append([float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return boxes


def crop_window(box, width, height, rng):
    """A crop [x1, y1, x2, y2] inside the image holding `box`, whose longer side is the box's longer side over a
    fraction drawn in [0.3, 0.9], aspect ratio in [0.75, 1.33], the box placed at random inside."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    side = max(bw, bh) / rng.uniform(0.3, 0.9)
    aspect = rng.uniform(0.75, 1.33)
    cw, ch = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    cw, ch = min(max(cw, bw), width), min(max(ch, bh), height)
    x1 = rng.uniform(max(0.0, box[2] - cw), min(box[0], width - cw))
    y1 = rng.uniform(max(0.0, box[3] - ch), min(box[1], height - ch))
    return [round(x1), round(y1), round(x1 + cw), round(y1 + ch)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bccd")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=132)
    p.add_argument("--test", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    names = sorted(f[:-4] for f in os.listdir(os.path.join(args.bccd, "Annotations")) if f.endswith(".xml"))
    rng.shuffle(names)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    splits = {"train": [], "test": []}
    for name in names:
        split = "train" if len(splits["train"]) < args.train else "test"
        if len(splits["test"]) >= args.test:
            break
        path = os.path.join(args.bccd, "JPEGImages", name + ".jpg")
        boxes = wbc_boxes(os.path.join(args.bccd, "Annotations", name + ".xml"))
        if not boxes or not os.path.exists(path):
            continue
        image = Image.open(path).convert("RGB")
        x1, y1, x2, y2 = crop_window(boxes[0], image.width, image.height, rng)
        inside = []
        for b in boxes:   # keep crops whose WBCs are all either wholly inside or wholly outside
            if b[0] >= x1 and b[1] >= y1 and b[2] <= x2 and b[3] <= y2:
                inside.append([b[0] - x1, b[1] - y1, b[2] - b[0], b[3] - b[1]])
            elif not (b[2] <= x1 or b[0] >= x2 or b[3] <= y1 or b[1] >= y2):
                inside = None
                break
        if not inside:
            continue
        file_name = name + ".jpg"
        image.crop((x1, y1, x2, y2)).save(os.path.join(args.out, "images", file_name), quality=95)
        splits[split].append((file_name, x2 - x1, y2 - y1, inside))
    for split, items in splits.items():
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "WBC"}]}
        for i, (file_name, w, h, boxes) in enumerate(items, 1):
            coco["images"].append({"id": i, "file_name": file_name, "width": w, "height": h})
            for b in boxes:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": 1,
                                            "bbox": [round(v, 1) for v in b], "area": round(b[2] * b[3], 1),
                                            "iscrowd": 0})
        with open(os.path.join(args.out, f"{split}.json"), "w") as f:
            json.dump(coco, f)
        print(f"{split}: {len(items)} images, {len(coco['annotations'])} boxes -> {args.out}/{split}.json")


if __name__ == "__main__":
    sys.exit(main())
