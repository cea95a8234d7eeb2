"""Tiny hand-built networks for exact tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PixelNet(nn.Module):
    """conv 1x1 (1 -> 2 channels, weights +1 and -1) -> ReLU -> flatten (8) -> linear (8 -> 3)."""

    def __init__(self, head: torch.Tensor | None = None):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(head if head is not None else torch.arange(24.0).view(3, 8) / 24)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def pixel_data():
    """3 classes, 2 images each (1x2x2): class c lights only pixel c (row-major) with 1 or 2."""
    images, labels = [], []
    for c in range(3):
        for v in (1.0, 2.0):
            x = torch.zeros(1, 2, 2)
            x.view(-1)[c] = v
            images.append(x)
            labels.append(c)
    return torch.utils.data.TensorDataset(torch.stack(images), torch.tensor(labels))


class Unfamiliar(nn.Module):
    """An architecture cnnmod has never seen: depthwise convs, a concat, a residual add,
    max pooling, functional ReLUs, and x.view(x.size(0), -1)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 3, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.pw(self.dw(x)) + x)  # residual add
        z = torch.cat([y, F.relu(self.side(x))], dim=1)  # concat: 8 + 4 channels
        z = self.pool(F.relu(self.grouped(z)))  # (B, 12, 4, 4)
        return self.fc2(F.relu(self.fc1(z.view(z.size(0), -1))))


def train_unfamiliar(data, spec, epochs=4, seed=0):
    """Train ``Unfamiliar`` on a cnnmod Dataset with Adam (a few seconds on ``digits``)."""
    torch.manual_seed(seed)
    model = Unfamiliar(len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = spec.prepare(data.images), data.labels
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Branchy(nn.Module):
    """Concatenations, a channel split and a channel shuffle (Inception's and ShuffleNet's ops)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)  # over the concatenation: a derived space with an activation
        self.branch = nn.Conv2d(5, 5, 3, padding=1)
        self.last = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        z = F.relu(self.bn(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)))
        x1, x2 = z.chunk(2, dim=1)
        u = torch.cat([x1, F.relu(self.branch(x2))], dim=1)
        b, c, h, w = u.size()  # torchvision's channel_shuffle
        u = torch.transpose(u.view(b, 2, c // 2, h, w), 1, 2).contiguous().view(b, -1, h, w)
        u = F.max_pool2d(F.relu(self.last(u)), 2)
        return self.fc(u.flatten(1))


def random_removal(graph, weights, shape, spaces, gen):
    """The channels strategy's oracle input: random channels of every prunable space removed and
    random constants in their place. Returns (keep per space, the masked network)."""
    from cnnmod.trace import GraphNetwork, overlaid

    shapes = GraphNetwork(graph, weights).shapes(shape)
    keep, masks, fills = {}, {}, {}
    for space in spaces.prunable:
        keep[space] = torch.rand(shapes[spaces.relus[space][0]][0], generator=gen) < 0.5
        for r in spaces.relus[space]:
            masks[r] = keep[space].view(-1, *[1] * (len(shapes[r]) - 1)).expand(shapes[r])
            fills[r] = torch.rand(shapes[r], generator=gen)
    return keep, overlaid(graph, weights, masks=masks, fills=fills)
