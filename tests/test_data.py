"""The COCO loader: resizing, flips, category mapping, awkward real files, and BCCD."""
import json
import os

import pytest
import torch
from PIL import Image

from odtk.data import Augment, CocoDataset, collate, crop_boxes, make_loader, random_crop_window, resize_ratio
from odtk.utils import OdtkError


def test_resize_ratio_caps_longer_side():
    assert resize_ratio(640, 480, 256, 1333) == pytest.approx(256 / 480)
    assert resize_ratio(2000, 500, 800, 1333) == pytest.approx(1333 / 2000)


def test_category_ids_are_mapped(synthetic):
    images, train, _ = synthetic
    ds = CocoDataset(images, train, resize=64, max_size=64)
    assert ds.category_ids == [10, 20, 30]
    labels = torch.cat([ds.labels[i] for i in ds.ids])
    assert labels.min() >= 0 and labels.max() <= 2


def test_boxes_follow_resize_and_flip(synthetic):
    images, train, _ = synthetic
    plain = CocoDataset(images, train, resize=64, max_size=64)
    x, boxes, labels, image_id, ratio = plain[0]
    assert x.shape == (3, 64, 64) and ratio == pytest.approx(0.5)
    assert torch.allclose(boxes, plain.boxes[image_id] * 0.5)
    flipped = CocoDataset(images, train, resize=64, max_size=64, augment=Augment(flip=True))
    import random
    random.seed(0)
    seen = set()
    for _ in range(20):
        xf, bf, _, _, _ = flipped[0]
        if torch.equal(xf, x):
            seen.add("same")
            assert torch.allclose(bf, boxes)
        else:
            seen.add("flip")
            assert torch.allclose(xf, x.flip(-1), atol=1e-6)
            assert torch.allclose(bf[:, [0, 2]], 64 - boxes[:, [2, 0]])
    assert seen == {"same", "flip"}


def test_rotation_keeps_boxes_on_the_object(synthetic):
    images, train, _ = synthetic
    import random
    random.seed(3)
    ds = CocoDataset(images, train, resize=128, max_size=128, augment=Augment(flip=False, rotate=True))
    base = CocoDataset(images, train, resize=128, max_size=128)
    x0, b0, _, _, _ = base[1]
    for _ in range(10):
        x, b, _, _, _ = ds[1]
        # the mean colour inside each box is unchanged by a rotation of image and boxes together
        for (a, c) in zip(b0.round().long().tolist(), b.round().long().tolist()):
            m0 = x0[:, a[1]:a[3], a[0]:a[2]].mean()
            m1 = x[:, c[1]:c[3], c[0]:c[2]].mean()
            assert abs(m0 - m1) < 0.05


def test_collate_pads_to_stride_and_boxes_with_minus_one():
    a = (torch.ones(3, 50, 70), torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([2]), 1, 1.0)
    b = (torch.ones(3, 64, 40), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, 0.5)
    images, boxes, labels, ids, ratios = collate([a, None, b], size_divisible=32)
    assert images.shape == (2, 3, 64, 96)
    assert images[0, :, 50:].abs().sum() == 0
    assert labels.tolist() == [[2], [-1]] and ids.tolist() == [1, 2]


def _coco(path, images, anns, cats=({"id": 5, "name": "thing"},)):
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": list(cats)}))
    return str(path)


def test_awkward_images_and_boxes(tmp_path, caplog):
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (40, 30)).save(tmp_path / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotated 90 degrees: displayed 30 x 40
    Image.new("RGB", (40, 30)).save(tmp_path / "exif.jpg", exif=exif)
    images = [{"id": i, "file_name": f, "width": w, "height": h}
              for i, (f, w, h) in enumerate([("gray.png", 40, 30), ("rgba.png", 40, 30), ("exif.jpg", 30, 40)], 1)]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [7, 7, 0, 0], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [50, 50, 5, 5], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 5, "bbox": [35, 20, 20, 20], "iscrowd": 0}]
    ds = CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", images, anns), resize=30, max_size=100)
    assert "a.json: dropped 1 box: zero-area; first: annotation 2, image_id 1, bbox [7, 7, 0, 0]" in caplog.text
    assert "a.json: dropped 1 box: outside the image; first: annotation 3" in caplog.text
    assert ds.boxes[2].tolist() == [[35, 20, 40, 30]]          # clipped to the image
    shapes = [ds[i][0].shape for i in range(3)]
    assert shapes == [(3, 30, 40), (3, 30, 40), (3, 40, 30)]  # gray/RGBA -> RGB, EXIF turned upright
    assert ds[2][1].shape == (0, 4)                            # an image with no boxes


def test_missing_image_fails_before_training(tmp_path):
    images = [{"id": 1, "file_name": "nope.jpg", "width": 10, "height": 10}]
    with pytest.raises(OdtkError, match="nope.jpg: image file not found"):
        CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", images, []))


def test_bad_annotation_files(tmp_path):
    with pytest.raises(OdtkError, match="annotations file not found"):
        CocoDataset(str(tmp_path), str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(OdtkError, match="bad.json: not valid JSON"):
        CocoDataset(str(tmp_path), str(tmp_path / "bad.json"))


def test_corrupt_image_is_skipped(tmp_path, caplog):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    images = [{"id": 1, "file_name": "broken.jpg", "width": 10, "height": 10}]
    ds = CocoDataset(str(tmp_path), _coco(tmp_path / "a.json", images, []))
    assert ds[0] is None and "broken.jpg: cannot read image" in caplog.text
    caplog.clear()   # every epoch meets it again: skipped, not said again
    assert ds[0] is None and "cannot read image" not in caplog.text


def test_bccd_loader(bccd, tmp_path):
    from odtk.convert import convert_voc, write_coco
    coco, skipped = convert_voc(bccd, split="test")
    write_coco(coco, skipped, str(tmp_path / "test.json"))
    ds = CocoDataset(os.path.join(bccd, "JPEGImages"), str(tmp_path / "test.json"), jitter=(224, 288),
                     max_size=352, augment=Augment(flip=True, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02))
    assert len(ds) == 72 and ds.category_ids == [1, 2, 3]
    loader = make_loader(ds, batch_size=4, training=True, workers=2)
    for n, (images, boxes, labels, ids, ratios) in enumerate(loader):
        assert images.shape[0] == 4 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        assert images.shape[2] <= 288 and images.shape[3] <= 352
        valid = labels >= 0
        assert valid.any(dim=1).all()                          # every BCCD image has cells
        b = boxes[valid]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and (b[:, 2] <= 352).all() and (b[:, 3] <= 288).all()
        assert labels[valid].max() <= 2
        if n == 3:
            break


def test_crop_boxes_keeps_centres_inside_clips_and_shifts():
    boxes = torch.tensor([[10.0, 10, 30, 30], [0, 0, 12, 12], [35, 5, 60, 25], [45, 45, 50, 50]])
    labels = torch.tensor([0, 1, 2, 1])
    b, l = crop_boxes(boxes, labels, (5, 5, 40, 40))     # centres 20, 6, 47.5 (out), 47.5 (out)
    assert l.tolist() == [0, 1]
    assert b.tolist() == [[5, 5, 25, 25], [0, 0, 7, 7]]


def test_crop_window_follows_the_ssd_rule():
    import random
    boxes = torch.tensor([[40.0, 30, 120, 90]])
    rng, crops = random.Random(5), 0
    for _ in range(300):
        window = random_crop_window(200, 100, boxes, rng)
        if window is None:
            continue
        crops += 1
        x1, y1, x2, y2 = window
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 100
        assert 0.3 * 200 - 1 <= x2 - x1 and 0.3 * 100 - 1 <= y2 - y1
        assert 0.5 * 0.9 <= (x2 - x1) / (y2 - y1) <= 2 / 0.9            # whole pixels round the aspect ratio
        assert x1 <= 80 <= x2 and y1 <= 60 <= y2                          # the one box's centre is inside
    assert 0.6 * 300 < crops < 0.95 * 300                                # "no crop" is one draw in seven
    empty = [random_crop_window(200, 100, torch.zeros(0, 4), random.Random(s)) for s in range(50)]
    assert any(w is None for w in empty) and any(w is not None for w in empty)   # no boxes: any window


def test_augment_crop_is_seeded_keeps_boxes_inside_and_off_changes_nothing(synthetic):
    import random
    images, train, _ = synthetic
    crop = CocoDataset(images, train, jitter=(96, 96), max_size=1000, augment=Augment(flip=True, crop=True))
    off = CocoDataset(images, train, jitter=(96, 96), max_size=1000, augment=Augment(flip=True))
    plain = CocoDataset(images, train, resize=96, max_size=1000)
    cropped = 0
    for i in range(len(crop)):
        seed = 1000 + i
        x, b, l, image_id, r = crop[(i, seed)]
        x2, b2, l2, _, r2 = crop[(i, seed)]
        # (index, seed) alone decides the sample
        assert torch.equal(x, x2) and torch.equal(b, b2) and torch.equal(l, l2) and r == r2
        assert min(x.shape[1:]) == 96 and r >= 0.75                       # the crop is resized like an image
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and (b[:, 2] <= x.shape[2] + 1e-3).all() and (b[:, 3] <= x.shape[1] + 1e-3).all()
        original = crop.labels[image_id].tolist()
        assert len(l) >= min(1, len(original))                           # a crop keeps some box centre
        assert all(l.tolist().count(c) <= original.count(c) for c in set(l.tolist()))   # a subset of the labels
        cropped += x.shape[1:] != (96, 96) or len(l) < len(original) or r != 0.75
        # crop off: exactly the uncropped sample, the seed's draws unchanged (the jitter's, then the flip's)
        xo, bo, lo, _, ro = off[(i, seed)]
        xp, bp, lp, _, rp = plain[i]
        rng = random.Random(seed)
        rng.randint(96, 96)
        flipped = rng.random() < 0.5
        assert torch.equal(xo, xp.flip(-1) if flipped else xp) and torch.equal(lo, lp) and ro == rp
        mirrored = torch.stack([96 - bp[:, 2], bp[:, 1], 96 - bp[:, 0], bp[:, 3]], 1)
        assert torch.allclose(bo, mirrored if flipped else bp)
    assert cropped >= len(crop) // 3
