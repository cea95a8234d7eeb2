"""Composed classifier files, module directories, and loading whatever classifier a path names.

A composed file holds each module's record, module k's tensors prefixed ``k.``. Modules of one
parent hold many identical tensors (the whole parent but the head for the paper strategy, the
shared trunk for the channels strategy's ``--trunk``), so each distinct tensor (same dtype,
shape and bytes) is stored once: the metadata's ``aliases`` name, for every other copy, the
stored tensor it repeats, with its dtype and shape, which loading checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CnnmodError
from ..files import read_file, read_metadata, write_file
from ..modules.io import FORMAT as MODULE_FORMAT
from ..modules.io import load_module, module_from_record, module_record
from ..modules.shared import module_files
from .composed import ComposedClassifier, compose

FORMAT = "cnnmod.composed"
FORMAT_VERSION = 2  # 2 stores each distinct tensor once ("aliases"); 1 still loads


def save_composed(classifier: ComposedClassifier, path: str | os.PathLike) -> None:
    """Write all modules of ``classifier`` into one file, each distinct tensor once (deterministic)."""
    tensors, metas = {}, []
    for k, module in enumerate(classifier.modules_):
        t, meta = module_record(module)
        tensors.update({f"{k}.{name}": t[name] for name in sorted(t)})
        metas.append(meta)
    stored, aliases = _deduplicated(tensors)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION if aliases else 1, "modules": metas,
            "rule": classifier.rule, "unknown_below": classifier.unknown_below}
    if aliases:  # a file without repeats stays version 1, readable by an older cnnmod
        meta["aliases"] = aliases
    write_file(path, stored, meta)


def _deduplicated(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Keep the first tensor (in ``tensors``' order) of each (dtype, shape, bytes); alias the rest."""
    stored, aliases, first = {}, {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        if key in first:
            aliases[name] = {"of": first[key], "dtype": key[0].removeprefix("torch."), "shape": list(key[1])}
        else:
            first[key], stored[name] = name, t
    return stored, aliases


def _resolve_aliases(tensors: dict[str, torch.Tensor], aliases, path) -> dict[str, torch.Tensor]:
    """Add every alias of a version-2 file as its own copy of the tensor it names (checked)."""
    if not isinstance(aliases, dict):
        raise CnnmodError(f"{path}: expected the aliases as a JSON object, found {type(aliases).__name__} "
                          "(damaged file).")
    resolved = dict(tensors)
    for name, alias in aliases.items():
        target = alias.get("of") if isinstance(alias, dict) else None
        if name in tensors or not isinstance(target, str) or target not in tensors:
            raise CnnmodError(f"{path}: the alias {name!r} names no stored tensor ({alias!r}; damaged file).")
        t = tensors[target]
        found = {"of": target, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if alias != found:
            raise CnnmodError(f"{path}: the alias {name!r} expects a {alias.get('dtype')} tensor of shape "
                              f"{alias.get('shape')}, found {target!r}, a {found['dtype']} tensor of shape "
                              f"{found['shape']} (damaged file).")
        resolved[name] = t.clone()  # each module owns its tensors, as when they were saved
    return resolved


def load_composed(path: str | os.PathLike) -> ComposedClassifier:
    """Load a composed file (format version 1 or 2); damaged files are refused.

    >>> clf = load_composed("pets.safetensors")
    >>> clf.score_images(images).argmax(1)  # index into clf.classes
    """
    tensors, meta = read_file(path, expect=FORMAT)
    if meta["format_version"] not in (1, FORMAT_VERSION):
        raise CnnmodError(f"{path}: expected composed format version 1 or {FORMAT_VERSION}, "
                          f"found {meta['format_version']!r}.")
    if meta["format_version"] == FORMAT_VERSION:
        tensors = _resolve_aliases(tensors, meta.get("aliases", {}), path)
    modules = []
    for k, m_meta in enumerate(meta.get("modules", [])):
        prefix = f"{k}."
        mine = {name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)}
        modules.append(module_from_record(mine, m_meta, f"{path} (module {k})"))
    return compose(modules, rule=meta.get("rule", "vote"), unknown_below=meta.get("unknown_below"))


def load_modules(path: str | os.PathLike) -> list:
    """Load every module file of a directory, ordered by class index then name."""
    path = Path(path)
    if not path.is_dir():
        raise CnnmodError(f"{path}: expected a module folder, found {'a file' if path.exists() else 'no such folder'}.")
    files = module_files(path)
    if not files:
        raise CnnmodError(f"{path}: expected module files (*.safetensors), found none.")
    modules = [load_module(f) for f in files]
    return sorted(modules, key=lambda m: (m.class_index, m.class_name))


def load_classifier(paths: list[str]):
    """Return ("model", model), ("module", module) or ("composed", classifier) for a checkpoint, a
    single module file, a composed file, a module directory, or a list of module files."""
    from ..checkpoint import FORMAT as CHECKPOINT_FORMAT
    from ..checkpoint import load_model

    if len(paths) == 1 and Path(paths[0]).is_dir():
        return "composed", compose(load_modules(paths[0]))
    if len(paths) == 1:
        kind = read_metadata(paths[0]).get("format") if Path(paths[0]).is_file() else None
        if kind == CHECKPOINT_FORMAT or kind is None:
            return "model", load_model(paths[0])  # load_model reports a missing/foreign file
        if kind == FORMAT:
            return "composed", load_composed(paths[0])
        if kind == MODULE_FORMAT:
            return "module", load_module(paths[0])
    kinds = {p: read_metadata(p).get("format") for p in paths}
    wrong = [p for p, k in kinds.items() if k != MODULE_FORMAT]
    if wrong:
        raise CnnmodError(f"{wrong[0]}: expected a module file among several files, found a {kinds[wrong[0]]!r} file.")
    return "composed", compose([load_module(p) for p in paths])
