"""File sizes (issue #14): constant maps in their exact compact form, each composed tensor once."""

import json

import pytest
import torch

from cnnmod import CnnmodError, compose, create_model, decompose, load_composed, load_module, save_composed, save_module
from cnnmod.files import read_file, write_file
from cnnmod.modules.module import Module
from cnnmod.trace import overlaid, overlay_maps, plain

from fuzzing import fuzz_loads


@pytest.fixture(scope="module")
def trunk_modules():
    """Three channels modules of a tiny random smallcnn, built with one shared trunk (--trunk 1.0)."""
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=3, image_size=8).eval()
    data = torch.utils.data.TensorDataset(torch.randn(60, 1, 8, 8), torch.arange(3).repeat(20))
    return decompose(model, data, strategy="channels", keep=0.5, trunk=1.0, calibration=0)


def _header(path) -> tuple[dict, dict]:
    """({tensor: (dtype, shape)}, cnnmod metadata) of a file."""
    blob = path.read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}, \
        json.loads(header["__metadata__"]["cnnmod"])


def _tensor_bytes(path) -> int:
    blob = path.read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _old_module_file(module, path) -> None:
    """Write ``module`` as cnnmod wrote channels modules before issue #14: full maps, version 2."""
    graph, weights = plain(module.network)
    tensors = {f"w.{k}": v for k, v in weights.items()}
    tensors.update({f"addmap.{k}": v for k, v in overlay_maps(module.network, "addmap").items()})
    meta = dict(module.meta, format="cnnmod.module", format_version=2, class_index=module.class_index,
                class_name=module.class_name, input=module.input_spec.to_dict(), graph=graph.to_dict())
    write_file(path, tensors, meta)


def test_constant_maps_are_stored_compact_and_load_bit_for_bit(trunk_modules, tmp_path):
    real = trunk_modules[1]
    # A real module's maps vary over the image (removed channels are replaced by their mean per
    # element): nothing to compact, so its file is the version-2 file of before, byte for byte.
    save_module(real, tmp_path / "real.safetensors")
    _old_module_file(real, tmp_path / "real_old.safetensors")
    assert (tmp_path / "real.safetensors").read_bytes() == (tmp_path / "real_old.safetensors").read_bytes()
    # The same network with hand-made maps: a per-channel constant, a 3x3 convolution's padding
    # pattern (3 distinct rows and columns; 0.0 and -0.0 must stay apart), and a map with no pattern.
    net = real.network
    gen = torch.Generator().manual_seed(0)
    per_channel = torch.randn(8, 1, 1, generator=gen).expand(8, 8, 8).contiguous()
    border = torch.randn(16, 3, 3, generator=gen)
    border[:, 0, 0], border[:, 1, 1] = 0.0, -0.0
    index = torch.tensor([0, 1, 1, 2])
    padding = border[:, index][:, :, index]  # (16, 4, 4)
    noise = torch.randn(8, 8, 8, generator=gen)
    maps = {"features.0": per_channel, "features.2": noise, "features.4": padding,
            "hidden": net.weight("hidden.addmap")}
    hand = Module(real.class_index, real.class_name, overlaid(*plain(net), addmaps=maps),
                  real.input_spec, real.meta)
    save_module(hand, tmp_path / "m.safetensors")
    shapes, meta = _header(tmp_path / "m.safetensors")
    assert meta["format_version"] == 3
    assert shapes["addmap.features.0"] == ("F32", [8, 1, 1])
    assert shapes["addmap_rows.features.0"] == shapes["addmap_cols.features.0"] == ("I32", [8])
    assert shapes["addmap.features.4"] == ("F32", [16, 3, 3])
    assert shapes["addmap.features.2"] == ("F32", [8, 8, 8]) and "addmap_rows.features.2" not in shapes
    assert shapes["addmap.hidden"] == ("F32", [64])
    loaded = load_module(tmp_path / "m.safetensors")
    assert all(torch.equal(_bits(loaded.network.weight(f"{k}.addmap")), _bits(m)) for k, m in maps.items())
    x = torch.randn(5, 1, 8, 8, generator=gen)
    assert torch.equal(loaded.network(x), hand.network(x))
    save_module(loaded, tmp_path / "again.safetensors")  # deterministic: same module, same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    # The full form, as version 2 wrote it, still loads and computes the same.
    _old_module_file(hand, tmp_path / "old.safetensors")
    assert _header(tmp_path / "old.safetensors")[0]["addmap.features.0"] == ("F32", [8, 8, 8])
    assert torch.equal(load_module(tmp_path / "old.safetensors").network(x), hand.network(x))
    # (8, 8, 8) -> (8, 1, 1) and (16, 4, 4) -> (16, 3, 3) float32, plus two int32 indices each
    saved = 4 * (8 * 8 * 8 - 8 + 16 * 4 * 4 - 16 * 9) - 4 * (8 + 8 + 4 + 4)
    assert _tensor_bytes(tmp_path / "old.safetensors") - _tensor_bytes(tmp_path / "m.safetensors") == saved


def test_a_damaged_compact_map_is_refused(trunk_modules, tmp_path):
    real = trunk_modules[0]
    net = real.network
    maps = {"features.0": torch.full((8, 8, 8), 0.5), "hidden": net.weight("hidden.addmap")}
    hand = Module(real.class_index, real.class_name, overlaid(*plain(net), addmaps=maps),
                  real.input_spec, real.meta)
    save_module(hand, tmp_path / "m.safetensors")
    tensors, meta = read_file(tmp_path / "m.safetensors")
    index = torch.zeros(8, dtype=torch.int32)
    for name, bad, message in [("addmap_rows.features.0", index + 1, r"row indices in \[0, 1\), found 1..1"),
                               ("addmap_rows.features.0", index.long(), "expected a torch.int32 row index"),
                               ("addmap_cols.features.0", None, "both a row and a column index"),
                               ("addmap_rows.features.9", index, "belongs to no addmap tensor")]:
        crafted = dict(tensors)
        if bad is None:
            crafted.pop(name)
        else:
            crafted[name] = bad
        write_file(tmp_path / "bad.safetensors", crafted, meta)  # checksum recomputed: crafted, not damaged
        with pytest.raises(CnnmodError, match=message):
            load_module(tmp_path / "bad.safetensors")


def test_composed_file_stores_each_tensor_once_and_scores_like_the_composition(trunk_modules, tmp_path):
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    clf = compose(trunk_modules, rule="vote")
    save_composed(clf, tmp_path / "c.safetensors")
    save_module(trunk_modules[0], tmp_path / "one.safetensors")
    shapes, meta = _header(tmp_path / "c.safetensors")
    assert meta["format_version"] == 2
    # every module holds the same trunk (all layers but the head): one copy of it, one head each
    one, _ = _header(tmp_path / "one.safetensors")
    assert len(shapes) == len(one) + 2 * 2  # + two more heads (weight, bias)
    assert len(meta["aliases"]) == 2 * (len(one) - 2)
    assert meta["aliases"]["2.w.features.4.weight"] == {"of": "0.w.features.4.weight", "dtype": "float32",
                                                        "shape": [16, 8, 3, 3]}
    head = 4 * (2 * 64 + 2)
    assert _tensor_bytes(tmp_path / "c.safetensors") == _tensor_bytes(tmp_path / "one.safetensors") + 2 * head
    loaded = load_composed(tmp_path / "c.safetensors")
    assert torch.equal(loaded(x), clf(x)) and loaded.trunk_layers() == clf.trunk_layers()
    save_composed(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    # A version-1 file (every module's tensors in full, as cnnmod wrote them before) still loads.
    tensors, metas = {}, []
    for k, m in enumerate(trunk_modules):
        graph, weights = plain(m.network)
        tensors.update({f"{k}.w.{n}": v for n, v in weights.items()})
        tensors.update({f"{k}.addmap.{n}": v for n, v in overlay_maps(m.network, "addmap").items()})
        metas.append(dict(m.meta, format="cnnmod.module", format_version=2, class_index=m.class_index,
                          class_name=m.class_name, input=m.input_spec.to_dict(), graph=graph.to_dict()))
    write_file(tmp_path / "v1.safetensors", tensors, {"format": "cnnmod.composed", "format_version": 1,
                                                      "modules": metas, "rule": "vote", "unknown_below": None})
    assert torch.equal(load_composed(tmp_path / "v1.safetensors")(x), clf(x))
    assert _tensor_bytes(tmp_path / "v1.safetensors") == 3 * _tensor_bytes(tmp_path / "one.safetensors")


def test_a_damaged_alias_is_refused(trunk_modules, tmp_path):
    save_composed(compose(trunk_modules[:2]), tmp_path / "c.safetensors")
    tensors, meta = read_file(tmp_path / "c.safetensors")
    name = "1.w.features.4.weight"
    edits = [({"of": "0.w.nothing", "dtype": "float32", "shape": [16, 8, 3, 3]}, "names no stored tensor"),
             ({"of": "0.w.features.0.weight", "dtype": "float32", "shape": [16, 8, 3, 3]},
              r"expects a float32 tensor of shape \[16, 8, 3, 3\], found '0.w.features.0.weight'"),
             ("0.w.features.4.weight", "names no stored tensor")]
    for alias, message in edits:
        crafted = json.loads(json.dumps(meta))
        crafted["aliases"][name] = alias
        write_file(tmp_path / "bad.safetensors", tensors, crafted)  # checksum recomputed: crafted, not damaged
        with pytest.raises(CnnmodError, match=message):
            load_composed(tmp_path / "bad.safetensors")
    crafted = dict(meta, aliases=["not", "an", "object"])
    write_file(tmp_path / "bad.safetensors", tensors, crafted)
    with pytest.raises(CnnmodError, match="expected the aliases as a JSON object"):
        load_composed(tmp_path / "bad.safetensors")


def test_fuzzed_composed_files_load_identically_or_are_refused(trunk_modules, tmp_path):
    save_composed(compose(trunk_modules[:2], rule="vote"), tmp_path / "c.safetensors")
    assert len(_header(tmp_path / "c.safetensors")[1]["aliases"]) == 8  # the mutations meet aliases
    x = torch.randn(3, 1, 8, 8)
    expected = load_composed(tmp_path / "c.safetensors")(x)

    def same_output(loaded, kind):
        assert torch.equal(loaded(x), expected), kind

    refused, same = fuzz_loads((tmp_path / "c.safetensors").read_bytes(), 60, tmp_path, load_composed, same_output,
                               seed=1)
    assert refused + same == 60 and refused >= 50
