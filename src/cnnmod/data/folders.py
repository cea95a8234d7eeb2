"""Image folders (ImageFolder layout), tar archives of them, and CIFAR pickle folders."""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import CnnmodError
from .inputspec import resized_size
from .sources import Dataset, choose_split, stack_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CIFAR_MARKERS = ("data_batch_1", "train")


def load_archive_or_folder(path: Path, split: str | None, default_split: str, *,
                           channels: int | None, size: tuple[int, int] | None,
                           crop_pct: float | None = None) -> Dataset:
    """Read ``path`` (a folder or .tar/.tar.gz) holding an ImageFolder tree or CIFAR pickles."""
    files = _list_files(path)  # relative posix path -> zero-argument reader of the bytes
    cifar = _cifar_root(files)
    if cifar is not None:
        return _load_cifar(path, files, cifar, split or default_split)
    ds = _load_image_folder(path, files, channels=channels, size=size, crop_pct=crop_pct)
    return choose_split(ds, split or "all", lambda n: -(-n // 10), names=("train", "val"))


def list_folder(path: Path) -> list[str]:
    """The files under ``path`` as sorted relative posix paths. ``os.scandir`` knows from the
    directory entries which are files, so a folder of a million photos is listed in seconds."""
    names, pending = [], [("", path)]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):  # as rglob: no loops through links
                    pending.append((prefix + entry.name + "/", entry.path))
                elif entry.is_file():
                    names.append(prefix + entry.name)
    return sorted(names)


def _list_files(path: Path) -> dict[str, "callable[[], bytes]"]:
    if path.is_dir():
        return {name: (path / name).read_bytes for name in list_folder(path)}
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CnnmodError(f"{path}: expected a folder or a .tar/.tar.gz archive, found a file that "
                          f"is neither ({e}).") from None
    with tar:
        # Read members in stream order: seeking backwards in a .tar.gz is slow.
        blobs = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return {name: (lambda b=blob: b) for name, blob in sorted(blobs.items())}


def _load_image_folder(path: Path, files: dict, *, channels: int | None, size, crop_pct: float | None) -> Dataset:
    images, labels, classes = index_image_folder(path, files)
    arrays = [_decode(path, name, files[name](), channels, size, crop_pct) for name in images]
    arrays = _unify(path, images, arrays)
    return Dataset(stack_images(arrays), torch.tensor(labels, dtype=torch.int64), classes, str(path))


def index_image_folder(path: Path, files) -> tuple[list[str], list[int], list[str]]:
    """(image file names, their labels, class names) of an ImageFolder tree, nothing decoded.

    String operations on the "/"-separated names, not PurePosixPath: a folder of a million files
    is indexed in seconds (issue #16)."""
    images = sorted(n for n in files if posixpath.splitext(n)[1].lower() in IMAGE_SUFFIXES)
    if not images:
        raise CnnmodError(f"{path}: expected images in class sub-folders, found no image files.")
    parts = [n.split("/") for n in images]
    root = _common_root(parts)
    depth = len(root.parts) if str(root) != "." else 0
    if any(len(p) - depth < 2 for p in parts):
        raise CnnmodError(f"{path}: expected one sub-folder per class, found images outside class folders.")
    class_of = {n: p[depth] for n, p in zip(images, parts)}
    classes = sorted(set(class_of.values()))
    if path.is_dir():
        for sub in sorted((path / root).iterdir()):
            if sub.is_dir() and sub.name not in class_of.values():
                raise CnnmodError(f"{path}: class folder {sub.name!r} holds no images.")
    index = {c: i for i, c in enumerate(classes)}
    return images, [index[class_of[name]] for name in images], classes


def _common_root(parts: list[list[str]]) -> PurePosixPath:
    """The deepest folder above every class folder (``cifar10/train`` in the CIFAR archive), of
    files given as their path parts."""
    parents = [p[:-1] for p in parts]
    common = []
    for level in zip(*parents):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # With a single class every image shares its class folder too: step back out of it.
    if len(common) == min(len(p) for p in parents) and common:
        common = common[:-1]
    return PurePosixPath(*common) if common else PurePosixPath(".")


def _decode(path: Path, name: str, blob: bytes, channels: int | None, size,
            crop_pct: float | None = None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if channels is not None:
                img = img.convert("L" if channels == 1 else "RGB")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")  # palette, CMYK, alpha: documented conversion to RGB
            if size is not None and img.size != (size[1], size[0]):
                img = _fit(img, size, crop_pct)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CnnmodError(f"{path}: cannot decode image {name} ({e}).") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _fit(img, size: tuple[int, int], crop_pct: float | None):
    """Resize to ``size``; with ``crop_pct`` keep the aspect ratio and crop the centre (as InputSpec.prepare)."""
    h, w = resized_size(img.size[1], img.size[0], size, crop_pct)
    img = img.resize((w, h), Image.BILINEAR)
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return img.crop((left, top, left + size[1], top + size[0])) if (h, w) != tuple(size) else img


def _unify(path: Path, names: list[str], arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Grey images among colour ones become RGB (documented); sizes must already agree."""
    shape = arrays[0].shape[:2]
    for name, a in zip(names, arrays):
        if a.shape[:2] != shape:
            raise CnnmodError(f"{path}: expected all images to be {shape[0]}x{shape[1]} (as {names[0]}), "
                              f"found {a.shape[0]}x{a.shape[1]} in {name}; pass --size H W to resize them "
                              "(size=(H, W) in load_data).")
    if any(a.shape[2] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return arrays


class _ArraysOnly(pickle.Unpickler):
    """Unpickle CIFAR batches: builtin containers and numpy arrays only; nothing else runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


def _unpickle_arrays(path: Path, name: str, blob: bytes) -> dict:
    try:
        d = _ArraysOnly(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any malformed pickle: report it as a data error
        raise CnnmodError(f"{path}: {name} is not a CIFAR data batch ({type(e).__name__}: {e}).") from None
    if not isinstance(d, dict):
        raise CnnmodError(f"{path}: {name} is not a CIFAR data batch (expected a dict).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_root(files) -> str | None:
    for name in files:
        folder, base = posixpath.split(name)
        if base == "data_batch_1" or (base == "train" and posixpath.join(folder, "meta") in files):
            return folder or "."
    return None


def _load_cifar(path: Path, files: dict, root: str, split: str) -> Dataset:
    def read(name):
        return _unpickle_arrays(path, name, files[f"{root}/{name}" if root != "." else name]())

    def names(values):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]

    cifar10 = any(PurePosixPath(n).name == "data_batch_1" for n in files)
    if split not in ("train", "test", "all"):
        raise CnnmodError(f"{path}: expected split train, test or all for a CIFAR folder, found {split!r}.")
    if cifar10:
        classes = names(read("batches.meta")["label_names"])
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        classes = names(read("meta")["fine_label_names"])
        parts = {"train": ["train"], "test": ["test"]}
        key = "fine_labels"
    chosen = parts["train"] + parts["test"] if split == "all" else parts[split]
    batches = [read(n) for n in chosen]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    return Dataset(torch.from_numpy(data.copy()), torch.from_numpy(labels), classes, str(path))
