"""An image folder read lazily: file names and labels at once, pixels only when a batch asks.

``load_data(folder, ..., stream=True)`` gives an ``ImageFiles``: listing a folder of a million
photos takes seconds and holds only their names; ``load(index)`` decodes those files, each resized
(shorter side, centre crop) to the model's input as ``InputSpec.crop_pct`` says. The statistics
pass reads its batches in worker processes (torch's ``DataLoader``), a few batches ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CnnmodError
from .folders import _decode, index_image_folder
from .sources import stack_images


@dataclass
class ImageFiles:
    """Images of an ImageFolder tree by file name, decoded on demand to ``channels`` and ``size``."""

    root: Path
    files: list[str]  # relative posix paths under ``root``
    labels: torch.Tensor  # (N,) int64, index into classes
    classes: list[str]
    channels: int
    size: tuple[int, int]
    crop_pct: float | None = None
    name: str = ""

    @classmethod
    def scan(cls, root: Path, names: list[str], *, channels: int, size: tuple[int, int],
             crop_pct: float | None = None) -> "ImageFiles":
        """Index ``names`` (the files under ``root``, relative posix paths) as an ImageFolder tree."""
        files, labels, classes = index_image_folder(root, names)
        return cls(root, files, torch.tensor(labels, dtype=torch.int64), classes, channels, tuple(size), crop_pct,
                   str(root))

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> "ImageFiles":
        return ImageFiles(self.root, [self.files[i] for i in index.tolist()], self.labels[index], list(self.classes),
                          self.channels, self.size, self.crop_pct, self.name)

    def load(self, index) -> torch.Tensor:
        """The images at ``index``, decoded: (N, C, H, W) uint8."""
        arrays = []
        for i in torch.as_tensor(index).flatten().tolist():
            name = self.files[i]
            try:
                blob = (self.root / name).read_bytes()
            except OSError as e:
                raise CnnmodError(f"{self.root}: cannot read image {name} ({e.strerror}).") from None
            arrays.append(_decode(self.root, name, blob, self.channels, self.size, self.crop_pct))
        if not arrays:
            return torch.zeros(0, self.channels, *self.size, dtype=torch.uint8)
        return stack_images(arrays)
