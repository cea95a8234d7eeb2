"""Repair after replace: only the confused modules change, and only when the held-out loss falls."""

import hashlib

import pytest
import torch

from cnnmod import CnnmodError, Dataset, TrainConfig, compose, decompose, load_data, load_model, train
from cnnmod.compose import RepairOptions, load_modules, repair_, replace
from cnnmod.compose.fit import fit_composition
from cnnmod.compose.repair import confused_classes
from cnnmod.modules import load_module
from cnnmod.modules.pipeline import write_modules


@pytest.fixture(scope="module")
def weak(decomposed, tmp_path_factory):
    """A smallcnn trained on digits with only 10% of the 5s, its module folder, and the healthy 5 module."""
    root = tmp_path_factory.mktemp("weak")
    data = load_data("digits", "train")
    fives = torch.nonzero(data.labels == 5).flatten()
    keep = torch.ones(len(data.labels), dtype=torch.bool)
    keep[fives[len(fives) // 10:]] = False
    weak_data = data.subset(torch.nonzero(keep).flatten())
    ckpt = root / "weak.safetensors"
    train("smallcnn", weak_data, ckpt, TrainConfig(epochs=2, lr=0.05, batch_size=64, seed=0), progress=False)
    write_modules(decompose(load_model(ckpt), weak_data), root / "mods")
    _, _, healthy = decomposed
    return root / "mods", healthy / "5.safetensors", weak_data


def _replaced(mods, healthy_five, claim=3.0):
    """The weak modules with the healthy 5 swapped in, its score shifted up by ``claim`` (log-odds):
    a new module that claims other classes' images, as one from a healthier model can."""
    modules = replace(load_modules(mods), load_module(healthy_five))
    modules[5].meta["calibration"]["b"] += claim
    return modules


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}


def test_confused_classes_reads_both_directions_of_the_confusion_matrix():
    # 3 classes, class 2 new: class 0 loses 1 of its 4 images to it, 2 loses 2 of its 4 to class 1.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    answers = torch.tensor([0, 0, 0, 2, 1, 1, 1, 1, 2, 2, 1, 1])
    scores = torch.nn.functional.one_hot(answers, 3).float()
    assert confused_classes(scores, labels, 2, ["a", "b", "c"], 0.2) == {"b": 0.5, "a": 0.25}
    assert confused_classes(scores, labels, 2, ["a", "b", "c"], 0.3) == {"b": 0.5}


def test_restricted_joint_fit_holds_the_other_scalars_exactly_and_lowers_the_loss():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3000, 3, generator=gen) * 2
    y = torch.multinomial(torch.softmax(m * torch.tensor([1.0, 2.0, 0.5]), 1), 1, generator=gen)[:, 0]
    a0, b0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    free = torch.tensor([False, True, True])
    a, b = fit_composition(m, y, a0, b0, free=free)
    assert a[0] == a0[0] and b[0] == b0[0]  # held: bit for bit

    def loss(a, b):
        return float(torch.nn.functional.cross_entropy(m.double() * a + b, y))
    assert loss(a, b) < loss(a0, b0) - 0.05
    assert abs(float(a[1]) - 2.0) < 0.3  # the free module's scale is found


def test_repair_changes_only_the_confused_modules_and_lowers_the_held_out_loss(weak, tmp_path):
    mods, healthy_five, data = weak
    write_modules(_replaced(mods, healthy_five), tmp_path / "before")
    before = _digests(tmp_path / "before")
    modules = _replaced(mods, healthy_five)
    report = repair_(modules, "5", data, RepairOptions(method="train", per_class=60, check_per_class=40,
                                                         epochs=2, lr=3e-4, batch_size=32))
    assert report["confused"] and "5" not in report["confused"]
    assert report["kept"] == ["train", "calibrate"]
    assert report["check_loss_after"] < 0.8 * report["check_loss_before"]
    assert report["steps"] == 2 * -(-report["images"] // 32)  # the budget: 2 passes over the fitting images
    write_modules(modules, tmp_path / "after")
    after = _digests(tmp_path / "after")
    touched = {f"{c}.safetensors" for c in report["confused"]} | {"5.safetensors"}
    for name, digest in before.items():
        if name not in touched and not name.startswith("_parent-"):
            assert after[name] == digest, name  # untouched modules: byte-identical files
    for name in touched:
        assert after[name] != before[name]
    loaded = load_modules(tmp_path / "after")  # the repaired folder loads and scores as in memory
    x = data.images[:64]
    assert torch.equal(compose(loaded, rule="calibrated").score_images(x),
                       compose(modules, rule="calibrated").score_images(x))
    assert loaded[int(next(iter(report["confused"])))].meta["repair"]["kept"] == ["train", "calibrate"]


def test_a_repair_that_does_not_lower_the_held_out_loss_is_undone(weak):
    mods, healthy_five, data = weak
    modules = _replaced(mods, healthy_five, claim=0.0)  # as replaced: nothing here gets better on held-out images
    x = data.images[:64]
    scores = compose(modules, rule="calibrated").score_images(x)
    metas = [dict(m.meta) for m in modules]
    report = repair_(modules, "5", data, RepairOptions(method="train", per_class=60, check_per_class=40, lr=0.5,
                                                         batch_size=32))
    assert report["confused"] and report["kept"] == [] and report["check_loss_after"] == report["check_loss_before"]
    assert torch.equal(compose(modules, rule="calibrated").score_images(x), scores)
    assert [m.meta for m in modules] == metas


def test_repair_calibrate_and_continuous_change_only_the_confused_and_new_modules(weak):
    mods, healthy_five, data = weak
    for method in ("calibrate", "continuous"):
        modules = _replaced(mods, healthy_five)
        untouched = {m.class_name: m.network.weights() for m in modules}
        report = repair_(modules, "5", data, RepairOptions(method=method, per_class=60, check_per_class=40))
        assert report["confused"] and report["steps"] == 0 and "calibrate" in report["kept"]
        assert report["check_loss_after"] < report["check_loss_before"]
        for m in modules:
            if m.class_name not in report["confused"] and m.class_name != "5":
                assert "repair" not in m.meta
            if method == "calibrate":  # no weight or mask of any module changes
                assert all(t is untouched[m.class_name][k] for k, t in m.network.weights().items())


def test_head_repair_changes_only_the_new_modules_head_and_lowers_the_loss(weak):
    mods, healthy_five, data = weak
    modules = _replaced(mods, healthy_five)
    before = {m.class_name: m.network.weights() for m in modules}
    report = repair_(modules, "5", data, RepairOptions(method="head", per_class=60, check_per_class=40))
    assert report["kept"][0] == "head" and report["check_loss_after"] < 0.8 * report["check_loss_before"]
    assert report["loss_after"] <= report["loss_before"]  # each stage minimises the fitting loss from where it was
    # oracle: the module as stored (run for real) gives the loss the fit reached
    assert report["loss_after"] == pytest.approx(report["head_fit_loss"], abs=1e-5)
    new = modules[5].network
    head = [k for k, t in new.weights().items() if t is not before["5"][k]]
    assert sorted(head) == ["fc.bias", "fc.weight"]  # the head, and nothing else of the new module
    assert torch.equal(new.weight("fc.weight")[0], before["5"]["fc.weight"][0])  # its "not 5" row kept
    for m in modules:
        if m.class_name not in report["confused"] and m.class_name != "5":
            assert "repair" not in m.meta and all(t is before[m.class_name][k] for k, t in m.network.weights().items())


def test_head_repair_of_a_channels_module_keeps_the_constant_its_head_adds(weak, tmp_path):
    # A channels module whose head's inputs are pruned adds a constant to its head's outputs (the
    # removed inputs' mean contribution): the re-fitted head must keep it out of the fitted score.
    mods, _, data = weak
    ckpt = tmp_path / "r20.safetensors"
    train("resnet20", load_data("digits", "train"), ckpt, TrainConfig(epochs=1, lr=0.05, batch_size=64, seed=0),
          progress=False)
    small = decompose(load_model(ckpt), load_data("digits", "train"), strategy="channels", keep=0.22, only=["5"],
                      positives=50)[0]
    assert float(small.network.weight("fc.addmap").diff().abs()) > 0.1
    modules = replace(load_modules(mods), small)
    report = repair_(modules, "5", data, RepairOptions(method="head", per_class=60, check_per_class=40))
    assert report["kept"] == ["head"]
    assert report["loss_after"] == pytest.approx(report["head_fit_loss"], abs=1e-5)


def test_repair_refuses_wrong_input(weak):
    mods, healthy_five, data = weak
    modules = load_modules(mods)
    with pytest.raises(CnnmodError, match="expected the replaced class among the modules' classes"):
        repair_(modules, "cat", data)
    with pytest.raises(CnnmodError, match="expected --repair to be one of head, calibrate, .*, found 'retrain'"):
        RepairOptions(method="retrain")
    small = decompose(load_model(mods.parent / "weak.safetensors"), data, strategy="channels", keep=0.5)
    mixed = replace(small, load_module(healthy_five))
    mixed[5].meta["calibration"]["b"] += 3.0
    tensors = [dict(m.network.weights()) for m in mixed]
    with pytest.raises(CnnmodError, match="expected paper-strategy modules for continuous learning, found channels"):
        repair_(mixed, "5", data, RepairOptions(method="continuous", per_class=60, check_per_class=40))
    for m, before in zip(mixed, tensors):  # refused before anything changed
        assert all(before[k] is t for k, t in m.network.weights().items())
    with pytest.raises(CnnmodError, match="expected images of every composed class"):
        repair_(modules, "5", Dataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 0]), ["0"]))


def test_replace_repair_on_the_command_line(weak, tmp_path, capsys):
    from cnnmod.cli import main

    mods, healthy_five, _ = weak
    out = tmp_path / "out"
    assert main(["replace", str(mods), "--with", str(healthy_five), "--out", str(out), "--repair", "calibrate",
                 "--data", "digits", "--repair-per-class", "60"]) == 0
    text = capsys.readouterr().out
    assert "confused with '5' (the larger share" in text and "nothing kept" in text  # as replaced: none better
    assert main(["replace", str(mods), "--with", str(healthy_five), "--out", str(out), "--repair", "head",
                 "--data", "digits", "--repair-per-class", "60"]) == 0
    text = capsys.readouterr().out
    assert "repaired (head) on 541 images; kept: head; on 892 held-out images: loss" in text
    assert "of what training the confused modules' parent cost" in text
    assert load_module(out / "5.safetensors").meta["repair"]["kept"] == ["head"]
    assert main(["replace", str(mods), "--with", str(healthy_five), "--out", str(tmp_path / "t"), "--repair", "train",
                 "--data", "digits", "--repair-per-class", "30", "--device", "cpu"]) == 0
    assert "repaired (train)" in capsys.readouterr().out
    assert main(["replace", str(mods), "--with", str(healthy_five), "--out", str(tmp_path / "x"),
                 "--repair", "train"]) == 2
    assert "expected --data (labelled images of the composed classes) with --repair" in capsys.readouterr().err
    assert main(["replace", str(mods), "--with", str(healthy_five), "--out", str(tmp_path / "x"),
                 "--data", "digits"]) == 2
    assert "expected --data only with --repair METHOD" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
