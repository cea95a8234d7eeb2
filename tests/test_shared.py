"""Modules that share their parent (issue #16): a decomposition folder stores the parent once."""

import json
import shutil
import zlib

import torch

from cnnmod import CnnmodError, create_model, decompose, load_data, load_module, save_module
from cnnmod.cli import main
from cnnmod.compose import load_modules
from cnnmod.files import METADATA_KEY, file_checksum, read_file, write_file
from safetensors.torch import save
from cnnmod.data.inputspec import measure_spec
from cnnmod.modules.pipeline import write_modules
from cnnmod.modules.shared import _mask_bits, module_files

from fuzzing import fuzz_loads

import pytest


def _modules(seed=0, **options):
    torch.manual_seed(seed)
    data = load_data("digits", "train")
    model = create_model("smallcnn", num_classes=10, image_size=8).eval()
    return decompose(model, data, input_spec=measure_spec(data.images), calibration=10, positives=40, **options)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    modules = _modules()
    write_modules(modules, root / "mods")
    return root, modules


def test_a_folder_stores_the_parent_once_and_its_modules_answer_as_before(folder, tmp_path):
    root, modules = folder
    files = sorted(p.name for p in (root / "mods").iterdir())
    parents = [f for f in files if f.startswith("_parent-")]
    assert len(parents) == 1 and len(files) == 11 and len(module_files(root / "mods")) == 10
    for m in modules:
        save_module(m, tmp_path / f"{m.class_name}.safetensors")
    alone = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    together = sum(p.stat().st_size for p in (root / "mods").iterdir())
    assert together < 0.25 * alone  # the parent once, masks as bits
    x = measure_spec(load_data("digits", "test").images).prepare(load_data("digits", "test").images[:32])
    loaded = load_modules(root / "mods")
    for m, back in zip(modules, loaded):
        assert torch.equal(back.margin(x), m.margin(x))
        assert torch.equal(back.margin(x), load_module(tmp_path / f"{m.class_name}.safetensors").margin(x))
        assert back.meta["calibration"] == m.meta["calibration"]
    # the loaded modules hold the parent's tensors once: views, not copies
    key = "features.0.weight"
    assert loaded[0].network.weight(key).data_ptr() == loaded[7].network.weight(key).data_ptr()


def test_a_module_refuses_a_missing_parent_or_another_models(folder, tmp_path):
    root, _ = folder
    mine = tmp_path / "mine"
    shutil.copytree(root / "mods", mine)
    parent = next(mine.glob("_parent-*"))
    other = tmp_path / "other"
    write_modules(_modules(seed=1), other)
    shutil.copy(next(other.glob("_parent-*")), parent)  # another model's parent under this one's name
    with pytest.raises(CnnmodError, match="belongs to another model"):
        load_module(mine / "3.safetensors")
    parent.unlink()
    with pytest.raises(CnnmodError, match="expected its parent file _parent-.* beside it, found none"):
        load_module(mine / "3.safetensors")


def test_export_module_writes_one_self_contained_file(folder, tmp_path, capsys):
    root, modules = folder
    assert main(["export", str(root / "mods" / "3.safetensors"), "--module", str(tmp_path / "three.safetensors")]) == 0
    assert "self-contained" in capsys.readouterr().out
    alone = tmp_path / "elsewhere" / "three.safetensors"
    alone.parent.mkdir()
    shutil.move(tmp_path / "three.safetensors", alone)  # no parent file beside it
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(load_module(alone).margin(x), modules[3].margin(x))


def test_a_parent_no_module_names_any_more_is_removed(folder, tmp_path):
    root, modules = folder
    mine = tmp_path / "mods"
    shutil.copytree(root / "mods", mine)
    other = _modules(seed=1)
    write_modules(other[:3], mine)  # three classes replaced by another model's: both parents needed
    assert len(list(mine.glob("_parent-*"))) == 2
    write_modules(other, mine)  # every class replaced: the first parent is no longer needed
    parents = list(mine.glob("_parent-*"))
    assert [p.name for p in parents] == [other[0].parent.filename]
    assert all(load_module(p).parent.checksum == other[0].parent.checksum for p in module_files(mine))


def test_modules_that_share_nothing_are_written_self_contained(tmp_path):
    write_modules(_modules(strategy="channels", keep=0.5), tmp_path / "mods")
    assert not list((tmp_path / "mods").glob("_parent-*"))


def test_fuzzed_module_parts_load_identically_or_are_refused(folder, tmp_path):
    root, modules = folder
    shutil.copy(next((root / "mods").glob("_parent-*")), tmp_path)  # the parent beside the mutated parts
    x = torch.randn(4, 1, 8, 8)
    expected = modules[2].network(x)

    def same_output(loaded, kind):
        assert torch.equal(loaded.network(x), expected), kind

    refused, same = fuzz_loads((root / "mods" / "2.safetensors").read_bytes(), 90, tmp_path, load_module,
                               same_output, seed=2)
    assert refused + same == 90 and refused >= 70


def test_masks_are_one_bounded_zlib_stream_and_version_4_parts_still_load(folder, tmp_path):
    root, modules = folder
    tensors, meta = read_file(root / "mods" / "2.safetensors")
    assert meta["format_version"] == 5 and "masks.zlib" in tensors and not any(k.startswith("bits.") for k in tensors)
    shutil.copy(next((root / "mods").glob("_parent-*")), tmp_path)
    # the same part as version 4 wrote it: each layer's bits uncompressed
    bits = _mask_bits(tensors, meta, meta["mask_shapes"], "test")
    old = {k: v for k, v in tensors.items() if k != "masks.zlib"} | {f"bits.{k}": v for k, v in bits.items()}
    write_file(tmp_path / "v4.safetensors", old, dict(meta, format_version=4))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(load_module(tmp_path / "v4.safetensors").margin(x), modules[2].margin(x))
    # a stream that would inflate past the masks' own size is refused, not inflated
    bomb = torch.frombuffer(bytearray(zlib.compress(bytes(10**7))), dtype=torch.uint8)
    write_file(tmp_path / "bomb.safetensors", dict(tensors, **{"masks.zlib": bomb}), meta)
    with pytest.raises(CnnmodError, match="masks as one zlib stream, found a damaged one"):
        load_module(tmp_path / "bomb.safetensors")


def test_declared_mask_shapes_bound_what_a_part_may_inflate(folder, tmp_path):
    root, _ = folder
    tensors, meta = read_file(root / "mods" / "2.safetensors")
    shutil.copy(next((root / "mods").glob("_parent-*")), tmp_path)
    for shapes, expected in [({"relu": [2**62, 2**62]}, "expected the shape of layer relu's mask"),
                             ({"relu": [True, 4]}, "expected the shape of layer relu's mask"),
                             ({"a": [2**21, 2**10], "b": [2**21, 2**10]}, "expected at most 2,147,483,648 mask")]:
        write_file(tmp_path / "big.safetensors", tensors, dict(meta, mask_shapes=shapes))
        with pytest.raises(CnnmodError, match=expected):
            load_module(tmp_path / "big.safetensors")
    stream = tensors["masks.zlib"].numpy().tobytes() + b"\x00"
    write_file(tmp_path / "tail.safetensors", dict(tensors, **{"masks.zlib": torch.frombuffer(bytearray(stream),
                                                                                           dtype=torch.uint8)}), meta)
    with pytest.raises(CnnmodError, match="data after the end of the stream"):
        load_module(tmp_path / "tail.safetensors")


def test_bools_that_are_neither_0_nor_1_are_refused(tmp_path):
    """A crafted file (torch itself never writes such bools) with a valid checksum: the byte 2 would
    unpack as False where the packing read it as True."""
    odd = torch.tensor([2, 0, 1], dtype=torch.uint8).view(torch.bool)
    meta = {"format": "cnnmod.module", "format_version": 1}
    meta["checksum"] = file_checksum({"m": odd}, meta)
    blob = save({"m": odd.view(torch.uint8)}, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].replace(b'"U8"', b'"BOOL"')
    (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + n:])
    with pytest.raises(CnnmodError, match="tensor m holds bools that are neither 0 nor 1"):
        read_file(tmp_path / "odd.safetensors")
