"""Backbone registry: name -> FPN over a torchvision body, plus ImageNet weight loading."""
import os
from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from ..utils import OdtkError
from .fpn import FPN
from .mobilenet import MobileNetV2Body
from .resnet import ResNetBody

# name -> (body factory taking norm_layer/freeze, torchvision's ImageNet weight file name)
_BODIES: Dict[str, tuple] = {
    "ResNet18FPN": (partial(ResNetBody, "resnet18"), "resnet18-f37072fd.pth"),
    "ResNet34FPN": (partial(ResNetBody, "resnet34"), "resnet34-b627a593.pth"),
    "ResNet50FPN": (partial(ResNetBody, "resnet50"), "resnet50-0676ba61.pth"),
    "ResNet101FPN": (partial(ResNetBody, "resnet101"), "resnet101-63fe2227.pth"),
    "ResNet152FPN": (partial(ResNetBody, "resnet152"), "resnet152-394f9c45.pth"),
    "ResNeXt50_32x4dFPN": (partial(ResNetBody, "resnext50_32x4d"), "resnext50_32x4d-7cdf4587.pth"),
    "ResNeXt101_32x8dFPN": (partial(ResNetBody, "resnext101_32x8d"), "resnext101_32x8d-8ba56ff5.pth"),
    "MobileNetV2FPN": (MobileNetV2Body, "mobilenet_v2-b0353104.pth"),
}
BACKBONES = tuple(_BODIES)


def build_backbone(name: str, *, pretrained: bool, channels: int = 256) -> FPN:
    """FPN backbone of `channels` width. Pretrained bodies get frozen BatchNorm and a frozen stem; from-scratch
    ones train BN."""
    if name not in _BODIES:
        raise OdtkError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    factory, _ = _BODIES[name]
    norm: Callable[[int], nn.Module] = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    return FPN(factory(norm_layer=norm, freeze=pretrained), channels=channels)


def weight_file(name: str) -> str:
    """torchvision's file name for the backbone's ImageNet weights."""
    return _BODIES[name][1]


def find_weights(name: str, path: Optional[str] = None) -> Optional[str]:
    """`path` if given (a file, or a folder holding torchvision's file), else torch's hub cache, else None."""
    if path:
        if os.path.isdir(path):
            path = os.path.join(path, weight_file(name))
        if not os.path.isfile(path):
            raise OdtkError(f"{path}: backbone weights file not found")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", weight_file(name))
    return cached if os.path.isfile(cached) else None


def load_imagenet(backbone: FPN, path: str) -> None:
    """Load a torchvision ImageNet state_dict into the body; fail clearly on a wrong file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-torch file
        raise OdtkError(f"{path}: cannot read backbone weights ({e.__class__.__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = backbone.body.net
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise OdtkError(f"{path}: not torchvision weights for this backbone "
                        f"({len(missing)} tensors missing or of another shape, e.g. {missing[0]})")
    net.load_state_dict(usable, strict=False)
