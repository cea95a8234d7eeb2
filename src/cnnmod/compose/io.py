"""Composed classifier files, module directories, and loading whatever classifier a path names."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CnnmodError
from ..files import read_file, read_metadata, write_file
from ..modules.io import FORMAT as MODULE_FORMAT
from ..modules.io import load_module, module_from_record, module_record
from .composed import ComposedClassifier, compose

FORMAT = "cnnmod.composed"
FORMAT_VERSION = 1


def save_composed(classifier: ComposedClassifier, path: str | os.PathLike) -> None:
    """Write all modules of ``classifier`` into one file (module k's tensors prefixed ``k.``)."""
    tensors, metas = {}, []
    for k, module in enumerate(classifier.modules_):
        t, meta = module_record(module)
        tensors.update({f"{k}.{name}": v for name, v in t.items()})
        metas.append(meta)
    write_file(path, tensors, {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": metas,
                               "rule": classifier.rule, "unknown_below": classifier.unknown_below})


def load_composed(path: str | os.PathLike) -> ComposedClassifier:
    tensors, meta = read_file(path, expect=FORMAT)
    if meta["format_version"] != FORMAT_VERSION:
        raise CnnmodError(f"{path}: expected composed format version {FORMAT_VERSION}, found {meta['format_version']!r}.")
    modules = []
    for k, m_meta in enumerate(meta.get("modules", [])):
        prefix = f"{k}."
        mine = {name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)}
        modules.append(module_from_record(mine, m_meta, f"{path} (module {k})"))
    return compose(modules, rule=meta.get("rule", "vote"), unknown_below=meta.get("unknown_below"))


def load_modules(path: str | os.PathLike) -> list:
    """Load every module file of a directory, ordered by class index then name."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CnnmodError(f"{path}: expected module files (*.safetensors), found none.")
    modules = [load_module(f) for f in files]
    return sorted(modules, key=lambda m: (m.class_index, m.class_name))


def load_classifier(paths: list[str]):
    """Return ("model", model) or ("composed", classifier) for a checkpoint, a composed file,
    a module directory, or a list of module files."""
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
    kinds = {p: read_metadata(p).get("format") for p in paths}
    wrong = [p for p, k in kinds.items() if k != MODULE_FORMAT]
    if wrong:
        raise CnnmodError(f"{wrong[0]}: expected a module file among several files, found a {kinds[wrong[0]]!r} file.")
    return "composed", compose([load_module(p) for p in paths])
