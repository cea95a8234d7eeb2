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


@pytest.fixture(scope="session")
def decomposed(tmp_path_factory):
    """A smallcnn trained on digits and its module directory, shared read-only by the tests."""
    from cnnmod.cli import main

    root = tmp_path_factory.mktemp("dec")
    ckpt = root / "digits.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(ckpt),
                 "--epochs", "2", "--lr", "0.05", "--batch-size", "64"]) == 0
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(root / "mods"), "--json"]) == 0
    return root, ckpt, root / "mods"
