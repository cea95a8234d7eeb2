"""Module files: one self-contained, data-only safetensors file per class."""

from __future__ import annotations

import os

import torch

from ..data.inputspec import InputSpec
from ..errors import CnnmodError
from ..files import read_file, write_file
from ..trace import Graph, GraphNetwork
from .module import Module

FORMAT = "cnnmod.module"
FORMAT_VERSION = 2  # 2 added "fill." and "addmap." tensors (the channels strategy); 1 still loads


def module_record(module: Module) -> tuple[dict, dict]:
    """Return (tensors, metadata) that describe ``module`` completely."""
    net = module.network
    tensors = {f"w.{k}": v for k, v in net.weights().items()}
    tensors.update({f"mask.{k}": v for k, v in net.masks().items()})
    tensors.update({f"fill.{k}": v for k, v in net.fills().items()})
    tensors.update({f"addmap.{k}": v for k, v in net.addmaps().items()})
    # Files a version-1 reader can run stay version 1 (the paper strategy's are byte-identical).
    version = FORMAT_VERSION if net.fill_names or net.addmap_names else 1
    meta = dict(module.meta, format=FORMAT, format_version=version, class_index=module.class_index,
                class_name=module.class_name, input=module.input_spec.to_dict(), graph=net.graph.to_dict())
    return tensors, meta


def module_from_record(tensors: dict, meta: dict, source: str = "module") -> Module:
    """Rebuild a module from ``module_record``'s output (as read from a file)."""
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise CnnmodError(f"{source}: expected module format version 1 or {FORMAT_VERSION}, "
                          f"found {meta.get('format_version')!r} (written by another cnnmod version?).")
    try:
        graph = Graph.from_dict(meta["graph"])
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        masks = {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}
        fills = {k[5:]: v for k, v in tensors.items() if k.startswith("fill.")}
        addmaps = {k[7:]: v for k, v in tensors.items() if k.startswith("addmap.")}
        network = GraphNetwork(graph, weights, masks, fills, addmaps)
        module = Module(int(meta["class_index"]), str(meta["class_name"]), network,
                        InputSpec.from_dict(meta["input"]), meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CnnmodError(f"{source}: the module metadata is incomplete ({e}).") from None
    _check_runs(module, source)
    return module


def _check_runs(module: Module, source: str) -> None:
    """Run the module once on a blank input: layers that do not fit together are refused now."""
    spec = module.input_spec
    if not (1 <= spec.channels <= 4 and 1 <= spec.size[0] * spec.size[1] <= 4096 * 4096):
        raise CnnmodError(f"{source}: expected an image input of 1-4 channels and at most 4096x4096 pixels, "
                          f"found {spec.channels} channels of {spec.size}.")
    try:
        with torch.no_grad():
            out = module.network(torch.zeros(1, spec.channels, *spec.size))
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as e:
        raise CnnmodError(f"{source}: the module's layers do not fit together "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    if tuple(out.shape) != (1, 2):
        raise CnnmodError(f"{source}: expected a module with two outputs, found output shape {tuple(out.shape)[1:]}.")


def save_module(module: Module, path: str | os.PathLike) -> None:
    """Write ``module`` to ``path`` (atomically; the same module always gives the same bytes)."""
    tensors, meta = module_record(module)
    write_file(path, tensors, meta)


def load_module(path: str | os.PathLike) -> Module:
    """Load a module file; nothing is executed, damaged files are refused.

    >>> m = load_module("modules/cat.safetensors")
    >>> m.network(x)  # (B, 2) logits: not-cat, cat
    """
    tensors, meta = read_file(path, expect=FORMAT)
    return module_from_record(tensors, meta, str(path))
