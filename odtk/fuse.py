"""Conv-BN fusion for inference: each BatchNorm that follows a convolution in a backbone body is folded into that
convolution's weight and bias, and replaced by an identity.

In inference a BatchNorm is a fixed per-channel affine map y = x * scale + shift (scale = weight / sqrt(var + eps),
shift = bias - mean * scale), so conv followed by BN equals one conv with weight * scale and bias * scale + shift.
This saves a full pass over every body activation on the CPU, and ONNX graphs lose the BN (or, for torchvision's
FrozenBatchNorm2d, the Mul/Add pair) after each Conv.

Only for a model that is not trained afterwards: Detector.load and export fuse a freshly loaded model, or a copy
(`fused_copy`); the model being trained keeps its BatchNorms.
"""
import copy
from typing import Iterator, Tuple

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

BatchNorm = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _sequential_pairs(parent: nn.Sequential) -> Iterator[Tuple[str, str]]:
    """A Conv2d immediately followed by a BatchNorm in an nn.Sequential (MobileNetV2's Conv2dNormActivation and
    projection layers, ResNet's downsample): the Sequential feeds one into the other."""
    names = list(parent._modules)
    for a, b in zip(names, names[1:]):
        if isinstance(parent._modules[a], nn.Conv2d) and isinstance(parent._modules[b], BatchNorm):
            yield a, b


def _named_pairs(parent: nn.Module) -> Iterator[Tuple[str, str]]:
    """torchvision ResNet's stem and blocks: convN feeds bnN (`self.bnN(self.convN(x))` in their forward)."""
    for name, child in parent._modules.items():
        if name.startswith("conv") and isinstance(child, nn.Conv2d):
            bn = "bn" + name[len("conv"):]
            if isinstance(parent._modules.get(bn), BatchNorm):
                yield name, bn


def conv_bn_pairs(module: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    """(parent, conv name, BN name) of every Conv -> BN pair in the known torchvision structures under `module`."""
    for parent in module.modules():
        pairs = _sequential_pairs(parent) if isinstance(parent, nn.Sequential) else _named_pairs(parent)
        for conv, bn in pairs:
            yield parent, conv, bn


def _affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm's inference map as (scale, shift) per channel."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bias - bn.running_mean * scale


@torch.no_grad()
def fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold `bn` into `conv` in place (the conv module stays the same object; it gains a bias)."""
    scale, shift = _affine(bn)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=requires_grad)


def _foldable(conv: nn.Conv2d, bn: nn.Module) -> bool:
    """A BN that normalises with fixed statistics: frozen, or nn.BatchNorm2d in eval mode with running stats."""
    if bn.running_mean is None or bn.running_mean.numel() != conv.out_channels:   # FrozenBN has no num_features
        return False
    return isinstance(bn, FrozenBatchNorm2d) or not bn.training


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every foldable BatchNorm under `model` into the convolution before it, in place; returns how many.
    The model is put in eval mode first: a fused model is for inference only (it can no longer update BN
    statistics), so never call this on a model that is trained afterwards (see `fused_copy`)."""
    model.eval()
    fused = 0
    for parent, conv_name, bn_name in list(conv_bn_pairs(model)):
        conv, bn = parent._modules[conv_name], parent._modules[bn_name]
        if _foldable(conv, bn):
            fold(conv, bn)
            parent._modules[bn_name] = nn.Identity()
            fused += 1
    return fused


def fused_copy(model: nn.Module) -> nn.Module:
    """A fused deep copy in eval mode; `model` itself is left untouched."""
    out = copy.deepcopy(model)
    fuse_conv_bn(out)
    return out
