import json

import pytest

from cnnmod import load_data
from cnnmod.cli import main
from cnnmod.modules import load_module, save_module
from cnnmod.modules.shared import module_files


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_decompose_writes_one_file_per_class_and_a_summary(decomposed, tmp_path, capsys):
    root, ckpt, mods = decomposed
    assert sorted(p.name for p in module_files(mods)) == [f"{d}.safetensors" for d in range(10)]
    assert len(list(mods.glob("_parent-*.safetensors"))) == 1  # the parent's tensors, shared by the ten
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "again"), "--json"]) == 0
    summary = _json(capsys)
    assert summary["strategy"] == "paper"
    assert summary["images"] == len(load_data("digits", "train"))  # fewer than 1000 per class: all
    assert set(summary["modules"]) == {str(d) for d in range(10)}
    assert all(0.5 < m["share_kept"] <= 1.0 for m in summary["modules"].values())
    for d in range(10):  # byte-identical wherever written
        assert (tmp_path / "again" / f"{d}.safetensors").read_bytes() == (mods / f"{d}.safetensors").read_bytes()


def test_modules_evaluate_like_the_model(decomposed, capsys):
    _, ckpt, mods = decomposed
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", "digits", "--json"]) == 0
    model = _json(capsys)
    assert main(["evaluate", str(mods), "--data", "digits", "--json"]) == 0
    composed = _json(capsys)
    assert {"top1", "top5", "n", "per_class"} <= set(composed) and composed["n"] == model["n"]
    assert composed["rule"] == "vote" and composed["left_out"] == 0
    assert abs(composed["top1"] - model["top1"]) <= 0.02


def test_compose_reuse_and_replace(decomposed, tmp_path, capsys):
    _, _, mods = decomposed
    pair = tmp_path / "pair.safetensors"
    assert main(["compose", str(mods / "3.safetensors"), str(mods / "8.safetensors"), "--out", str(pair)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(pair), "--data", "digits", "--classes", "3,8", "--json"]) == 0
    result = _json(capsys)
    assert set(result["per_class"]) == {"3", "8"} and result["top1"] > 0.8
    assert main(["replace", str(mods), "--with", str(mods / "5.safetensors"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "5.safetensors").read_bytes() == (mods / "5.safetensors").read_bytes()
    assert main(["inspect", str(mods / "5.safetensors")]) == 0
    assert "class '5' (index 5 of 10" in capsys.readouterr().out
    assert main(["inspect", str(pair), "--json"]) == 0
    assert [m["class_name"] for m in _json(capsys)["modules"]] == ["3", "8"]


def _one_line_error(capsys, text):
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_input(decomposed, tmp_path, capsys):
    _, ckpt, mods = decomposed
    stranger = load_module(mods / "5.safetensors")
    stranger.class_name = "zebra"
    save_module(stranger, tmp_path / "zebra.safetensors")
    assert main(["replace", str(mods), "--with", str(tmp_path / "zebra.safetensors"), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "found one for class 'zebra'")
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--data", "digits"]) == 2
    _one_line_error(capsys, "expected module files (*.safetensors), found none")
    assert main(["compose", str(mods / "3.safetensors"), str(mods / "3.safetensors"), "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "found class '3' more than once")
    assert main(["compose", str(mods / "3.safetensors"), str(mods / "8.safetensors"), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()  # a composition is evaluated on its own classes' images; the rest are left out
    assert main(["evaluate", str(tmp_path / "p"), "--data", "digits", "--json"]) == 0
    result = _json(capsys)
    assert set(result["per_class"]) == {"3", "8"} and result["left_out"] == 364 - result["n"] > 0
    assert main(["evaluate", str(tmp_path / "p"), "--data", "digits", "--classes", "3,zebra"]) == 2
    _one_line_error(capsys, "expected --classes among the composition's classes (3, 8), found 'zebra'")
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "x"), "--strategy", "magic"]) == 2
    _one_line_error(capsys, "argument --strategy: invalid choice: 'magic' (choose from 'paper', 'channels')")
    assert main(["evaluate", str(ckpt), str(mods / "3.safetensors"), "--data", "digits"]) == 2
    _one_line_error(capsys, "expected a module file among several files")


def _colour_folder(root, classes, n=24, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
            arr[..., k % 3] += 150  # red, green or blue dominates
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_modules_of_different_inputs_compose_and_adapt(decomposed, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    _, _, digit_mods = decomposed
    _colour_folder(tmp_path / "colours", ["red", "green", "blue"])
    ckpt = tmp_path / "colours.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", str(tmp_path / "colours"), "--out", str(ckpt),
                 "--epochs", "3", "--lr", "0.05", "--batch-size", "16"]) == 0
    assert main(["decompose", str(ckpt), "--data", str(tmp_path / "colours"), "--out", str(tmp_path / "cm")]) == 0

    # mixed raw images: grey 8x8 digits "3" and colour 8x8 "red" images, in one folder
    mixed = tmp_path / "mixed"
    _colour_folder(mixed, ["red"], n=10, seed=1)
    (mixed / "3").mkdir()
    for i, img in enumerate(load_data("digits", "test").images[load_data("digits", "test").labels == 3][:10]):
        Image.fromarray(np.asarray(img[0])).save(mixed / "3" / f"{i}.png")
    out = tmp_path / "mixed.safetensors"
    assert main(["compose", str(digit_mods / "3.safetensors"), str(tmp_path / "cm" / "red.safetensors"),
                 "--adapt-data", str(mixed), "--unknown-below", "0.01", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(mixed), "--json"]) == 0
    result = _json(capsys)
    assert result["n"] == 20 and set(result["per_class"]) == {"3", "red"} and "unknown" in result
    assert result["top1"] >= 0.9


def test_a_module_cannot_take_images_it_cannot_convert(decomposed):
    import torch

    from cnnmod import CnnmodError, compose

    _, _, mods = decomposed
    clf = compose([load_module(mods / "3.safetensors"), load_module(mods / "8.safetensors")])
    with pytest.raises(CnnmodError, match="expected images with 1 channel"):
        clf.score_images(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
