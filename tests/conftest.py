import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # deterministic and fair to the other core


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class ImageFolder of 6x6 RGB PNGs with known pixel values (4 images per class)."""
    root = tmp_path / "imgs" / "train"
    for c, name in enumerate(["cat", "ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = np.full((6, 6, 3), 10 * c + i, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return tmp_path / "imgs"
