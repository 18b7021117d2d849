"""ResNet / ResNeXt bodies from torchvision returning C3, C4, C5."""
from typing import Callable, List

import torch.nn as nn
import torchvision
from torch import Tensor


class ResNetBody(nn.Module):
    def __init__(self, arch: str, *, norm_layer: Callable[[int], nn.Module], freeze: bool):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer)
        del net.fc
        self.net = net
        expansion = net.layer1[0].expansion
        self.channels = (128 * expansion, 256 * expansion, 512 * expansion)
        # the stem and first stage hold generic edges: keep ImageNet's, and save their backward
        self.frozen = [net.conv1, net.bn1, net.layer1] if freeze else []
        for m in self.frozen:
            m.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        c2 = n.layer1(x)
        c3 = n.layer2(c2)
        c4 = n.layer3(c3)
        c5 = n.layer4(c4)
        return [c3, c4, c5]
