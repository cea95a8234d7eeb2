"""Streamed image folders (issue #16): listed, not decoded; batches read by worker processes."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cnnmod import CnnmodError, InputSpec, decompose, load_data, save_checkpoint, save_module
from cnnmod.cli import main
from cnnmod.data import ImageFiles


def _photos(root, classes=("cat", "dog", "fox"), n=6, seed=0):
    """Colour-coded photos of several sizes and aspect ratios, some grey."""
    rng = np.random.default_rng(seed)
    sizes = [(20, 30), (32, 32), (40, 24), (18, 18)]
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = sizes[(i + k) % len(sizes)]
            arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            arr[..., k % 3] += 150
            img = Image.fromarray(arr)
            (img.convert("L") if i == 3 else img).save(root / name / f"{i}.png")
    return root


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4).flatten(1))


SPEC = InputSpec(3, (16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.875)


def test_a_streamed_folder_is_listed_not_decoded_and_reads_what_memory_holds(tmp_path):
    root = _photos(tmp_path / "p")
    files = load_data(str(root), channels=3, size=(16, 16), crop_pct=0.875, stream=True)
    memory = load_data(str(root), channels=3, size=(16, 16), crop_pct=0.875)
    assert isinstance(files, ImageFiles) and files.classes == memory.classes == ["cat", "dog", "fox"]
    assert torch.equal(files.labels, memory.labels)
    assert torch.equal(files.load(torch.arange(len(files))), memory.images)  # same decoding, grey made RGB
    val = load_data(str(root), "val", channels=3, size=(16, 16), stream=True)
    assert len(val) == 3 and val.files == ["cat/5.png", "dog/5.png", "fox/5.png"]  # the last 10% of each class
    (root / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(CnnmodError, match="cannot decode image cat/0.png"):
        files.load([0])


@pytest.mark.parametrize("strategy", ["paper", "channels"])
def test_streamed_data_gives_the_decomposition_of_data_in_memory(tmp_path, strategy):
    root = _photos(tmp_path / "p")
    torch.manual_seed(0)
    model = Tiny().eval()
    files = load_data(str(root), channels=3, size=(16, 16), crop_pct=0.875, stream=True)
    memory = load_data(str(root), channels=3, size=(16, 16), crop_pct=0.875)
    options = dict(strategy=strategy, input_spec=SPEC, classes=["cat", "dog", "fox"], calibration=2, positives=4,
                   batch_size=5)
    for k, (data, workers) in enumerate([(memory, 0), (files, 0), (files, 2)]):
        modules = decompose(model, data, workers=workers, **options)
        for m in modules:
            save_module(m, tmp_path / f"{k}_{m.class_name}.safetensors")
    for name in ("cat", "dog", "fox"):
        first = (tmp_path / f"0_{name}.safetensors").read_bytes()
        assert first == (tmp_path / f"1_{name}.safetensors").read_bytes()
        assert first == (tmp_path / f"2_{name}.safetensors").read_bytes()


def test_a_bad_photo_in_a_worker_is_one_sentence(tmp_path, capsys):
    root = _photos(tmp_path / "p")
    (root / "dog" / "2.png").write_bytes(b"broken")
    torch.manual_seed(0)
    save_checkpoint(Tiny(), tmp_path / "m.safetensors", classes=["cat", "dog", "fox"], input_spec=SPEC)
    code = main(["decompose", str(tmp_path / "m.safetensors"), "--data", str(root), "--out", str(tmp_path / "mods"),
                 "--workers", "2", "--batch-size", "4", "--positives", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot decode image dog/2.png" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "mods").exists()
    (root / "dog" / "2.png").unlink()
    assert main(["decompose", str(tmp_path / "m.safetensors"), "--data", str(root), "--out", str(tmp_path / "mods"),
                 "--workers", "2", "--batch-size", "4", "--positives", "4", "--json"]) == 0
