import pytest
import torch

import cnnmod.training as train_mod
from cnnmod import CnnmodError, TrainConfig, load_data, load_model, train
from cnnmod.training import augment_batch

TINY = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=3)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "train")


def test_training_is_deterministic_and_round_trips(digits, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    meta = train("smallcnn", digits, a, TINY, progress=False)
    train("smallcnn", digits, b, TINY, progress=False)
    assert a.read_bytes() == b.read_bytes()  # same seed and data: same bytes
    model = load_model(a)
    assert not model.training
    m = model.cnnmod_meta
    assert m["architecture"] == "smallcnn" and m["arch_args"]["image_size"] == 8
    assert m["classes"] == [str(d) for d in range(10)]
    assert m["input"]["channels"] == 1 and m["input"]["size"] == [8, 8]
    assert m["seed"] == 3 and m["data_fingerprint"] == digits.fingerprint()
    assert m["accuracy"]["top1"] == meta["accuracy"]["top1"] > 0.5
    assert not (tmp_path / "a.safetensors.resume.safetensors").exists()


def test_interrupted_training_resumes_to_the_same_weights(digits, tmp_path, monkeypatch):
    full, resumed = tmp_path / "full.safetensors", tmp_path / "resumed.safetensors"
    train("smallcnn", digits, full, TINY, progress=False)
    real_epoch, calls = train_mod._train_epoch, []

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train("smallcnn", digits, resumed, TINY, progress=False)
    assert not resumed.exists()
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    train("smallcnn", digits, resumed, TINY, progress=False, resume=True)
    assert resumed.read_bytes() == full.read_bytes()


def test_resume_with_other_options_is_refused(digits, tmp_path):
    out = tmp_path / "m.safetensors"
    train_mod._save_state(out.with_name(out.name + ".resume.safetensors"),
                          torch.nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)], lr=1),
                          torch.Generator(), TINY, 1)
    with pytest.raises(CnnmodError, match="same training options"):
        train("smallcnn", digits, out, TrainConfig(epochs=5), progress=False, resume=True)


def test_augmentation_crops_and_flips_exactly():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, gen, "crop-flip", pad=1)
    assert out.shape == x.shape
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    windows = [padded[..., i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    assert any(torch.equal(out, w) or torch.equal(out, w.flip(3)) for w in windows)
    assert torch.equal(augment_batch(x, gen, "none"), x)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from cnnmod.files import write_file

    write_file(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"format": "t", "format_version": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
