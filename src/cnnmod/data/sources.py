"""``load_data(spec)``: named data sets, image folders, tar archives and CIFAR pickle folders.

Every source becomes a ``Dataset``: uint8 images (N, C, H, W) in memory, int64 labels and
class names. Images are decoded once; preparation for a model (``InputSpec.prepare``) happens
per batch.

Split rules (fixed, so that results repeat):
- ``mnist5k``: per class in file order, the first 400 images are ``train``, the last 100 ``test``.
- ``digits``: per class in file order, the first 80% are ``train``, the rest ``test`` (the
  same 4:1 rule; the classes hold ~180 images each).
- a CIFAR-10/100 pickle folder: its own ``train`` (data_batch_*/train) and ``test`` files.
- an image folder or archive is used whole (``all``) unless a split is asked for; then
  ``val`` is the last 10% (rounded up) of each class's images by sorted file name and ``train`` the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch

from ..errors import CnnmodError

if TYPE_CHECKING:
    from .stream import ImageFiles

SPLITS = ("train", "test", "val", "all")


@dataclass
class Dataset:
    """Images in memory, labels and class names."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64, index into classes
    classes: list[str]
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], list(self.classes), self.name)

    def only(self, names: list[str]) -> "Dataset":
        """The images of the classes ``names``, relabelled 0..len(names)-1 in that order."""
        from ..errors import CnnmodError

        missing = [n for n in names if n not in self.classes]
        if missing:
            raise CnnmodError(f"expected classes among the data's ({', '.join(self.classes[:12])}), "
                              f"found {missing[0]!r}.")
        remap = torch.full((len(self.classes),), -1, dtype=torch.int64)
        remap[[self.classes.index(n) for n in names]] = torch.arange(len(names))
        keep = torch.nonzero(remap[self.labels] >= 0).flatten()
        return Dataset(self.images[keep], remap[self.labels[keep]], list(names), self.name)

    def images_for(self, spec) -> torch.Tensor:
        """The images to prepare for a module of input specification ``spec`` (all of them, here)."""
        return self.images

    def batch(self, index) -> torch.Tensor:
        """The raw images at ``index`` (a slice or indices), as a composed classifier scores them."""
        return self.images[index]

    def fingerprint(self) -> str:
        """Return a short sha256 of the class names, labels and pixels."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        h.update(self.labels.numpy().tobytes())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class Views:
    """One image folder decoded once per input (channels, size) that the modules scoring it need.

    A folder of 28x28 grey digits and 32x32 colour photos cannot be one uint8 tensor; each
    module's view holds every image decoded and converted as that module's input wants. Labels,
    classes and image order are the same in every view (the files are read in sorted order).
    """

    views: dict[tuple[int, tuple[int, int]], Dataset]  # (channels, (height, width)) -> decoded data

    @property
    def _first(self) -> Dataset:
        return next(iter(self.views.values()))

    @property
    def labels(self) -> torch.Tensor:
        return self._first.labels

    @property
    def classes(self) -> list[str]:
        return self._first.classes

    @property
    def name(self) -> str:
        return self._first.name

    def __len__(self) -> int:
        return len(self._first)

    def only(self, names: list[str]) -> "Views":
        return Views({k: v.only(names) for k, v in self.views.items()})

    def images_for(self, spec) -> torch.Tensor:
        return self.views[(spec.channels, tuple(spec.size))].images

    def batch(self, index) -> dict:
        return {k: v.images[index] for k, v in self.views.items()}


def load_data_for(spec: str, split: str | None, inputs: list, *, default_split: str) -> "Dataset | Views":
    """Load ``spec`` for models or modules of the input specifications ``inputs``.

    Files are decoded straight to each input's channels and size (photos of mixed sizes included);
    with several distinct inputs, once per input (``Views``).
    """
    crops = {(s.channels, tuple(s.size)): s.crop_pct for s in inputs}
    keys = sorted(crops)

    def one(key):
        return load_data(spec, split, default_split=default_split, channels=key[0], size=key[1], crop_pct=crops[key])
    return one(keys[0]) if len(keys) == 1 else Views({k: one(k) for k in keys})


def load_data(spec: str, split: str | None = None, *, default_split: str = "train",
              channels: int | None = None, size: tuple[int, int] | None = None,
              crop_pct: float | None = None, stream: bool = False) -> "Dataset | ImageFiles":
    """Load the data set named by ``spec``; see the module docstring for the split rules.

    ``channels`` and ``size`` convert images while decoding files (folders and archives of
    images of mixed sizes need ``size``); with ``crop_pct`` a photo keeps its aspect ratio, its
    shorter side resized to size / crop_pct and its centre cropped (``InputSpec.crop_pct``).

    ``stream=True`` (with ``channels`` and ``size``): an image folder is listed, not decoded
    (``ImageFiles``: its images are read when a batch needs them); other data load as usual.

    >>> ds = load_data("mnist5k", "test")   # 1,000 images, 100 per class
    """
    from .builtin import BUILTIN
    from .folders import load_archive_or_folder

    if split is not None and split not in SPLITS:
        raise CnnmodError(f"expected a split among {', '.join(SPLITS)}, found {split!r}.")
    if spec in BUILTIN:
        ds = BUILTIN[spec](split or default_split)
    else:
        path = Path(spec)
        if not path.exists():
            raise CnnmodError(f"expected a data set name ({', '.join(BUILTIN)}), an image folder, "
                              f"a .tar/.tar.gz archive or a CIFAR pickle folder; found {spec!r}, "
                              "which is none of these and does not exist.")
        ds = _streamed(path, split, default_split, channels, size, crop_pct) if stream else None
        if ds is None:
            ds = load_archive_or_folder(path, split, default_split, channels=channels, size=size, crop_pct=crop_pct)
    if len(ds) == 0:
        raise CnnmodError(f"{spec}: the {split or default_split} split holds no images.")
    return ds


def _streamed(path: Path, split: str | None, default_split: str, channels, size, crop_pct):
    """An ``ImageFiles`` for an ImageFolder directory (None for archives, CIFAR pickles, unknown sizes)."""
    from .folders import _cifar_root, list_folder
    from .stream import ImageFiles

    if not path.is_dir() or channels is None or size is None:
        return None
    names = list_folder(path)
    if _cifar_root(set(names)) is not None:
        return None
    files = ImageFiles.scan(path, names, channels=channels, size=size, crop_pct=crop_pct)
    return choose_split(files, split or "all", lambda n: -(-n // 10), names=("train", "val"))


def split_per_class(labels: torch.Tensor, held_out: "callable[[int], int]") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kept, held-out) indices: per class, the last ``held_out(n_class)`` in order."""
    keep, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()  # already in file order
        k = held_out(len(idx))
        keep.append(idx[: len(idx) - k])
        hold.append(idx[len(idx) - k:])
    return torch.cat(keep).sort().values, torch.cat(hold).sort().values


def choose_split(ds, split: str, held_out: "callable[[int], int]", names=("train", "test")):
    """Return the named part of ``ds`` under the per-class hold-out rule."""
    if split == "all":
        return ds
    if split not in names:
        raise CnnmodError(f"{ds.name}: expected split {' or '.join(names)} (or all), found {split!r}.")
    kept, held = split_per_class(ds.labels, held_out)
    return ds.subset(kept if split == names[0] else held)


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, C) uint8 arrays into a (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
