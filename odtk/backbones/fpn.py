"""Feature pyramid P3-P7 on top of a C3-C5 body (P6 from C5, as ODTK and the RetinaNet paper)."""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class FPN(nn.Module):
    strides = (8, 16, 32, 64, 128)

    def __init__(self, body: nn.Module, *, channels: int = 256):
        super().__init__()
        self.body = body
        c3, c4, c5 = body.channels
        self.lateral3 = nn.Conv2d(c3, channels, 1)
        self.lateral4 = nn.Conv2d(c4, channels, 1)
        self.lateral5 = nn.Conv2d(c5, channels, 1)
        self.smooth3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.smooth4 = nn.Conv2d(channels, channels, 3, padding=1)
        self.smooth5 = nn.Conv2d(channels, channels, 3, padding=1)
        self.pyramid6 = nn.Conv2d(c5, channels, 3, stride=2, padding=1)
        self.pyramid7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for m in [self.lateral3, self.lateral4, self.lateral5, self.smooth3, self.smooth4, self.smooth5,
                  self.pyramid6, self.pyramid7]:
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> List[Tensor]:
        c3, c4, c5 = self.body(x)
        p5 = self.lateral5(c5)
        p4 = self.lateral4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        p6 = self.pyramid6(c5)
        p7 = self._p7(F.relu(p6))
        return [self.smooth3(p3), self.smooth4(p4), self.smooth5(p5), p6, p7]

    def _p7(self, x: Tensor) -> Tensor:
        # oneDNN's bf16 weight gradient of a stride-2 convolution on a 1-pixel-wide input comes out non-finite about
        # one step in three (torch 2.14, AVX512-BF16): P7 of an image 64 px wide or less runs in fp32 under CPU autocast
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and x.shape[-1] == 1:
            with torch.autocast("cpu", enabled=False):
                return self.pyramid7(x.float())
        return self.pyramid7(x)
