"""DALI loaders (--with-dali) against the PyTorch loader: sizes, ratios, boxes, labels, sharding, the CLI."""
import json
import logging
import os
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from odtk.data import Augment, CocoDataset, Loader, make_loader
from odtk.main import main
from odtk.model import Model
from odtk.utils import OdtkError

NO_DALI = "NVIDIA DALI is not installed (pip install 'odtk[dali]'; CI installs it with the test extra)"


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali", reason=NO_DALI)


def _loader(dataset, **kwargs):
    """A DALI loader on its default device (a GPU when there is one), its batches brought to the CPU to be compared
    with the PyTorch loader's."""
    from odtk.dali import make_dali_loader
    return OnCpu(make_dali_loader(dataset, **{"batch_size": 1, "training": False, "workers": 1, **kwargs}))


class OnCpu:
    """A loader whose batches are copied to the CPU; everything else is the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            yield tuple(t.cpu() for t in batch)


def _by_id(loader):
    """image id -> (image, valid boxes, valid labels, ratio) over one epoch of a loader."""
    out = {}
    for images, boxes, labels, ids, ratios in loader:
        for x, b, l, i, r in zip(images, boxes, labels, ids.tolist(), ratios.tolist()):
            assert i not in out, f"image {i} twice in one epoch"
            out[i] = (x, b[l >= 0], l[l >= 0], r)
    return out


def _alone(ds):
    """Every image alone (batch 1, stride 1: tensors of exactly the resized size) from DALI and from PyTorch."""
    return (_by_id(_loader(ds, size_divisible=1)),
            _by_id(make_loader(ds, batch_size=1, training=False, workers=0, size_divisible=1)))


def _small_coco(folder, images, annotations, resize: int) -> CocoDataset:
    (folder / "a.json").write_text(json.dumps({"images": images, "annotations": list(annotations),
                                               "categories": [{"id": 1, "name": "x"}]}))
    return CocoDataset(str(folder), str(folder / "a.json"), resize=resize, max_size=1000)


@pytest.fixture(scope="module")
def bccd_subset(bccd, tmp_path_factory):
    """20 BCCD test images as COCO (VOC -> COCO with odtk's converter)."""
    from odtk.convert import convert_voc, write_coco
    coco, skipped = convert_voc(bccd, split="test", classes=["WBC", "RBC", "Platelets"])
    keep = {im["id"] for im in coco["images"][:20]}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    path = str(tmp_path_factory.mktemp("bccd") / "subset.json")
    write_coco(coco, skipped, path)
    return os.path.join(bccd, "JPEGImages"), path


@pytest.mark.parametrize("resize, max_size", [(256, 352), (256, 320)])     # 320: the longer-side cap decides
def test_inference_parity_on_bccd(dali, bccd_subset, resize, max_size):
    images, annotations = bccd_subset
    ds = CocoDataset(images, annotations, resize=resize, max_size=max_size)
    ours, ref = _alone(ds)
    assert sorted(ours) == sorted(ref) == sorted(ds.ids)
    for i, (x, b, l, r) in ours.items():
        rx, rb, rl, rr = ref[i]
        assert x.shape == rx.shape and r == pytest.approx(rr, rel=1e-12)
        assert torch.equal(l, rl)
        assert (b / r - rb / rr).abs().max() < 1                  # within 1 px in original coordinates
        assert (b / r - ds.boxes[i]).abs().max() < 1
        assert (x - rx).abs().mean() < 0.01                       # BCCD: 0.0024, a seventh of a grey level
    padded = next(iter(_loader(ds, batch_size=4, size_divisible=32)))
    reference = next(iter(make_loader(ds, batch_size=4, training=False, workers=0, size_divisible=32)))
    assert [t.shape for t in padded] == [t.shape for t in reference]
    assert [t.dtype for t in padded] == [t.dtype for t in reference]


def test_sizes_round_like_python_on_ties(dali, tmp_path):
    from PIL import Image
    images = []
    for i, width in enumerate((101, 103, 30), 1):       # ratio 0.5: 50.5 -> 50 and 51.5 -> 52 (half to even)
        Image.new("RGB", (width, 30), (i * 60, 90, 30)).save(tmp_path / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": width, "height": 30})
    ours, ref = _alone(_small_coco(tmp_path, images, [], resize=15))
    assert [ours[i][0].shape for i in (1, 2, 3)] == [ref[i][0].shape for i in (1, 2, 3)]
    assert [ours[i][0].shape[2] for i in (1, 2, 3)] == [50, 52, 15]


def test_exif_orientation_and_grayscale_like_pytorch(dali, tmp_path):
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotated 90 degrees: displayed 30 x 40
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "exif.jpg", exif=exif)
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    images = [{"id": 1, "file_name": "exif.jpg", "width": 30, "height": 40},
              {"id": 2, "file_name": "gray.png", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 10, 10, 20], "iscrowd": 0}]
    ours, ref = _alone(_small_coco(tmp_path, images, anns, resize=30))
    for i in (1, 2):
        assert ours[i][0].shape == ref[i][0].shape and torch.allclose(ours[i][1], ref[i][1], atol=1e-3)
        assert (ours[i][0] - ref[i][0]).abs().max() < 0.1
    assert ours[1][0].shape == (3, 40, 30)


def test_category_ids_10_20_30_map_like_pytorch(dali, synthetic):
    images, _, val = synthetic
    ds = CocoDataset(images, val, resize=100, max_size=120)
    assert ds.category_ids == [10, 20, 30]
    ours = _loader(ds, batch_size=3)
    ref = make_loader(ds, batch_size=3, training=False, workers=0)
    batches = 0
    for a, b in zip(ours, ref):
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])     # labels (-1 padded) and image ids
        assert torch.allclose(a[1], b[1], atol=1e-3)                     # boxes, 0-padded rows like collate()
        assert a[0].shape == b[0].shape and a[4].tolist() == pytest.approx(b[4].tolist())
        batches += 1
    assert batches == len(ours) == len(ref) == 3
    labels = torch.cat([l[l >= 0] for _, _, l, _, _ in ours])
    assert set(labels.tolist()) == {0, 1, 2}


def test_pytorch_loader_follows_the_loader_protocol(synthetic):
    images, train, _ = synthetic
    ds = CocoDataset(images, train, resize=64, max_size=64)
    loader = make_loader(ds, batch_size=4, training=True, workers=0, seed=3)
    assert isinstance(loader, Loader) and loader.batches == loader.sampler.batches == 6
    assert not isinstance(DataLoader(ds), Loader)                 # no start/batches: the check means something
    loader.start(1)
    epoch = [ids.tolist() for _, _, _, ids, _ in loader]
    loader.start(1, 2)                                            # resume epoch 1 at its third batch
    assert [ids.tolist() for _, _, _, ids, _ in loader] == epoch[2:] and len(epoch) == loader.batches
    loader.start(2)
    assert [ids.tolist() for _, _, _, ids, _ in loader] != epoch  # another epoch, another shuffle
    inference = make_loader(ds, batch_size=5, training=False, workers=0)
    inference.start(3)                                            # one order: nothing to position
    assert isinstance(inference, Loader) and inference.batches == len(list(inference)) == 5


def test_dali_loader_follows_the_loader_protocol(dali, synthetic):
    images, train, _ = synthetic
    loader = _loader(CocoDataset(images, train, resize=64, max_size=64), batch_size=4, training=True).loader
    assert isinstance(loader, Loader) and loader.batches == 6
    loader.start(0)
    batches = list(loader)
    assert len(batches) == loader.batches
    assert loader.sampler is loader                               # the old loader.sampler.start still works
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"   # the default device: the current GPU, else CPU
    assert loader.device == expected and str(batches[0][0].device) == expected   # the images (boxes: CPU reader)


def test_dali_runs_where_it_is_told(dali, synthetic):
    """device=cpu keeps the pipeline on the CPU on any machine; a worker's GPU is its own, by local rank."""
    from odtk.dali import _gpu_index, make_dali_loader
    images, train, _ = synthetic
    loader = make_dali_loader(CocoDataset(images, train, resize=64, max_size=64), batch_size=4, training=False,
                              workers=1, device=torch.device("cpu"))
    assert loader.device == "cpu" and all(t.device.type == "cpu" for t in next(iter(loader)))
    assert _gpu_index(torch.device("cpu")) is None and _gpu_index(torch.device("cuda", 3)) == 3


def test_training_flips_boxes_with_the_image(dali, synthetic):
    images, train, _ = synthetic
    flip = CocoDataset(images, train, jitter=(100, 100), max_size=200, augment=Augment(flip=True))
    plain = _by_id(_loader(CocoDataset(images, train, resize=100, max_size=200), size_divisible=1))
    seen = set()
    loader = _loader(flip, batch_size=4, training=True, size_divisible=1)
    for epoch in range(2):
        for i, (x, b, l, r) in _by_id(loader).items():
            px, pb, pl, _ = plain[i]
            assert torch.equal(l, pl)
            mirrored = torch.stack([100 - pb[:, 2], pb[:, 1], 100 - pb[:, 0], pb[:, 3]], dim=1)
            if torch.allclose(x, px, atol=1e-5):
                seen.add("same")
                assert torch.allclose(b, pb, atol=1e-3)
            else:
                seen.add("flipped")
                assert torch.allclose(x, px.flip(-1), atol=1e-5) and torch.allclose(b, mirrored, atol=1e-3)
    assert seen == {"same", "flipped"}


def test_training_boxes_inside_the_image_and_labels_in_range(dali, synthetic):
    images, train, _ = synthetic
    ds = CocoDataset(images, train, jitter=(96, 160), max_size=176,
                     augment=Augment(flip=True, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02))
    loader = _loader(ds, batch_size=4, training=True, workers=2)
    assert len(loader) == 6                                       # 24 images, the last partial batch dropped
    sizes, count = set(), 0
    for epoch in range(2):
        for images_, boxes, labels, ids, ratios in loader:
            assert images_.shape[0] == 4 and images_.shape[2] % 32 == 0 and images_.shape[3] % 32 == 0
            for b, l, i, r in zip(boxes, labels, ids.tolist(), ratios.tolist()):
                side = round(128 * r)                            # synthetic images are 128 x 128
                sizes.add(side)
                assert 96 <= side <= 160
                b, l = b[l >= 0], l[l >= 0]
                assert len(l) == len(ds.labels[i]) and l.min() >= 0 and l.max() <= 2
                assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
                assert b.min() >= 0 and b.max() <= side + 1e-3
            count += 1
    assert count == 12 and len(sizes) > 3                       # one epoch per loop; the jitter varies


def test_training_crop_keeps_boxes_inside_and_labels_mapped(dali, synthetic):
    images, train, _ = synthetic
    ds = CocoDataset(images, train, jitter=(96, 96), max_size=1000, augment=Augment(flip=True, crop=True))
    loader = _loader(ds, batch_size=1, training=True, size_divisible=1)      # batch 1: the exact resized size
    cropped = matched = 0
    for epoch in range(2):
        for i, (x, b, l, r) in _by_id(loader).items():
            assert min(x.shape[1:]) == 96 and r >= 0.75                     # the crop resized like an image
            original = ds.labels[i].tolist()
            assert len(l) >= min(1, len(original)) and l.min() >= 0 and l.max() <= 2
            assert all(l.tolist().count(c) <= original.count(c) for c in set(l.tolist()))   # mapped, a subset
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert b.min() >= 0 and (b[:, 2] <= x.shape[2] + 1e-3).all() and (b[:, 3] <= x.shape[1] + 1e-3).all()
            cropped += r > 0.75 + 1e-9 or len(l) < len(original)             # uncropped: 128 px -> 96
            matched += _unclipped_boxes_cover_their_objects(ds, x, b, l, i, r)
    assert cropped >= 16                                                      # of 48 samples; "no crop" is 1/7
    assert matched >= 20


def _unclipped_boxes_cover_their_objects(ds, x, boxes, labels, image_id, ratio) -> int:
    """Boxes of an object's size (not clipped by the crop) lie on that object: the middle of the box has the
    mean colour of the original box's middle (synthetic objects are flat colours). Returns how many matched."""
    from odtk.data import load_image
    image = x * torch.tensor(ds.std)[:, None, None] + torch.tensor(ds.mean)[:, None, None]
    original = load_image(os.path.join(ds.root, ds.files[image_id])).float() / 255

    def middle(im, box):
        x1, y1, x2, y2 = box.tolist()
        w, h = x2 - x1, y2 - y1
        return im[:, int(y1 + 0.4 * h):int(y2 - 0.4 * h) + 1, int(x1 + 0.4 * w):int(x2 - 0.4 * w) + 1].mean((1, 2))
    matched = 0
    for b, l in zip(boxes, labels):
        size = (b[2:] - b[:2]) / ratio
        same = [o for o, ol in zip(ds.boxes[image_id], ds.labels[image_id])
                if ol == l and ((o[2:] - o[:2]) - size).abs().max() < 1.5]
        if same:
            assert min((middle(image, b) - middle(original, o)).abs().max() for o in same) < 0.03
            matched += 1
    return matched


def test_sharding_covers_every_image_once(dali, synthetic):
    images, train, _ = synthetic
    ds = CocoDataset(images, train, resize=64, max_size=64)
    shards = [_by_id(_loader(ds, batch_size=5, rank=rank, world_size=2)) for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted([*shards[0], *shards[1]]) == sorted(ds.ids)
    train_ds = CocoDataset(images, train, jitter=(64, 64), max_size=64, augment=Augment(flip=True))
    seen = [sorted(_by_id(_loader(train_ds, batch_size=4, training=True, rank=rank, world_size=2)))
            for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 12


def test_what_the_dali_pipeline_does_not_do_is_refused(dali, synthetic):
    from odtk.dali import make_dali_loader
    images, train, _ = synthetic
    rotate = CocoDataset(images, train, jitter=(64, 64), max_size=64, augment=Augment(rotate=True))
    with pytest.raises(OdtkError, match="--augment-rotate is not in the DALI pipeline"):
        make_dali_loader(rotate, batch_size=2, training=True)
    with pytest.raises(OdtkError, match="fixed-size \\(ONNX\\) models"):
        make_dali_loader(CocoDataset(images, train, fit=(128, 128)), batch_size=2, training=False)


def test_missing_dali_says_how_to_install(synthetic, monkeypatch):
    from odtk.dali import make_dali_loader
    images, _, val = synthetic
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)          # import nvidia.dali -> ImportError
    with pytest.raises(OdtkError, match=r"--with-dali needs NVIDIA DALI: pip install 'odtk\[dali\]'"):
        make_dali_loader(CocoDataset(images, val), batch_size=2, training=False)


def test_cli_train_and_infer_with_dali(dali, trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odtk")
    model, images, train, _, weights = trained
    # infer the same .pth with and without DALI: the same COCO AP within 0.01
    from odtk.infer import InferConfig, infer
    common = dict(model=model, images=images, annotations=train, batch=4, resize=128, max_size=128,
                  loader_workers=0)
    torch_ap = infer(InferConfig(output=str(tmp_path / "t.json"), **common))
    dali_ap = infer(InferConfig(output=str(tmp_path / "d.json"), with_dali=True, **common))
    assert torch_ap["AP"] > 0
    assert abs(dali_ap["AP"] - torch_ap["AP"]) < 0.01 and abs(dali_ap["AP50"] - torch_ap["AP50"]) < 0.01
    ids = sorted({r["image_id"] for r in json.load(open(tmp_path / "d.json"))})
    assert ids == sorted({r["image_id"] for r in json.load(open(tmp_path / "t.json"))})
    # a few training iterations through the CLI, validation included, both on DALI
    out = str(tmp_path / "dali.pth")
    args = ["train", out, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "4", "--resize", "128", "--max-size", "128", "--jitter", "112", "144", "--iters", "4",
            "--warmup", "2", "--val-annotations", train, "--val-iters", "4", "--loader-workers", "1", "--with-dali"]
    if weights:
        args += ["--backbone-weights", weights]
    assert main(args) == 0
    assert Model.load(out)[1]["iteration"] == 4
    where = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"DALI training loader on {where}" in caplog.text and f"DALI inference loader on {where}" in caplog.text
    assert main(["infer", out, "--images", images, "--output", str(tmp_path / "c.json"), "--resize", "128",
                 "--max-size", "128", "--with-dali"]) == 0
