"""MobileNetV2 body from torchvision returning C3 (stride 8), C4 (16), C5 (32)."""
from typing import Callable, List

import torch.nn as nn
import torchvision
from torch import Tensor


class MobileNetV2Body(nn.Module):
    # torchvision's features: [0:7] -> stride 8 (32 ch), [7:14] -> 16 (96 ch), [14:18] -> 32 (320 ch);
    # features.18 (1x1 to 1280) and the classifier only serve ImageNet classification
    channels = (32, 96, 320)

    def __init__(self, *, norm_layer: Callable[[int], nn.Module], freeze: bool):
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm_layer)
        del net.classifier
        del net.features[18]
        self.net = net
        self.frozen = [net.features[:4]] if freeze else []
        for m in self.frozen:
            m.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        f = self.net.features
        c3 = f[:7](x)
        c4 = f[7:14](c3)
        c5 = f[14:](c4)
        return [c3, c4, c5]
