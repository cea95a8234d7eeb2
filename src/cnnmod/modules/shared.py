"""Modules that share their parent: a decomposition folder stores the parent's tensors once.

A folder written by ``decompose`` holds ``_parent-<checksum>.safetensors`` (the parent's tensors,
written once) and one small file per module: the tensors it does not share with the parent (its
head, its re-fitted layers), its masks packed as bits and compressed, and the checksum of the
parent it needs (format version 5; version 4, the same with uncompressed bits, still loads).
Loading such a module reads the parent file beside it (once per process and parent: the modules'
networks hold the same tensors, not copies) and refuses a parent whose checksum differs.
``save_module`` still writes one self-contained file, to give to someone else.

    decomposition/
      _parent-1f0c3a9e2b7d4c61.safetensors   the parent's tensors (cnnmod.parent)
      cat.safetensors                         cat's module: head, masks as compressed bits, ...
      dog.safetensors
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CnnmodError
from ..files import read_file, tensors_checksum, write_file
from ..bits import pack, unpack
from ..trace.network import GraphNetwork
from ..trace.ops import weight_keys

PARENT_FORMAT = "cnnmod.parent"
PART_VERSION = 5  # a module file that names its parent (module format version 5; 4 still loads)
PART_VERSIONS = (4, PART_VERSION)
# Version 5 stores every mask of a part as one zlib stream ("masks.zlib") of the layers' bits, in
# the order of the sorted layer names. Level 1 (zlib's fastest): on the masks of a 1,000-class
# ResNet-50 it keeps 0.39 of the bytes in 14 ms per module; level 6 keeps 0.36 in 45 ms, level 9
# 0.35 in 320 ms (measured in issue #16), and writing must stay a small part of a decomposition.
_ZLIB_LEVEL = 1
_PARENT_NAME = re.compile(r"_parent-[0-9a-f]{16}\.safetensors")


@dataclass
class ParentTensors:
    """The tensors modules of one parent share, and their checksum (``files.tensors_checksum``)."""

    checksum: str
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "ParentTensors":
        return cls(tensors_checksum(tensors), tensors)

    @property
    def filename(self) -> str:
        return f"_parent-{self.checksum[:16]}.safetensors"


def is_parent_file(path: Path) -> bool:
    return _PARENT_NAME.fullmatch(path.name) is not None


def module_files(folder: Path) -> list[Path]:
    """The module files of a folder (its parent files aside), sorted by name."""
    return [p for p in sorted(folder.glob("*.safetensors")) if not is_parent_file(p)]


def write_parent(folder: Path, parent: ParentTensors) -> Path:
    """Write the parent file into ``folder`` unless it is there already (its name is its checksum)."""
    path = folder / parent.filename
    if not path.exists():
        write_file(path, parent.tensors, {"format": PARENT_FORMAT, "format_version": 1,
                                          "tensors_checksum": parent.checksum})
    return path


def part_record(net: GraphNetwork, tensors: dict[str, torch.Tensor], meta: dict,
                parent: ParentTensors) -> tuple[dict, dict]:
    """A module record without its masks (``io.module_record(masks=False)``) made a part: the parent's
    own tensors left out (by identity: the network holds them as views), the masks added as bits
    (a bitmask's own, no unpacking), compressed into one stream."""
    out = {key: t for key, t in tensors.items()
           if not (key.startswith("w.") and key[2:] in parent.tensors and _same_storage(t, parent.tensors[key[2:]]))}
    bits, shapes = {}, {}
    for node in net.graph.nodes:
        name = node.name
        if "bitmask" in node.then:
            bits[name], shapes[name] = net.weight(f"{name}.bits"), net.weight(f"{name}.shape").tolist()
        elif "mask" in node.then or "fill" in node.then:
            mask = net.weight(f"{name}.mask")
            bits[name], shapes[name] = pack(mask.flatten()), list(mask.shape)
    if bits:
        stream = b"".join(bits[name].numpy().tobytes() for name in sorted(bits))
        out["masks.zlib"] = torch.frombuffer(bytearray(zlib.compress(stream, _ZLIB_LEVEL)), dtype=torch.uint8)
    meta = dict(meta, format_version=PART_VERSION, mask_shapes=shapes,
                parent={"file": parent.filename, "checksum": parent.checksum})
    return out, meta


# The most mask elements a part may declare (2**31: 256 MB of bits; a ResNet-50 at 224 px observes
# 9.6M): the shapes come from the file itself, so they bound what inflating it may allocate.
MAX_MASK_ELEMENTS = 2 ** 31


def _mask_bits(tensors: dict, meta: dict, shapes: dict, source: str) -> dict[str, torch.Tensor]:
    """Each layer's packed bits of a part: its ``bits.`` tensors (version 4) or its one stream (5),
    inflated no further than the masks' declared size, itself bounded (``MAX_MASK_ELEMENTS``)."""
    if meta.get("format_version") == 4:
        return {key[5:]: t for key, t in tensors.items() if key.startswith("bits.")}
    if not shapes:
        return {}
    sizes = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if not (isinstance(shape, list) and shape
                and all(type(d) is int and 0 < d <= MAX_MASK_ELEMENTS for d in shape)):  # not bool: True is 1
            raise CnnmodError(f"{source}: expected the shape of layer {name}'s mask, found {shape!r} (damaged file).")
        sizes[name] = (math.prod(shape) + 7) // 8
    if 8 * sum(sizes.values()) > MAX_MASK_ELEMENTS:
        raise CnnmodError(f"{source}: expected at most {MAX_MASK_ELEMENTS:,} mask elements, found "
                          f"{8 * sum(sizes.values()):,} declared (damaged file).")
    stream, size = tensors.get("masks.zlib"), sum(sizes.values())
    try:
        if stream is None or stream.dtype != torch.uint8 or stream.dim() != 1:
            raise zlib.error("no stream of bytes")
        inflate = zlib.decompressobj()
        data = inflate.decompress(stream.numpy().tobytes(), size)
        if inflate.unconsumed_tail or (len(data) == size and not inflate.eof):
            raise zlib.error(f"more than the {size} bytes of masks its shapes declare")
        if inflate.unused_data:
            raise zlib.error("data after the end of the stream")
        if len(data) != size:
            raise zlib.error(f"{len(data)} bytes of masks where {size} were expected")
    except zlib.error as e:
        raise CnnmodError(f"{source}: expected the module's masks as one zlib stream, found a damaged one "
                          f"({e}).") from None
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return dict(zip(sizes, flat.split(list(sizes.values()))))


def full_record(tensors: dict, meta: dict, folder: Path, source: str) -> tuple[dict, dict, ParentTensors]:
    """The self-contained record of a module part read from ``folder``: its parent's tensors added,
    its bits unpacked to masks; refuses a missing parent or one with another checksum."""
    ref = meta.get("parent")
    if not (isinstance(ref, dict) and isinstance(ref.get("file"), str) and _PARENT_NAME.fullmatch(ref["file"])
            and isinstance(ref.get("checksum"), str)):
        raise CnnmodError(f"{source}: expected the name and checksum of the module's parent file, found {ref!r}.")
    parent = load_parent(folder / ref["file"], source)
    if parent.checksum != ref["checksum"]:
        raise CnnmodError(f"{source}: expected parent {ref['checksum'][:16]}, found {folder / ref['file']} holding "
                          f"parent {parent.checksum[:16]}; the module belongs to another model.")
    full = {f"w.{k}": v for k, v in parent.tensors.items()}
    shapes = meta.get("mask_shapes")
    if not isinstance(shapes, dict):
        raise CnnmodError(f"{source}: expected the shapes of the module's masks, found {shapes!r}.")
    full.update({key: t for key, t in tensors.items() if not key.startswith(("bits.", "masks."))})
    for name, t in _mask_bits(tensors, meta, shapes, source).items():
        shape = shapes.get(name)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)
                and t.dtype == torch.uint8 and t.shape == ((math.prod(shape) + 7) // 8,)):
            raise CnnmodError(f"{source}: the bits of layer {name} do not fit its mask shape {shape!r} (damaged file).")
        full[f"mask.{name}"] = unpack(t, math.prod(shape)).view(shape)
    meta = {k: v for k, v in meta.items() if k not in ("parent", "mask_shapes")}
    meta["format_version"] = 3  # a self-contained record, as io.module_from_record reads it
    return full, meta, parent


_CACHE: dict[tuple, ParentTensors] = {}


def load_parent(path: Path, source: str) -> ParentTensors:
    """Read a parent file (once per file version: modules of a folder share its tensors)."""
    if not path.is_file():
        raise CnnmodError(f"{source}: expected its parent file {path.name} beside it, found none.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        tensors, meta = read_file(path, expect=PARENT_FORMAT)
        if meta.get("tensors_checksum") != tensors_checksum(tensors):
            raise CnnmodError(f"{path}: the tensors do not match the parent checksum in its metadata (damaged file).")
        while len(_CACHE) >= 4:  # a few parents at a time are enough for a folder; files can be large
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = ParentTensors(meta["tensors_checksum"], tensors)
    return _CACHE[key]


def shared_bytes(weights: dict[str, torch.Tensor], parent: ParentTensors) -> int:
    """Bytes of a network's tensors that are the parent's own (what a part file leaves out)."""
    return sum(t.numel() * t.element_size() for key, t in weights.items()
               if key in parent.tensors and _same_storage(t, parent.tensors[key]))


def identity(t: torch.Tensor) -> tuple:
    """What makes two tensors one and the same (the same memory viewed the same way)."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return identity(a) == identity(b)


def share_equal_tensors(networks: list[GraphNetwork]) -> None:
    """Where every network holds an equal tensor under one name (a shared trunk's layers, built or
    re-fitted alike for every module), make them hold one tensor: memory for one, and a folder that
    stores it once (``with_common``)."""
    if len(networks) < 2:
        return
    for key in networks[0].weight_names:
        first = networks[0].weight(key)
        others = [net.weight(key) for net in networks[1:]]
        if all(t is not None and (_same_storage(t, first) or (t.shape == first.shape and t.dtype == first.dtype
                                                             and torch.equal(t, first))) for t in others):
            for net, t in zip(networks[1:], others):
                if not _same_storage(t, first):  # the parent's own tensors are one already
                    net.set_weight(key, first)


def with_common(parent: ParentTensors, networks: list[GraphNetwork]) -> ParentTensors:
    """``parent`` with the tensors that all of ``networks`` (two or more) hold as one and that are not
    the parent's own put in its place under their names: what a folder's parent file then stores once
    for all its modules (a shared trunk of pruned layers). ``parent`` itself when there are none."""
    if len(networks) < 2:
        return parent
    # the layers' own tensors: masks and fills are stored as bits, apart
    layers = {k for node in networks[0].graph.nodes for k in weight_keys(node, overlays=False).values()}
    common = {}
    for key in sorted(layers & set(networks[0].weight_names)):
        t = networks[0].weight(key)
        if all(_same_storage(net.weight(key), t) for net in networks[1:] if key in net.weight_names) \
                and all(key in net.weight_names for net in networks[1:]) \
                and not (key in parent.tensors and _same_storage(parent.tensors[key], t)):
            common[key] = t
    return ParentTensors.of({**parent.tensors, **common}) if common else parent

