"""What a second new-user trial hit (issue #25): each finding, refused or said in one sentence."""

import pytest

from cnnmod.cli import main
from cnnmod.training import TrainConfig, train
from cnnmod import load_data


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    path = tmp_path_factory.mktemp("trial") / "m.safetensors"
    train("smallcnn", load_data("digits", "train"), path, TrainConfig(epochs=1, lr=0.05, batch_size=64), progress=False)
    return path


def test_train_refuses_a_foreign_out_file_before_it_trains(tmp_path, capsys):
    mine = tmp_path / "notes.safetensors"
    mine.write_bytes(b"my own notes")
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(mine), "--epochs", "3"]) == 2
    assert "is not a cnnmod file" in capsys.readouterr().err
    # refused before training: no training state was ever saved beside it
    assert mine.read_bytes() == b"my own notes" and sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def test_resume_with_nothing_saved_says_so(parent, tmp_path, capsys):
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--positives", "20",
                 "--resume"]) == 0
    assert "nothing saved to resume" in capsys.readouterr().err
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(tmp_path / "t.safetensors"),
                 "--epochs", "1", "--resume"]) == 0
    assert "nothing saved to resume (t.safetensors.resume.safetensors does not exist)" in capsys.readouterr().err


def test_a_class_named_twice_or_a_one_class_classifier_is_refused(parent, tmp_path, capsys):
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--only", "3,3"]) == 2
    assert "expected --only to name each class once, found 3 more than once" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["evaluate", str(parent), "--data", "digits", "--classes", "3"]) == 2
    assert "expected two or more classes for --classes" in capsys.readouterr().err
    assert main(["evaluate", str(parent), "--data", "digits", "--classes", "3,5,3"]) == 2
    assert "expected --classes to name each class once" in capsys.readouterr().err


def test_evaluate_prints_what_it_wrote_top5_only_beyond_5_classes_and_aligned_columns(parent, tmp_path, capsys):
    assert main(["evaluate", str(parent), "--data", "digits", "--classes", "3,8", "--confusion",
                 "--plot", str(tmp_path / "e.png")]) == 0
    out = capsys.readouterr().out
    assert "top-5" not in out and f"wrote {tmp_path / 'e.png'}" in out and (tmp_path / "e.png").exists()
    lines = out.splitlines()
    header = lines[lines.index("confusion matrix (rows: true class, columns: answer)") + 1]
    first = lines[lines.index("confusion matrix (rows: true class, columns: answer)") + 2]
    # each column's label ends where its numbers end
    assert len(header) == len(first) and header.rstrip()[-1] == "8"
    assert main(["evaluate", str(parent), "--data", "digits"]) == 0
    assert "top-5" in capsys.readouterr().out


def test_progress_lines_when_the_output_is_not_a_terminal(parent, tmp_path, capsys, monkeypatch):
    from cnnmod.loop import Progress

    monkeypatch.setattr(Progress, "EVERY", 0.0)  # a line after every batch, not once a minute
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--positives", "20",
                 "--strategy", "channels", "--distill", "1"]) == 0
    err = capsys.readouterr().err
    assert "statistics pass: " in err and "% (" in err and "left" in err and "distillation: 100% (" in err


def test_a_pairs_shared_trunk_is_stored_once(parent, tmp_path, capsys):
    import torch

    from cnnmod import load_model, load_module, save_module
    from cnnmod.compose import load_modules
    from cnnmod.modules.shared import identity

    out = tmp_path / "pair"
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(out), "--strategy", "channels",
                 "--trunk", "1.0", "--keep", "0.5", "--only", "3,8", "--positives", "30"]) == 0
    parts = sorted(p for p in out.iterdir() if not p.name.startswith("_parent-"))
    shared = [p for p in out.iterdir() if p.name.startswith("_parent-")]
    assert len(parts) == 2 and len(shared) == 1
    alone = [tmp_path / "3.safetensors", tmp_path / "8.safetensors"]
    for p, a in zip(parts, alone):
        save_module(load_module(p), a)  # self-contained: what each file held before
    on_disk = sum(p.stat().st_size for p in parts + shared)
    assert on_disk < 0.75 * sum(a.stat().st_size for a in alone)
    assert all(p.stat().st_size < 0.25 * a.stat().st_size for p, a in zip(parts, alone))
    # the folder's modules compute what the self-contained ones do, and hold their trunk as one tensor
    x = load_model(parent).input_spec.prepare(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8))
    modules = load_modules(out)
    for m, a in zip(modules, alone):
        assert torch.equal(m.network(x), load_module(a).network(x))
    one = [k for k in modules[0].network.weight_names
           if identity(modules[0].network.weight(k)) == identity(modules[1].network.weight(k))]
    assert any(k.endswith(".weight") for k in one)


def test_save_modules_writes_what_the_command_line_writes(parent, tmp_path, capsys):
    from cnnmod import CnnmodError, decompose, load_model, load_modules, save_modules

    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "cli"), "--positives", "30"]) == 0
    modules = decompose(load_model(parent), load_data("digits", "train"), positives=30)
    written = save_modules(modules, tmp_path / "api")
    assert len(written) == 10
    cli = {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir()}
    api = {p.name: p.read_bytes() for p in (tmp_path / "api").iterdir()}
    assert cli == api and sum(n.startswith("_parent-") for n in api) == 1  # the parent once, byte for byte
    assert [m.class_name for m in load_modules(tmp_path / "api")] == [m.class_name for m in modules]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(CnnmodError):
        save_modules(modules, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_decompose_says_what_the_composition_loses_on_held_back_images(parent, tmp_path, capsys):
    import json

    import torch

    from cnnmod import compose, decompose, load_model, observe
    from cnnmod.modules.decompose import _calibration_index

    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--strategy",
                 "channels", "--keep", "0.3", "--positives", "30", "--json"]) == 0
    held = json.loads(capsys.readouterr().out)["held_back"]
    assert held["images"] == 500 and held["source"].startswith("held out")  # 30 a class observed: 50 held out
    # oracle: the same modules and the model scored on the same images by the slow obvious path
    model, data = load_model(parent), load_data("digits", "train")
    modules = decompose(model, data, strategy="channels", keep=0.3, positives=30)
    obs = observe(model, data, positives=30, sums=True)
    index, _ = _calibration_index(data.labels, obs.sample, 50, 0)
    images, labels = data.images[index], data.labels[index]
    with torch.no_grad():
        mine = compose(modules).score_images(images).argmax(1)
        theirs = model(model.input_spec.prepare(images)).argmax(1)
    assert abs(held["composed_top1"] - float((mine == labels).float().mean())) < 0.005
    assert abs(held["model_top1"] - float((theirs == labels).float().mean())) < 0.005
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--strategy",
                 "channels", "--keep", "0.3", "--positives", "30"]) == 0
    assert "on 500 held-back images: the modules composed" in capsys.readouterr().out


def test_max_loss_chooses_the_fewest_channels_within_the_loss(parent, tmp_path, capsys):
    from cnnmod import CnnmodError, build, decompose, load_model, observe

    model, data = load_model(parent), load_data("digits", "train")
    modules = decompose(model, data, strategy="channels", positives=30)  # neither keep nor retain: max_loss 1.0
    chosen = modules[0].meta["max_loss"]
    assert chosen["points"] == 1.0 and chosen["lost"] <= 1.0 and chosen["images"] == 500
    assert modules[0].meta["options"]["retain"] == chosen["retain"] or chosen["retain"] == 1.0
    tried = {float(r): v for r, v in chosen["tried"].items()}
    assert all(v > 1.0 for r, v in tried.items() if r < chosen["retain"])  # every smaller one tried lost more
    # a mean of per-image differences in {-1, 0, 1}: its standard error, in points, is at most 100 / sqrt(n),
    # and 0 only where the modules and the model agree on every image (then nothing is lost)
    assert 0 <= chosen["standard_error"] <= 100 / chosen["images"] ** 0.5
    assert chosen["standard_error"] > 0 or chosen["lost"] == 0
    loose = decompose(model, data, strategy="channels", positives=30, max_loss=20.0)
    assert loose[0].meta["max_loss"]["retain"] <= chosen["retain"]
    assert sum(m.meta["macs_fraction"] for m in loose) <= sum(m.meta["macs_fraction"] for m in modules)
    with pytest.raises(CnnmodError, match="expected --max-loss or --keep/--retain, found both"):
        decompose(model, data, strategy="channels", positives=30, keep=0.5, max_loss=1.0)
    with pytest.raises(CnnmodError, match="expected max_loss only with decompose"):
        build(observe(model, data, positives=30, sums=True), "channels", max_loss=1.0)
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--strategy",
                 "channels", "--max-loss", "-1"]) == 2
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "m"), "--strategy",
                 "channels", "--max-loss", "2", "--positives", "30"]) == 0
    assert "--max-loss 2: chose" in capsys.readouterr().out


def test_paper_calibration_from_one_parent_run_is_each_modules_own_answer():
    """Issue #25 item 1: paper modules are scored from one parent run where that is exact; the oracle
    runs every module whole. The same margins (to float64 rounding: a module run whole on a few images
    of a batch rounds in its own order), the same stored calibration, far fewer runs."""
    import copy

    import torch

    from cnnmod import decompose
    from cnnmod.data.inputspec import measure_spec
    from cnnmod.modules.calibration import calibrate_
    from cnnmod.modules.observe import observe
    from cnnmod.trace.network import GraphNetwork
    from nets import train_unfamiliar

    data = load_data("digits", "train")
    spec = measure_spec(data.images)
    model = train_unfamiliar(data, spec, epochs=2)
    modules = decompose(model, data, input_spec=spec, classes=data.classes, calibration=0, positives=200)
    held = torch.arange(0, len(data), 3)  # images the statistics pass saw and images it did not
    batches = [(spec.prepare(data.images[i]), data.labels[i]) for i in held.split(100)]
    fast, slow = copy.deepcopy(modules), copy.deepcopy(modules)
    obs = observe(model, data, input_spec=spec, classes=data.classes, positives=200, sums=False)
    parent = GraphNetwork(obs.parent.graph, obs.parent.weights)
    margins, labels, logits = calibrate_(fast, batches, source="test", parent=parent)
    oracle, _, none = calibrate_(slow, batches, source="test")
    assert none is None and torch.allclose(margins, oracle, rtol=0, atol=1e-12)
    assert [m.meta["calibration"] for m in fast] == [m.meta["calibration"] for m in slow]
    with torch.no_grad():
        wide = GraphNetwork(obs.parent.graph, {k: v.double() for k, v in obs.parent.weights.items()})
        assert torch.equal(logits, torch.cat([wide(x.double()) for x, _ in batches])[:, [m.class_index for m in fast]])
    whole = [m.timing["calibration_module_images"] for m in fast]
    assert [m.timing["calibration_module_images"] for m in slow] == [len(held)] * len(slow)
    assert 0 < sum(whole) < len(held) * len(fast) / 2  # the fallback ran, and most answers came from one run


def test_a_strategy_is_one_registration_its_options_flags_and_lines_follow(parent, tmp_path, capsys, monkeypatch):
    """Issue #25 item 3: a new strategy registered once gets its flags (with their defaults in the help),
    its refusals, and its lines in decompose and inspect; nothing else is edited."""
    from dataclasses import dataclass

    import torch

    from cnnmod.modules.strategies import STRATEGIES, Strategy
    from cnnmod.options import check, option
    from cnnmod.trace.network import GraphNetwork
    from cnnmod.errors import CnnmodError

    @dataclass(frozen=True)
    class WholeOptions:
        scale: float = option(2.0, "multiply the module's head by this", "positive")

        def __post_init__(self):
            check(self)

    def whole(p, c, *, scale=2.0):
        w, b = p.channel_head(c)
        weights = dict(p.weights, **{f"{p.head}.weight": w * scale, f"{p.head}.bias": b * scale})
        return GraphNetwork(p.graph, weights), {"scale_used": scale}

    def kept(meta):
        return f"keeps everything, head x{meta['scale_used']:g}"

    monkeypatch.setitem(STRATEGIES, "whole", Strategy(whole, WholeOptions, needs_sums=False, kept=kept,
                                                      description="the whole parent, its head scaled"))
    assert main(["decompose", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "whole strategy: multiply the module's head by this (default: 2)" in shown
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "p"), "--scale", "3"]) == 2
    assert "expected --scale only with --strategy whole, found it with --strategy paper" in capsys.readouterr().err
    assert main(["decompose", str(parent), "--data", "digits", "--out", str(tmp_path / "w"), "--strategy", "whole",
                 "--scale", "3", "--only", "3,5"]) == 0
    assert "keeps everything, head x3" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "w" / "3.safetensors")]) == 0
    assert "keeps everything, head x3" in capsys.readouterr().out
    with pytest.raises(CnnmodError, match="expected --scale to be a number > 0, found -1"):
        WholeOptions(scale=-1)
    from cnnmod import load_model, load_module

    module, model = load_module(tmp_path / "w" / "3.safetensors"), load_model(parent)
    x = model.input_spec.prepare(load_data("digits", "test").images[:16])
    with torch.no_grad():
        z = model(x)
    expected = 3 * (z[:, 3] - (z.sum(1) - z[:, 3]) / 9)  # the channeled head's margin, scaled
    assert torch.allclose(module.margin(x), expected, atol=1e-4)
