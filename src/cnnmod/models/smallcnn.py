"""A small BatchNorm CNN for grey digits (28x28 MNIST; any size divisible by 4 works)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.hidden = nn.Linear(32 * side * side, 64)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)  # (B, 32 * side * side)
        return self.fc(self.relu(self.hidden(x)))  # (B, num_classes)


@register_model
def smallcnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return SmallCNN(num_classes, in_channels, image_size)
