"""Model definitions written the way public CIFAR training repositories write them (issue #23).

Written here from the constructs such code uses, not copied from any repository: lambda layers,
shape queries in ``forward``, channel slices, computed channel splits, padding, upsampling,
in-place adds, GroupNorm. Each is small enough to capture and decompose in a test; ``CORPUS``
names them with the input shape each takes. ``cifar_resnet`` is also the benchmark's model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    """He et al.'s CIFAR block; option A: the shortcut subsamples and pads channels with zeros."""

    def __init__(self, planes_in, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or planes_in != planes:
            pad = planes // 4
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), num_classes=10, width=16):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.linear = nn.Linear(4 * width, num_classes)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


def cifar_resnet(depth=20, num_classes=10, width=16):
    """ResNet-20/32/44/56 (depth = 6n + 2) with option-A shortcuts."""
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes, width)


class DualPath(nn.Module):
    """A dual-path block: the first ``d`` channels are a residual sum, the rest are concatenated."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.inner = nn.Conv2d(16, 16, 1)
        self.conv = nn.Conv2d(16, 20, 3, padding=1)
        self.bn = nn.BatchNorm2d(20)
        self.d = 12
        self.fc = nn.Linear(12 + 4 + 8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = self.bn(self.conv(F.relu(self.inner(x))))
        d = self.d
        summed, new = torch.split(out, d, dim=1)
        out = torch.cat([x[:, :d] + summed, x[:, d:], new], 1)
        out = F.relu(out)
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        return self.fc(out)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation written with shape queries: pooling over ``out.size(2)``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        w = F.avg_pool2d(out, out.size(2))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        out = out * w
        out = F.max_pool2d(out, 2)
        out = out.mean(dim=(2, 3))
        return self.linear(out)


class SplitShuffle(nn.Module):
    """A ShuffleNet v2 unit: a channel split computed from the input's size, a channel shuffle
    written with ``reshape``, ``torch.split`` by sizes and the halves of ``chunk`` swapped."""

    def __init__(self, num_classes=10, ratio=0.5):
        super().__init__()
        self.ratio = ratio
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                    nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.side = nn.Conv2d(6, 6, 3, padding=1)
        self.linear = nn.Linear(16, num_classes)

    @staticmethod
    def shuffle(x, groups):
        n, c, h, w = x.size()
        return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        c = int(x.size(1) * self.ratio)
        x1, x2 = x[:, :c, :, :], x[:, c:, :, :]
        out = self.shuffle(torch.cat([x1, self.branch(x2)], 1), 2)
        a, b = torch.split(out, [6, 10], dim=1)
        out = torch.cat([F.relu(self.side(a)), b], 1)
        out = torch.cat(out.chunk(2, dim=1)[::-1], 1)
        return self.linear(F.adaptive_avg_pool2d(out, 1).view(out.size(0), -1))


class Upsampling(nn.Module):
    """An upsampling branch added back to the full-resolution map, spatial crops and strides,
    ``amax`` with ``keepdim``, arithmetic with scalars and ``clamp``/``hardtanh``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 8, 1)
        self.crop = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, num_classes)
        self.act = nn.Hardtanh(0.0, 6.0)

    def forward(self, x):
        x = F.relu(self.stem(x))
        low = self.act(self.down(x))
        up = F.interpolate(self.up(low), scale_factor=2, mode="nearest")
        smooth = F.interpolate(low, size=x.shape[2:], mode="bilinear", align_corners=False)
        x = x + up * 0.5 - smooth / 4
        x = torch.clamp(x - 1.0, min=0.0)
        x = F.pad(x, (1, 1, 1, 1))  # "same" padding written out
        x = F.relu_(self.crop(x)[:, :, 1:-1, 1:-1])
        x = x[:, :, ::2, ::2] * 1.0 + 0.1
        return self.head(x.amax(dim=(2, 3), keepdim=True).flatten(1))


class GroupNormNet(nn.Module):
    """GroupNorm after convolutions, in-place residual adds and in-place activations."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.gn0 = nn.GroupNorm(4, 16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(16, 16)  # one channel a group: per channel
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.gn0(self.stem(x)))
        out = self.conv1(x)
        out = self.gn1(out)
        out.relu_()
        out = self.gn2(self.conv2(out))
        out += x
        out = F.relu(out, inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class ZeroChannels(nn.Module):
    """Zero channels padded around a map and read by a convolution (a widening shortcut)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(F.pad(x, (0, 0, 0, 0, 1, 3))))
        return self.fc(x.mean((2, 3)))


class SwishBlock(nn.Module):
    """EfficientNet-style code: the input normalised inside the model by buffers, swish written by
    hand (``x * x.sigmoid()``), a depthwise convolution, squeeze-excitation, ``F.dropout`` with
    ``training=self.training`` and ``x.float()``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = (x.float() - self.mean) / self.std
        x = self.bn0(self.stem(x))
        x = x * x.sigmoid()
        out = self.bn1(self.dw(x))
        out = out * torch.sigmoid(out)
        gate = F.adaptive_avg_pool2d(out, 1)
        gate = self.se_expand(F.silu(self.se_reduce(gate)))
        out = self.bn2(self.project(out * torch.sigmoid(gate)))
        out = out + x
        out = F.dropout(out.mean((2, 3)), 0.2, training=self.training)
        return self.fc(out)


class ChannelAttention(nn.Module):
    """Efficient channel attention: a Conv1d across the pooled channels, written with squeeze,
    transpose and unsqueeze, its gate expanded over the map."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.attend = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.attend(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        x = x * torch.sigmoid(y).expand_as(x)
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


CORPUS = {
    "cifar_resnet20": (lambda: cifar_resnet(20), (3, 32, 32)),
    "cifar_resnet8_narrow": (lambda: cifar_resnet(8, width=8), (3, 16, 16)),
    "dual_path": (DualPath, (3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, (3, 8, 8)),
    "split_shuffle": (SplitShuffle, (3, 8, 8)),
    "upsampling": (Upsampling, (3, 10, 10)),
    "group_norm": (GroupNormNet, (3, 8, 8)),
    "zero_channels": (ZeroChannels, (3, 6, 6)),
    "swish_block": (SwishBlock, (3, 8, 8)),
    "channel_attention": (ChannelAttention, (3, 8, 8)),
}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial normalisation statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()
