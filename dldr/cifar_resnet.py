"""The CIFAR ResNets of He et al. (2016), as the DLDR paper trains them, registered with timm.

Three stages of 16, 32 and 64 channels with n basic blocks each (depth 6n + 2); where a stage
halves the resolution, the shortcut is the paper's option A: subsample by 2 and pad the new
channels with zeros, so shortcuts add no parameters (ResNet-20 has 0.27M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from dldr.errors import DldrError


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and not self.extra:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise DldrError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_classes = num_classes
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _create(depth: int, pretrained: bool, num_classes: int, in_chans: int) -> CifarResNet:
    if pretrained:
        raise DldrError(f"cifar_resnet{depth} has no pretrained weights")
    return CifarResNet(depth, num_classes, in_chans)


# timm's create_model passes keyword arguments of its own (pretrained_cfg, ...); they are ignored.
@register_model
def cifar_resnet20(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    return _create(20, pretrained, num_classes, in_chans)


@register_model
def cifar_resnet32(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    return _create(32, pretrained, num_classes, in_chans)


@register_model
def cifar_resnet44(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    return _create(44, pretrained, num_classes, in_chans)


@register_model
def cifar_resnet56(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    return _create(56, pretrained, num_classes, in_chans)


@register_model
def cifar_resnet110(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    return _create(110, pretrained, num_classes, in_chans)
