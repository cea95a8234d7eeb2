"""The CIFAR ResNets of He et al. 2016 (6n+2 layers, 16/32/64 channels).

Shortcuts that change shape use a 1x1 convolution (option B), as in the Keras ResNet v1 the
paper decomposed; the parameter-free option A (zero-padding) would hide a channel concat in a
pad call. ``bn=False`` gives the paper's BatchNorm-free variant (convolutions with biases).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


def _conv_bn(cin: int, cout: int, k: int, stride: int, bn: bool) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=not bn)
    return [conv, nn.BatchNorm2d(cout)] if bn else [conv]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn: bool):
        super().__init__()
        self.branch = nn.Sequential(*_conv_bn(cin, cout, 3, stride, bn), nn.ReLU(),
                                    *_conv_bn(cout, cout, 3, 1, bn))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride, bn))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, bn: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16, 3, 1, bn), nn.ReLU())
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, bn))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 64, H/4, W/4)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, bn: bool = True) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, bn)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3, bn: bool = True) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels, bn)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3, bn: bool = True) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels, bn)
