"""Module files are untrusted input: damaged or crafted files are refused, nothing is executed."""

import pickle
import signal

import pytest
import torch

from cnnmod import CnnmodError
from cnnmod.cli import main
from cnnmod.modules import decompose, load_module, save_module

from fuzzing import mutations
from nets import Unfamiliar


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Unfamiliar(3).eval()
    data = torch.utils.data.TensorDataset(torch.randn(30, 1, 8, 8), torch.arange(3).repeat(10))
    path = tmp_path_factory.mktemp("fuzz") / "1.safetensors"
    save_module(decompose(model, data)[1], path)
    return path


def _timeout(*_):
    raise TimeoutError("a load hung")


def test_fuzzed_module_files_load_identically_or_are_refused(module_file, tmp_path):
    original = load_module(module_file)
    x = torch.randn(4, 1, 8, 8)
    expected = original.network(x)
    tally = {"tried": 0, "refused": 0, "loaded_same": 0}
    old = signal.signal(signal.SIGALRM, _timeout)
    try:
        for i, (kind, blob) in enumerate(mutations(module_file.read_bytes(), 240)):
            path = tmp_path / f"m{i}.safetensors"
            path.write_bytes(blob)
            tally["tried"] += 1
            signal.alarm(10)
            try:
                loaded = load_module(path)
            except CnnmodError:
                tally["refused"] += 1
                continue
            finally:
                signal.alarm(0)
            # anything that loads computes the same; a crafted file (checksum recomputed, so not
            # damaged but a different, consistent file) may carry other metadata such as a name
            assert torch.equal(loaded.network(x), expected), kind
            assert loaded.class_name == original.class_name or kind.endswith(":crafted"), kind
            tally["loaded_same"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz: {tally}")
    assert tally["tried"] == 240 and tally["refused"] + tally["loaded_same"] == 240
    assert tally["refused"] >= 200  # nearly every mutation must be caught


class _Marker:
    """Unpickling this would create a file: the proof that code ran."""

    path = None

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("command", ["inspect", "evaluate", "compose", "replace", "decompose"])
def test_a_pickle_is_never_executed_by_any_command(command, tmp_path, capsys, module_file):
    marker = tmp_path / "code-ran"
    _Marker.path = marker
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": _Marker()}))
    argv = {
        "inspect": ["inspect", str(evil)],
        "evaluate": ["evaluate", str(evil), "--data", "digits"],
        "compose": ["compose", str(module_file), str(evil), "--out", str(tmp_path / "c.safetensors")],
        "replace": ["replace", str(module_file.parent), "--with", str(evil), "--out", str(tmp_path / "r")],
        "decompose": ["decompose", str(evil), "--data", "digits", "--out", str(tmp_path / "d")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "found a pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.safetensors"]  # nothing written


@pytest.mark.parametrize("content, message", [
    (b"", "found 0 bytes"),
    (b"\x00" * 3, "found 3 bytes"),
    (bytes(range(256)) * 4, "expected a safetensors header"),
])
def test_empty_and_random_files_are_refused(content, message, tmp_path, capsys):
    f = tmp_path / "x.safetensors"
    f.write_bytes(content)
    assert main(["inspect", str(f)]) == 2
    assert message in capsys.readouterr().err


def test_nan_weights_are_refused(module_file, tmp_path):
    from cnnmod.files import read_file, write_file

    tensors, meta = read_file(module_file)
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    write_file(tmp_path / "nan.safetensors", tensors, {k: v for k, v in meta.items() if k != "checksum"})
    with pytest.raises(CnnmodError, match="NaN or Inf"):
        load_module(tmp_path / "nan.safetensors")


def test_import_reads_state_dicts_with_weights_only(tmp_path, capsys):
    from cnnmod import create_model, load_model

    torch.manual_seed(0)
    model = create_model("smallcnn", image_size=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "w.pth")
    out = tmp_path / "w.safetensors"
    assert main(["import", str(tmp_path / "w.pth"), "--model", "smallcnn", "--data", "digits", "--out", str(out)]) == 0
    loaded = load_model(out)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.cnnmod_meta["imported_from"] == "w.pth"

    marker = tmp_path / "code-ran"
    _Marker.path = marker
    torch.save({"w": _Marker()}, tmp_path / "evil.pth")
    assert main(["import", str(tmp_path / "evil.pth"), "--model", "smallcnn", "--data", "digits",
                 "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "weights_only" in capsys.readouterr().err and not marker.exists()
    assert main(["import", str(tmp_path / "w.pth"), "--model", "resnet20", "--data", "digits",
                 "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "does not fit resnet20" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()


def test_interrupted_decompose_leaves_nothing_and_resumes_to_identical_files(tmp_path, monkeypatch):
    import cnnmod.statistics.collect as collect
    from cnnmod import TrainConfig, load_data, train

    ckpt = tmp_path / "d.safetensors"
    train("smallcnn", load_data("digits", "train"), ckpt, TrainConfig(epochs=1, batch_size=64), progress=False)

    def argv(out, *extra):
        return ["decompose", str(ckpt), "--data", "digits", "--out", str(out), "--batch-size", "50", "--json", *extra]

    assert main(argv(tmp_path / "whole")) == 0

    batches, real_update = [], collect.Progress.update

    def count_and_interrupt(self, n=1):  # the bar advances once per counted batch
        batches.append(n)
        if len(batches) == 20:
            raise KeyboardInterrupt
        return real_update(self, n)

    real_init = collect.ProgressSaver.__init__

    def save_every_batch(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.interval = 0.0

    monkeypatch.setattr(collect.Progress, "update", count_and_interrupt)
    monkeypatch.setattr(collect.ProgressSaver, "__init__", save_every_batch)
    out = tmp_path / "cut"
    assert main(argv(out)) == 130
    assert not out.exists() and not list(tmp_path.glob(".cut*"))  # no partial module file anywhere
    assert (tmp_path / "cut.stats-progress.safetensors").exists()  # 19 batches saved

    batches.clear()
    assert main(argv(out, "--resume")) == 0
    total = 3 + 26  # 15 negatives x 10 classes in 50s, then the other 1,283 train images in 50s
    assert len(batches) == total - 19  # continued where it stopped
    assert not (tmp_path / "cut.stats-progress.safetensors").exists()
    for f in sorted((tmp_path / "whole").iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    # Header lengths of 128 + 256k make a safetensors file start with byte 0x80, as pickles do.
    from cnnmod.files import read_file, write_file

    for pad in range(256):
        path = tmp_path / "f.safetensors"
        write_file(path, {"w": torch.ones(3)}, {"format": "test", "format_version": 1, "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    tensors, meta = read_file(path)
    assert meta["pad"] == "x" * pad and torch.equal(tensors["w"], torch.ones(3))
