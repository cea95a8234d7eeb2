"""Modularity metrics (issue #24): kernel retention, module overlap, cohesion and coupling."""

import json

import pytest
import torch

from cnnmod import decompose, load_data, load_model, save_module
from cnnmod.cli import main
from cnnmod.compose import load_modules
from cnnmod.modules.metrics import cohesion_coupling, jaccard, kernels, overlap, retention
from cnnmod.modules.pipeline import write_modules
from cnnmod.training import TrainConfig, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    train("smallcnn", load_data("digits", "train"), root / "m.safetensors", TrainConfig(epochs=2, lr=0.05,
                                                                                       batch_size=64), progress=False)
    model, data = load_model(root / "m.safetensors"), load_data("digits", "train")
    small = decompose(model, data, strategy="channels", keep=0.4, positives=40, calibration=0)
    whole = decompose(model, data, strategy="channels", keep=1.0, positives=40, calibration=0)
    paper = decompose(model, data, positives=40, calibration=0)
    for name, modules in (("small", small), ("whole", whole), ("paper", paper)):
        write_modules(modules, root / name)
    return root, model, small


def test_jaccard_of_known_sets():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(jaccard(a, b), torch.tensor([[1 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_recorded_kernels_are_the_parents_rows_each_module_holds(folders):
    root, model, small = folders
    loaded = load_modules(root / "small")
    for m, n in zip(small, loaded):
        of, keep = m.kept  # what the strategy chose, in memory
        from_file = kernels(n)
        assert set(from_file) == {node.name for node in n.network.graph.nodes if node.op == "conv"}
        for name, k in from_file.items():
            assert torch.equal(k, keep.get(of[name], torch.ones(len(k), dtype=torch.bool)))
    # oracle: the first convolution reads the whole input and is not re-fitted, so the module's rows are
    # the parent's rows at the recorded kernels, scaled by the parent's BatchNorm (folded into them)
    conv, bn = model.features[0], model.features[1]
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    first = next(node.name for node in loaded[3].network.graph.nodes if node.op == "conv")
    k = kernels(loaded[3])[first]
    assert not bool(k.all())
    expected = (conv.weight * scale.view(-1, 1, 1, 1))[k]
    assert torch.allclose(loaded[3].network.weight(f"{first}.weight"), expected, atol=1e-6)
    # retention, from the weights' shapes alone
    parent = sum(len(v) for v in kernels(loaded[3]).values())
    mine = sum(loaded[3].network.weight(f"{n}.weight").shape[0] for n in kernels(loaded[3]))
    assert retention(loaded[3]) == pytest.approx(mine / parent) and retention(loaded[3]) < 0.5


def test_overlap_and_cohesion(folders):
    root, model, small = folders
    whole = load_modules(root / "whole")
    assert torch.equal(overlap(whole), torch.ones(10, 10))  # every module keeps every kernel
    o = overlap(load_modules(root / "small"))
    assert torch.allclose(o, o.T) and torch.equal(o.diagonal(), torch.ones(10)) and float(o.mean()) < 0.8
    data = load_data("digits", "train")
    x = small[0].input_spec.prepare(data.images[:200])
    found = cohesion_coupling(small, x, data.labels[:200])
    assert 0 <= found["coupling"] < found["cohesion"] <= 1 and found["images"] == 200
    # each image's active kernels lie within its module's kept ones: coupling cannot exceed the overlap
    assert found["coupling"] <= float(o.max()) + 1e-6


def test_inspect_metrics_on_the_command_line(folders, tmp_path, capsys):
    root, *_ = folders
    assert main(["inspect", str(root / "small"), "--metrics", "--data", "digits", "--split", "train",
                 "--per-class", "10", "--plot", str(tmp_path / "overlap.png")]) == 0
    out = capsys.readouterr().out
    assert "kernel retention" in out and "cohesion" in out and f"wrote {tmp_path / 'overlap.png'}" in out
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(root / "paper"), "--metrics", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["strategy"] == "paper" and len(shown["overlap"]) == 10 and 0 < shown["mean_retention"] <= 1
    # wrong inputs: one sentence each, nothing written
    assert main(["inspect", str(root / "small"), "--plot", str(tmp_path / "x.png")]) == 2
    assert "expected --plot only with --metrics" in capsys.readouterr().err
    assert main(["inspect", str(root / "m.safetensors"), "--metrics"]) == 2
    assert "expected a module folder for --metrics" in capsys.readouterr().err
    (tmp_path / "notes.png").write_bytes(b"mine")
    assert main(["inspect", str(root / "small"), "--metrics", "--plot", str(tmp_path / "notes.png")]) == 2
    assert (tmp_path / "notes.png").read_bytes() == b"mine"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("small", "paper"):
        save_module(load_modules(root / name)[0], mixed / f"{name}.safetensors")
    assert main(["inspect", str(mixed), "--metrics"]) == 2
    assert "expected modules of one parent and strategy" in capsys.readouterr().err
