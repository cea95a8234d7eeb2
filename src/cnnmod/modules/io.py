"""Module files: one data-only safetensors file per class, self-contained (this file) or naming the
parent file it shares with the other modules of its folder (shared.py, format version 4)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.inputspec import InputSpec
from ..errors import CnnmodError
from ..files import read_file, write_file
from ..trace import Graph, overlaid, overlay_maps, plain
from ..trace.network import run_on_blank
from .compact import compact_map, expand_map
from .shared import PART_VERSIONS, full_record
from .module import Module

FORMAT = "cnnmod.module"
# 2 added "fill." and "addmap." tensors (the channels strategy); 3 stores such a map in its exact
# compact form where that is smaller ("<kind>_rows." and "<kind>_cols." index it; compact.py).
# Versions 1 and 2 still load, and a file is written in the lowest version that can hold it.
# 4 and 5 (shared.py) are modules of a decomposition folder: the parent's tensors in the parent file.
FORMAT_VERSION = 3
MAPS = ("fill", "addmap")


def module_record(module: Module, *, masks: bool = True) -> tuple[dict, dict]:
    """Return (tensors, metadata) that describe ``module`` completely (its masks too, unless a module
    part of a folder stores them itself: ``shared.part_record``)."""
    net = module.network
    graph, weights = plain(net)  # the file keeps the parent's layers and the overlays apart
    tensors = {f"w.{k}": v for k, v in weights.items()}
    if masks:
        tensors.update({f"mask.{k}": v for k, v in overlay_maps(net, "mask").items()})
    compacted, maps_of = False, {kind: overlay_maps(net, kind) for kind in MAPS}
    for kind, maps in maps_of.items():
        for k, full in maps.items():
            small = compact_map(full)
            if small is None:
                tensors[f"{kind}.{k}"] = full
            else:
                tensors[f"{kind}.{k}"], tensors[f"{kind}_rows.{k}"], tensors[f"{kind}_cols.{k}"] = small
                compacted = True
    # Files an older reader can run keep its version (the paper strategy's stay version 1, byte
    # for byte; channels modules whose maps do not compact stay version 2, byte for byte).
    version = FORMAT_VERSION if compacted else 2 if any(maps_of.values()) else 1
    meta = dict(module.meta, format=FORMAT, format_version=version, class_index=module.class_index,
                class_name=module.class_name, input=module.input_spec.to_dict(), graph=graph.to_dict())
    return tensors, meta


def module_from_record(tensors: dict, meta: dict, source: str = "module") -> Module:
    """Rebuild a module from ``module_record``'s output (as read from a file)."""
    if meta.get("format_version") not in (1, 2, FORMAT_VERSION):
        raise CnnmodError(f"{source}: expected module format version 1, 2 or {FORMAT_VERSION}, "
                          f"found {meta.get('format_version')!r} (written by another cnnmod version?).")
    fills, addmaps = (_full_maps(tensors, kind, source) for kind in MAPS)
    try:
        graph = Graph.from_dict(meta["graph"])
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}
        network = overlaid(graph, weights, masks=masks, fills=fills, addmaps=addmaps)
        module = Module(int(meta["class_index"]), str(meta["class_name"]), network,
                        InputSpec.from_dict(meta["input"]), meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CnnmodError(f"{source}: the module metadata is incomplete ({e}).") from None
    _check_runs(module, source)
    if masks or fills or addmaps:  # each shaped like its layer's output (a longer mask would be cut silently)
        spec = module.input_spec
        shapes = module.network.shapes((spec.channels, *spec.size))
        for kind, found in (("mask", masks), ("fill", fills), ("addmap", addmaps)):
            for layer, t in found.items():
                if tuple(t.shape) != shapes.get(layer):
                    raise CnnmodError(f"{source}: expected the {kind} of layer {layer} shaped like its output "
                                      f"{shapes.get(layer)}, found {tuple(t.shape)} (damaged file).")
    return module


def _full_maps(tensors: dict, kind: str, source: str) -> dict[str, torch.Tensor]:
    """The ``kind`` maps of a module record by layer, each expanded from its compact form if stored so."""
    prefix, maps = f"{kind}.", {}
    for key in [k for k in tensors if k.startswith((f"{kind}_rows.", f"{kind}_cols."))]:
        if prefix + key.split(".", 1)[1] not in tensors:
            raise CnnmodError(f"{source}: the index {key} belongs to no {kind} tensor (damaged file).")
    for key, values in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        rows, cols = tensors.get(f"{kind}_rows.{name}"), tensors.get(f"{kind}_cols.{name}")
        if rows is None and cols is None:
            maps[name] = values
            continue
        try:
            if rows is None or cols is None:
                raise ValueError("expected both a row and a column index, found one")
            maps[name] = expand_map(values, rows, cols)
        except ValueError as e:
            raise CnnmodError(f"{source}: the compact {kind} of layer {name} is damaged ({e}).") from None
    return maps


def _check_runs(module: Module, source: str) -> None:
    """Run the module once on a blank input: layers that do not fit together are refused now."""
    spec = module.input_spec
    if not (1 <= spec.channels <= 4 and 1 <= spec.size[0] * spec.size[1] <= 4096 * 4096):
        raise CnnmodError(f"{source}: expected an image input of 1-4 channels and at most 4096x4096 pixels, "
                          f"found {spec.channels} channels of {spec.size}.")
    out = run_on_blank(module.network, spec, f"{source}: the module's layers do not fit together")
    if tuple(out.shape) != (1, 2):
        raise CnnmodError(f"{source}: expected a module with two outputs, found output shape {tuple(out.shape)[1:]}.")


def save_module(module: Module, path: str | os.PathLike) -> None:
    """Write ``module`` to ``path`` (atomically; the same module always gives the same bytes)."""
    tensors, meta = module_record(module)
    write_file(path, tensors, meta)


def load_module(path: str | os.PathLike) -> Module:
    """Load a module file; nothing is executed, damaged files are refused. A module of a
    decomposition folder reads its parent's tensors from the parent file beside it (shared.py).

    >>> m = load_module("modules/cat.safetensors")
    >>> m.network(x)  # (B, 2) logits: not-cat, cat
    """
    tensors, meta = read_file(path, expect=FORMAT)
    if meta.get("format_version") not in PART_VERSIONS:
        return module_from_record(tensors, meta, str(path))
    tensors, meta, parent = full_record(tensors, meta, Path(path).parent, str(path))
    module = module_from_record(tensors, meta, str(path))
    module.parent = parent
    return module
