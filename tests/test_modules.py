import hashlib
import json

import pytest
import torch

from cnnmod import CnnmodError
from cnnmod.compose import compose
from cnnmod.concerns import backtrack_removed, channel_head, mc_bln_features
from cnnmod.modules import decompose, load_module, save_module
from cnnmod.trace import overlay_maps, trace_graph

from nets import PixelNet, Unfamiliar, pixel_data, train_unfamiliar

NO_BLN = 1e9  # a delta no weight reaches: MC-BLN removes nothing


def test_ci_masks_are_exact():
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=0, delta=NO_BLN)
    for c, m in enumerate(modules):
        keep = overlay_maps(m.network, "mask")["relu"]  # (2, 2, 2)
        expected = torch.zeros(2, 2, 2, dtype=torch.bool)
        expected[0].view(-1)[c] = True  # only its own pixel, channel 0
        assert torch.equal(keep, expected)
        assert m.meta["share_kept"] == 1 / 8


def test_ti_adds_back_what_negatives_use():
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=1, delta=NO_BLN)
    for m in modules:  # every module now also saw one image of each other class
        keep = overlay_maps(m.network, "mask")["relu"]
        assert keep[0].view(-1).tolist() == [True, True, True, False] and not keep[1].any()
        assert m.meta["observed_images"] == 2 + 1 + 1


def test_channeled_head_and_mc_bln_follow_the_text():
    w = torch.tensor([[0.1, 2.0], [1.0, 0.0], [1.0, -1.0]])
    b = torch.tensor([0.5, 1.0, 2.0])
    w2, b2 = channel_head(w, b, 0)
    assert torch.allclose(w2, torch.tensor([[1.0, -0.5], [0.1, 2.0]])) and torch.allclose(b2, torch.tensor([1.5, 0.5]))
    # feature 0 goes strongly (1.0) to not-concern and weakly (0.1) to concern: removed
    assert mc_bln_features(w2, 0.5).tolist() == [True, False]
    # the others' mean as the float64 total less one row: the plain mean over the others' rows
    w, b = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), torch.arange(50.0)
    for c in (0, 17, 49):
        w2, b2 = channel_head(w, b, c)
        others = torch.arange(50) != c
        assert torch.allclose(w2[0], w[others].mean(0), atol=1e-6) and torch.equal(w2[1], w[c])
        assert torch.allclose(b2, torch.stack([b[others].mean(), b[c]]))


def test_mc_bln_backtracks_through_flatten_to_the_exact_position():
    head = torch.zeros(3, 8)
    head[1:, 5] = 1.0  # flatten feature 5 = channel 1, pixel (0, 1); only classes 1 and 2 use it
    modules = decompose(PixelNet(head), pixel_data(), positives=2, negatives_per_class=0, delta=0.5)
    assert modules[0].meta["mc_bln_features_removed"] == 1
    assert modules[1].meta["mc_bln_features_removed"] == 0  # its concern weight is 1.0 >= delta


def test_backtrack_through_pooling_add_and_concat():
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.Conv2d(1, 1, 1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(3 * 2 * 2, 2)

        def forward(self, x):  # x: (B, 1, 4, 4)
            y = torch.cat([torch.relu(self.a(x) + self.b(x)), self.c(x)], dim=1)  # (B, 3, 4, 4)
            return self.fc(torch.flatten(self.pool(y), 1))  # 3 x 2 x 2 features

    graph = trace_graph(Net(), (1, 4, 4))
    shapes = {"a": (2, 4, 4), "b": (2, 4, 4), "c": (1, 4, 4), "add": (2, 4, 4), "relu": (2, 4, 4),
              "cat": (3, 4, 4), "pool": (3, 2, 2), "flatten": (12,)}
    removed = torch.zeros(12, dtype=torch.bool)
    removed[1] = True  # channel 0, pooled (0, 1): input rows 0-1, columns 2-3
    removed[8] = True  # channel 2 (conv c), pooled (0, 0)
    got = backtrack_removed(graph, "flatten", removed, {"a", "b", "c"}, shapes)
    window = torch.zeros(4, 4, dtype=torch.bool)
    window[0:2, 2:4] = True
    assert torch.equal(got["a"][0], window) and torch.equal(got["b"][0], window)  # both summands
    assert not got["a"][1].any()
    corner = torch.zeros(4, 4, dtype=torch.bool)
    corner[0:2, 0:2] = True
    assert torch.equal(got["c"][0], corner)


def test_masked_module_equals_parent_on_the_images_it_observed():
    torch.manual_seed(0)
    model = Unfamiliar(4).eval()
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 8, 8), torch.arange(4).repeat(10))
    # 10 positives and 10 negatives per class: every module observes every image
    modules = decompose(model, data, positives=10, negatives_per_class=10, delta=NO_BLN)
    x = data.tensors[0]
    with torch.no_grad():
        z = model(x)
    for c, m in enumerate(modules):
        others = [j for j in range(4) if j != c]
        expected = torch.stack([z[:, others].mean(1), z[:, c]], dim=1)
        assert torch.allclose(m.network(x), expected, atol=1e-5)
        assert m.meta["share_kept"] < 1.0  # something was masked, yet nothing observed changed


def test_save_load_round_trip_is_exact_and_deterministic(tmp_path):
    torch.manual_seed(0)
    model = Unfamiliar(3).eval()
    data = torch.utils.data.TensorDataset(torch.randn(30, 1, 8, 8), torch.arange(3).repeat(10))
    m = decompose(model, data)[1]
    save_module(m, tmp_path / "a.safetensors")
    again = decompose(model, data)[1]
    save_module(again, tmp_path / "sub" / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "sub" / "b.safetensors").read_bytes()
    loaded = load_module(tmp_path / "a.safetensors")
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded.network(x), m.network(x))
    assert loaded.class_name == "1" and loaded.meta["strategy"] == "paper"
    assert loaded.meta["parent_fingerprint"] == m.meta["parent_fingerprint"]


def test_pinned_module_file_header(tmp_path):
    """The file format, pinned: safetensors header with the tensor table and cnnmod metadata."""
    # no calibration: its float64 fit could differ in the last bit on another CPU
    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=0, delta=NO_BLN, calibration=0)
    save_module(modules[2], tmp_path / "m.safetensors")
    blob = (tmp_path / "m.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header.pop("__metadata__")["cnnmod"])
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "mask.relu": ("BOOL", [2, 2, 2]), "w.conv.weight": ("F32", [2, 1, 1, 1]),
        "w.fc.weight": ("F32", [2, 8]), "w.fc.bias": ("F32", [2])}
    assert meta["format"] == "cnnmod.module" and meta["format_version"] == 1
    assert sorted(meta) == sorted([
        "checksum", "class_index", "class_name", "elements_kept", "elements_total", "format", "format_version",
        "graph", "input", "library_version", "mc_bln_features_removed", "observed_images", "options",
        "parent_architecture", "parent_classes", "parent_fingerprint", "positives_observed", "share_kept",
        "strategy"])
    # the whole file, byte for byte but for the library version (change deliberately, never silently)
    assert hashlib.sha256(blob.replace(b'"library_version":"' + meta["library_version"].encode(), b"")).hexdigest() \
        == PINNED_SHA256


# Changed deliberately (issue #14): modules decomposed from prepared tensors with no input_spec now
# say so in their input specification ("prepared": true) instead of claiming mean 0 / std 1.
PINNED_SHA256 = "bdcca8238aa9dd00c9209d849c6a91da483cce2651a6dafd2f8a5661de4b4d2e"


def test_unknown_format_version_is_refused(tmp_path):
    from cnnmod.files import read_file, write_file

    modules = decompose(PixelNet(), pixel_data(), positives=2, negatives_per_class=0)
    save_module(modules[0], tmp_path / "m.safetensors")
    tensors, meta = read_file(tmp_path / "m.safetensors")
    meta["format_version"] = 99
    write_file(tmp_path / "future.safetensors", tensors, meta)
    with pytest.raises(CnnmodError, match="expected module format version 1, 2 or 3, found 99"):
        load_module(tmp_path / "future.safetensors")


def test_unfamiliar_architecture_decomposes_with_small_loss():
    from cnnmod import load_data
    from cnnmod.data.inputspec import measure_spec

    train, test = load_data("digits", "train"), load_data("digits", "test")
    spec = measure_spec(train.images)
    model = train_unfamiliar(train, spec)
    modules = decompose(model, train, input_spec=spec, classes=train.classes)
    with torch.no_grad():
        xt = spec.prepare(test.images)
        model_acc = (model(xt).argmax(1) == test.labels).float().mean().item()
    modules_acc = (compose(modules)(xt).argmax(1) == test.labels).float().mean().item()
    assert model_acc > 0.85
    assert modules_acc >= model_acc - 0.01  # the paper's rule keeps almost everything
