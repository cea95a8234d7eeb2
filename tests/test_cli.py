import json

import pytest

from cnnmod import load_data
from cnnmod.cli import main


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(out),
                 "--epochs", "2", "--lr", "0.05", "--batch-size", "64"]) == 0
    return out


def test_train_then_evaluate_json(digits_ckpt, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(digits_ckpt), "--data", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"top1", "top5", "n", "per_class", "kind", "classes"} and result["kind"] == "model"
    assert result["n"] == len(load_data("digits", "test")) == 364  # the default split of evaluate
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0
    assert set(result["per_class"]) == {str(d) for d in range(10)}


def test_evaluate_matches_classes_by_name(digits_ckpt, tmp_path, capsys):
    from PIL import Image

    from cnnmod import load_data

    ds = load_data("digits", "test")
    for label in (7, 3):  # a folder with only two of the classes, under their names
        (tmp_path / "d" / str(label)).mkdir(parents=True)
        for i, img in enumerate(ds.images[ds.labels == label][:5]):
            Image.fromarray(img[0].numpy()).save(tmp_path / "d" / str(label) / f"{i}.png")
    capsys.readouterr()
    assert main(["evaluate", str(digits_ckpt), "--data", str(tmp_path / "d"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10 and set(result["per_class"]) == {"3", "7"}


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "nope.safetensors", "--data", "digits"], "no such file"),
    (["train", "--model", "vgg99", "--data", "digits", "--out", "x.safetensors"], "invalid choice: 'vgg99'"),
    (["train", "--model", "smallcnn", "--data", "imagenet", "--out", "x.safetensors"], "expected a data set name"),
])
def test_bad_input_is_one_sentence_and_nonzero(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_data_with_classes_the_model_lacks(digits_ckpt, image_folder, capsys):
    assert main(["evaluate", str(digits_ckpt), "--data", str(image_folder)]) == 2
    assert "found unknown class(es) 'ant'" in capsys.readouterr().err


def test_a_pickle_is_refused_without_unpickling(tmp_path, capsys):
    import torch

    evil = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, evil)
    assert main(["evaluate", str(evil), "--data", "digits"]) == 2
    assert "never unpickles" in capsys.readouterr().err
