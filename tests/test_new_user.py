"""What a new user hit (issue #14): lost files, silent wrong answers, tracebacks, missing views."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from cnnmod import CnnmodError, compose, decompose, load_data, load_model, load_module
from cnnmod.cli import main


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _one_line_error(capsys, text):
    err = capsys.readouterr().err
    assert text in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# 1. Writers never delete or overwrite what cnnmod did not write.

def test_decompose_refuses_a_folder_of_other_files_and_touches_nothing(decomposed, tmp_path, capsys):
    _, ckpt, _ = decomposed
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "notes.txt").write_text("hi")
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "d" / "sub"), "--only", "7"]) == 2
    _one_line_error(capsys, "found 'notes.txt'; cnnmod never deletes or overwrites files it did not write")
    assert sorted(p.name for p in (tmp_path / "d" / "sub").iterdir()) == ["notes.txt"]
    assert (tmp_path / "d" / "sub" / "notes.txt").read_text() == "hi"


def test_decompose_only_into_a_module_folder_keeps_the_other_modules(decomposed, tmp_path, capsys):
    import shutil

    _, ckpt, mods = decomposed
    folder = tmp_path / "mods"
    shutil.copytree(mods, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(folder), "--only", "7", "--json"]) == 0
    summary = _json(capsys)
    assert list(summary["files"]) == [str(folder.resolve() / "7.safetensors")]
    assert summary["files"][str(folder.resolve() / "7.safetensors")] == (folder / "7.safetensors").stat().st_size
    assert len(summary["kept"]) == 9
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(after) == set(before)  # the other 9 modules are still there, untouched
    assert all(after[n] == before[n] for n in after if n != "7.safetensors")
    # replace writes into a module folder the same way: only the class it replaces changes
    assert main(["replace", str(folder), "--with", str(mods / "5.safetensors"), "--out", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == set(before)


def test_file_writers_refuse_to_overwrite_foreign_files(decomposed, tmp_path, capsys):
    _, ckpt, mods = decomposed
    foreign = tmp_path / "precious.safetensors"
    foreign.write_bytes(b"not ours")
    pair = [str(mods / "3.safetensors"), str(mods / "8.safetensors")]
    assert main(["compose", *pair, "--out", str(foreign)]) == 2
    _one_line_error(capsys, "exists and is not a cnnmod file; cnnmod never overwrites a file it did not write")
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(foreign), "--epochs", "1"]) == 2
    _one_line_error(capsys, "is not a cnnmod file")
    assert main(["compose", *pair, "--out", str(ckpt)]) == 2  # a cnnmod file of another kind
    _one_line_error(capsys, "expected to replace a cnnmod.composed file, found a cnnmod.checkpoint file")
    onnx_out = tmp_path / "model.onnx"
    onnx_out.write_bytes(b"my own onnx")
    assert main(["export", pair[0], "--onnx", str(onnx_out)]) == 2
    _one_line_error(capsys, "is not an ONNX file cnnmod exported")
    assert foreign.read_bytes() == b"not ours" and onnx_out.read_bytes() == b"my own onnx"
    # what cnnmod wrote, it may write again
    assert main(["compose", *pair, "--out", str(tmp_path / "c.safetensors")]) == 0
    assert main(["compose", *pair, "--out", str(tmp_path / "c.safetensors")]) == 0


def test_output_folders_get_the_users_permissions(decomposed, tmp_path):
    _, _, mods = decomposed
    old = os.umask(0o022)
    try:
        assert main(["replace", str(mods), "--with", str(mods / "5.safetensors"), "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "r" / "5.safetensors").stat().st_mode) == 0o644
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]  # no staging left behind


# 2. Modules from prepared tensors never silently expect other inputs.

def test_modules_of_prepared_tensors_refuse_raw_images_unless_told_how(decomposed):
    _, ckpt, _ = decomposed
    model = load_model(ckpt)
    data = load_data("digits", "train")
    spec = model.input_spec
    prepared = torch.utils.data.TensorDataset(spec.prepare(data.images), data.labels)
    model_without_spec = load_model(ckpt)
    del model_without_spec.input_spec  # a plain nn.Module, as a user's own model
    m = decompose(model_without_spec, prepared, only=["3"], calibration=0)[0]
    assert m.input_spec.prepared
    raw = load_data("digits", "test").images[:4]
    with pytest.raises(CnnmodError, match="input_spec="):
        compose([m, m.__class__(8, "8", m.network, m.input_spec, m.meta)]).score_images(raw)
    assert m.margin(spec.prepare(raw)).shape == (4,)  # prepared tensors still work
    told = decompose(model_without_spec, prepared, only=["3"], calibration=0, input_spec=spec)[0]
    assert told.input_spec == spec and not told.input_spec.prepared
    assert torch.equal(told.margin(told.input_spec.prepare(raw)), m.margin(spec.prepare(raw)))


# 4. Every bad numeric value: exit 2, one line, no traceback, nothing written.

@pytest.mark.parametrize("argv, message", [
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--positives", "0"],
     "argument --positives: expected a whole number >= 1, found 0"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--positives", "-5"],
     "argument --positives: expected a whole number >= 1, found -5"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--negatives-per-class", "-1"],
     "argument --negatives-per-class: expected a whole number >= 0, found -1"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--keep", "0.5"],
     "expected --keep only with --strategy channels, found it with --strategy paper"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--strategy", "channels", "--delta", "0.3"],
     "expected --delta only with --strategy paper"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--strategy", "channels", "--keep", "nan"],
     "argument --keep: expected a share"),
    (["decompose", "CKPT", "--data", "digits", "--out", "."], "expected an empty folder or a folder of cnnmod"),
    (["decompose", "CKPT", "--data", "digits", "--out", "o", "--only", "3,zebra"], "found zebra"),
    (["train", "--model", "smallcnn", "--data", "digits", "--out", "m.safetensors", "--lr", "-1"],
     "argument --lr: expected a number > 0, found -1"),
    (["train", "--model", "smallcnn", "--data", "digits", "--out", "m.safetensors", "--epochs", "0"],
     "argument --epochs: expected a whole number >= 1, found 0"),
    (["train", "--model", "smallcnn", "--data", "digits", "--out", "m.safetensors", "--size", "0", "8"],
     "argument --size: expected a whole number >= 1, found 0"),
    (["compose", "MODS/3.safetensors", "--out", "c.safetensors"], "expected at least two modules to compose, found 1"),
    (["compose", "MODS", "--out", "c.safetensors", "--unknown-below", "1.5"],
     "argument --unknown-below: expected a probability > 0 and < 1, found 1.5"),
    (["compose", "MODS", "--out", "c.safetensors", "--fit-per-class", "0"], "argument --fit-per-class"),
    (["evaluate", "CKPT", "--data", "digits", "--classes", "3,zebra"],
     "expected --classes among the model's classes (0, 1, 2"),
    (["evaluate", "CKPT", "--data", "digits", "--classes", ","], "expected comma-separated class names"),
    (["evaluate", "MODS/3.safetensors", "--data", "digits", "--confusion"], "found a single module"),
    (["demo", "--epochs", "0"], "argument --epochs: expected a whole number >= 1, found 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_values_are_one_sentence(decomposed, tmp_path, monkeypatch, capsys, argv, message):
    _, ckpt, mods = decomposed
    (tmp_path / "mine.txt").write_text("a file of the user's")  # so that "." is not an empty folder
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("CKPT", str(ckpt)).replace("MODS", str(mods)) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # nothing written


# 5. and 6. Photos of mixed sizes: --size for training; per-module preparation for evaluation.

def _colour_folder(root, classes, n, size, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[..., k % 3] += 150
            Image.fromarray(arr).save(root / name / f"{size}_{i}.png")


def test_modules_of_different_inputs_evaluate_on_a_folder_of_mixed_images(decomposed, tmp_path, capsys):
    _, _, digit_mods = decomposed
    colours = tmp_path / "colours"
    _colour_folder(colours, ["red", "green", "blue"], 16, size=12)
    _colour_folder(colours, ["red", "green", "blue"], 4, size=10, seed=1)  # mixed sizes: --size says how
    ckpt = tmp_path / "colours.safetensors"
    args = ["train", "--model", "smallcnn", "--data", str(colours), "--out", str(ckpt), "--epochs", "3",
            "--lr", "0.05", "--batch-size", "16"]
    assert main(args) == 2
    _one_line_error(capsys, "pass --size H W to resize them")
    assert main(args + ["--size", "12", "12"]) == 0
    assert load_model(ckpt).input_spec.size == (12, 12)
    assert main(["decompose", str(ckpt), "--data", str(colours), "--out", str(tmp_path / "cm")]) == 0

    mixed = tmp_path / "mixed"  # 8x8 grey digits and 12x12 colour images in one folder
    _colour_folder(mixed, ["red"], 10, size=12, seed=2)
    (mixed / "3").mkdir()
    test = load_data("digits", "test")
    for i, img in enumerate(test.images[test.labels == 3][:10]):
        Image.fromarray(img[0].numpy()).save(mixed / "3" / f"{i}.png")
    out = tmp_path / "mixed.safetensors"
    assert main(["compose", str(digit_mods / "3.safetensors"), str(tmp_path / "cm" / "red.safetensors"),
                 "--fit-data", str(mixed), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(mixed), "--json"]) == 0
    result = _json(capsys)
    assert result["n"] == 20 and set(result["per_class"]) == {"3", "red"} and result["top1"] >= 0.9


# 7. and 8. A reuse needs only its own classes; fitting needs every composed class.

def test_only_needs_just_the_named_classes_images(decomposed, tmp_path, capsys):
    _, ckpt, _ = decomposed
    test = load_data("digits", "train")
    data = tmp_path / "two"
    for label in (3, 7):
        (data / str(label)).mkdir(parents=True)
        for i, img in enumerate(test.images[test.labels == label][:40]):
            Image.fromarray(img[0].numpy()).save(data / str(label) / f"{i}.png")
    capsys.readouterr()
    assert main(["decompose", str(ckpt), "--data", str(data), "--out", str(tmp_path / "m"), "--only", "3,7"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 modules" in out and "negatives: 80 images, of which 0 from 0 other classes" in out
    assert main(["decompose", str(ckpt), "--data", str(data), "--out", str(tmp_path / "n"), "--only", "3,8"]) == 2
    _one_line_error(capsys, "expected images of every class to decompose, found none of 8.")


def test_fit_data_must_hold_every_composed_class(decomposed, tmp_path, capsys):
    _, _, mods = decomposed
    (tmp_path / "cats" / "3").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "cats" / "3" / f"{i}.png")
    assert main(["compose", str(mods / "3.safetensors"), str(mods / "8.safetensors"), "--fit-data",
                 str(tmp_path / "cats"), "--out", str(tmp_path / "c.safetensors")]) == 2
    _one_line_error(capsys, "expected images of every composed class in the fitting data, found none of 8")


# 9.-12. The views a user expects.

def test_model_restricted_to_some_classes_is_the_argmax_over_their_logits(decomposed, capsys):
    _, ckpt, _ = decomposed
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", "digits", "--classes", "3,8", "--json"]) == 0
    result = _json(capsys)
    model, test = load_model(ckpt), load_data("digits", "test").only(["3", "8"])
    with torch.no_grad():
        answer = model(model.input_spec.prepare(test.images))[:, [3, 8]].argmax(1)
    assert result["top1"] == round(float((answer == test.labels).float().mean()), 6)
    assert result["n"] == len(test) and result["classes"] == ["3", "8"] and set(result["per_class"]) == {"3", "8"}


def test_a_single_module_is_judged_as_a_binary_classifier(decomposed, capsys):
    _, _, mods = decomposed
    capsys.readouterr()
    assert main(["evaluate", str(mods / "3.safetensors"), "--data", "digits", "--json"]) == 0
    r = _json(capsys)
    m, test = load_module(mods / "3.safetensors"), load_data("digits", "test")
    said = m.margin(m.input_spec.prepare(test.images)) > 0
    truth = test.labels == 3
    tp = int((said & truth).sum())
    assert r["counts"]["tp"] == tp and r["positives"] == int(truth.sum()) and r["n"] == len(test)
    assert r["precision"] == round(tp / int(said.sum()), 6) and r["recall"] == round(tp / int(truth.sum()), 6)
    p, rc = tp / int(said.sum()), tp / int(truth.sum())
    assert r["f1"] == round(2 * p * rc / (p + rc), 6) and r["accuracy"] == round(int((said == truth).sum()) / len(test), 6)
    assert main(["evaluate", str(mods / "3.safetensors"), "--data", "digits"]) == 0
    assert "precision" in capsys.readouterr().out


def test_confusion_matrix_and_plot(decomposed, tmp_path, capsys):
    _, _, mods = decomposed
    capsys.readouterr()
    png = tmp_path / "eval.png"
    assert main(["evaluate", str(mods), "--data", "digits", "--confusion", "--json", "--plot", str(png)]) == 0
    r = _json(capsys)
    matrix = torch.tensor(r["confusion"]["matrix"])
    assert matrix.shape == (10, 10) and int(matrix.sum()) == r["n"]
    assert r["confusion"]["true"] == r["confusion"]["predicted"] == [str(d) for d in range(10)]
    assert round(int(matrix.diagonal().sum()) / r["n"], 6) == r["top1"]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.info.get("Software") == "cnnmod"
    assert main(["evaluate", str(mods), "--data", "digits", "--confusion", "--plot", str(png)]) == 0  # ours: replaced
    assert "confusion matrix (rows: true class, columns: answer)" in capsys.readouterr().out


def test_inspect_a_module_folder(decomposed, capsys):
    _, _, mods = decomposed
    capsys.readouterr()
    assert main(["inspect", str(mods)]) == 0
    text = capsys.readouterr().out
    assert "10 module files" in text and "bytes on disk" in text and "calibration a, b" in text
    assert main(["inspect", str(mods), "--json"]) == 0
    rows = _json(capsys)["modules"]
    assert [r["class"] for r in rows] == [str(d) for d in range(10)]
    assert all(r["file_bytes"] == (mods / r["file"]).stat().st_size and r["macs"] > 0 for r in rows)


# 13. Help, version, plurals, rounded JSON.

def test_help_shows_choices_and_defaults_and_version(capsys):
    assert main(["decompose", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "{paper,channels}" in text and "(default: 1000)" in text and "(default: None)" not in text
    assert main(["train", "--help"]) == 0
    assert "{resnet20,resnet32,resnet56,smallcnn}" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "one module per class" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("cnnmod 0.")


def test_one_module_is_singular_and_json_is_rounded(decomposed, tmp_path, capsys):
    _, ckpt, _ = decomposed
    capsys.readouterr()
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "one"), "--only", "4"]) == 0
    assert "wrote 1 module to" in capsys.readouterr().out
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "two"), "--only", "4",
                 "--strategy", "channels", "--json"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text)
    assert "macs_fraction" in summary["modules"]["4"] and "flops" not in text
    numbers = [v for m in summary["modules"].values() for v in m.values() if isinstance(v, float)]
    assert numbers and all(len(repr(v).lstrip("0.").replace(".", "")) <= 7 for v in numbers)


def test_a_module_alone_is_also_judged_at_its_own_threshold(decomposed, capsys):
    from cnnmod.modules.calibration import best_threshold

    _, _, mods = decomposed
    capsys.readouterr()
    assert main(["evaluate", str(mods / "3.safetensors"), "--data", "digits", "--json"]) == 0
    r = _json(capsys)
    m, test = load_module(mods / "3.safetensors"), load_data("digits", "test")
    t = m.meta["calibration"]["threshold"]
    said, truth = m.margin(m.input_spec.prepare(test.images)) > t, test.labels == 3
    assert r["at_threshold"]["threshold"] == t and r["at_threshold"]["counts"]["tp"] == int((said & truth).sum())
    assert r["at_threshold"]["counts"]["fp"] == int((said & ~truth).sum())
    assert main(["evaluate", str(mods / "3.safetensors"), "--data", "digits"]) == 0
    assert "its own threshold" in capsys.readouterr().out
    # oracle: the threshold is the best F1 over every cut between the margins
    gen = torch.Generator().manual_seed(0)
    margins, positive = torch.randn(200, generator=gen), torch.rand(200, generator=gen) < 0.2
    margins[positive] += 1.0

    def f1(cut):
        said = margins > cut
        tp = int((said & positive).sum())
        return 2 * tp / (int(said.sum()) + int(positive.sum()))

    best = max(f1(c) for c in margins.tolist() + [float(margins.min()) - 1])
    assert f1(best_threshold(margins, positive)) == pytest.approx(best)
