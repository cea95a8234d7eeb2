"""The command line's decomposition: checkpoint + data spec -> a directory of module files."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import load_model
from ..data import load_data
from ..distributed import finish, init_from_env, rank_and_world, resolve_device  # noqa: F401
from ..errors import CnnmodError
from ..files import read_metadata, write_file
from .decompose import decompose
from .io import FORMAT as MODULE_FORMAT
from .io import module_record
from .module import Module
from .distill import training_macs
from .strategies import STRATEGIES
from .shared import (PARENT_FORMAT, is_parent_file, module_files, part_record, shared_bytes, with_common,
                     write_parent)


def module_filename(name: str) -> str:
    """A safe file name for a class: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "class"
    return "class" + name if is_parent_file(Path(name + ".safetensors")) else name


def save_modules(modules: list[Module], folder: str | os.PathLike) -> list[Path]:
    """Write ``modules`` into the module folder ``folder`` as ``cnnmod decompose --out`` does: one
    small file per module and, where it saves bytes, one parent file holding the tensors they share
    (the parent's, a shared trunk's), masks as compressed bits. The same rules as ``--out``: the
    folder must be missing, empty or a module folder; a module of the same class is replaced, others
    are kept. ``load_modules(folder)`` reads it back. Returns the module files written.

    >>> save_modules(decompose(model, data), "modules/"); load_modules("modules/")
    """
    return write_modules(modules, folder)


def write_modules(modules: list[Module], out: str | os.PathLike, *, progress: bool = False,
                  shared: bool = True) -> list[Path]:
    """Write ``out/<class>.safetensors`` for every module; other modules already in ``out`` are kept.

    ``shared``: modules that share their parent's tensors store them once, in a parent file of the
    folder (shared.py), wherever that takes fewer bytes than self-contained files.

    ``out`` must be missing, empty, or a module folder (nothing but cnnmod module files): cnnmod
    never deletes or overwrites a file it did not write, so any other folder is refused before
    anything is written. A module file of the same class is replaced. All files are first written
    into a hidden staging folder inside ``out`` and only then renamed into place, so an
    interrupted run leaves no partial module file behind.
    """
    out = Path(out)
    names = _file_names(modules)
    existing = module_folder_contents(out)
    for name, module in zip(names, modules):
        held = existing.get(f"{name}.safetensors")
        if held is not None and held != module.class_name:
            raise CnnmodError(f"{out / (name + '.safetensors')}: expected class {module.class_name!r}'s module "
                              f"to replace, found class {held!r}'s; choose another folder.")
    out.mkdir(parents=True, exist_ok=True)  # with the user's umask
    if shared:  # the tensors all modules of one parent hold as one (a pruned shared trunk) are stored once too
        groups: dict[str, list[Module]] = {}
        for m in modules:
            if m.parent is not None:
                groups.setdefault(m.parent.checksum, []).append(m)
        for group in groups.values():
            common = with_common(group[0].parent, [m.network for m in group])
            for m in group:
                m.parent = common
    parents = _worth_sharing(modules) if shared else set()
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".cnnmod-staging-"))
    try:
        bar = tqdm(modules, desc="writing modules", unit="module", disable=not (progress and sys.stderr.isatty()))
        for name, m in zip(names, bar):
            if m.parent is not None and m.parent.checksum in parents:
                if not (out / m.parent.filename).exists():
                    write_parent(staging, m.parent)
                tensors, meta = part_record(m.network, *module_record(m, masks=False), m.parent)
            else:
                tensors, meta = module_record(m)
            write_file(staging / f"{name}.safetensors", tensors, meta)
        paths = []
        for entry in sorted(staging.iterdir(), key=lambda p: not is_parent_file(p)):  # no module without its parent
            os.replace(entry, out / entry.name)
        for name in names:
            paths.append(out / f"{name}.safetensors")
        _remove_unused_parents(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _remove_unused_parents(folder: Path) -> None:
    """Delete the parent files (ours) that no module of the folder names any more (all replaced)."""
    try:
        needed = {(read_metadata(p).get("parent") or {}).get("file") for p in module_files(folder)}
    except CnnmodError:  # a module we cannot read: keep every parent
        return
    for parent in folder.glob("_parent-*.safetensors"):
        if is_parent_file(parent) and parent.name not in needed \
                and read_metadata(parent).get("format") == PARENT_FORMAT:
            parent.unlink()


def _worth_sharing(modules: list[Module]) -> set[str]:
    """The parents (checksums) whose modules, stored as parts, take fewer bytes than self-contained."""
    saved: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for m in modules:
        if m.parent is not None:
            saved[m.parent.checksum] = saved.get(m.parent.checksum, 0) + shared_bytes(m.network.weights(), m.parent)
            if m.parent.checksum not in sizes:
                sizes[m.parent.checksum] = sum(t.numel() * t.element_size() for t in m.parent.tensors.values())
    return {c for c in saved if saved[c] > sizes[c]}


def _file_names(modules: list[Module]) -> list[str]:
    names: list[str] = []
    for m in modules:
        name = module_filename(m.class_name)
        while name in names:
            name += "_"
        names.append(name)
    return names


def module_folder_contents(folder: Path) -> dict[str, str]:
    """Return {file name: class name} of a module folder ({} if missing or empty); refuse any other folder."""
    if not folder.exists():
        return {}
    if not folder.is_dir():
        raise CnnmodError(f"{folder}: expected a folder for the module files, found a file.")
    held = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".cnnmod-staging-"):
            continue  # an interrupted run's leftovers (ours)
        meta = None
        if entry.is_file() and entry.suffix == ".safetensors":
            try:
                meta = read_metadata(entry)
            except CnnmodError:
                pass
        if meta is not None and meta.get("format") == PARENT_FORMAT and is_parent_file(entry):
            continue  # the parent its modules share
        if meta is None or meta.get("format") != MODULE_FORMAT:
            raise CnnmodError(f"{folder}: expected an empty folder or a folder of cnnmod module files, found "
                              f"{entry.name!r}; cnnmod never deletes or overwrites files it did not write "
                              "(choose another --out).")
        held[entry.name] = str(meta.get("class_name"))
    return held


def decompose_to_directory(checkpoint: str, data: str, out: str, *, split: str | None = None,
                           progress: bool = False, resume: bool = False, **options) -> dict:
    """Decompose a checkpoint on a data spec and write its modules; return a summary.

    An image folder is listed, not decoded: its images are read batch by batch as the statistics
    pass needs them (``load_data(..., stream=True)``), so a folder of any size starts at once.

    The statistics are saved to ``<out>.stats-progress.safetensors`` while they are collected (a
    distillation's state to ``<out>.distill-progress.safetensors``); ``resume=True`` continues an
    interrupted run from there.
    """
    start = time.perf_counter()
    out = Path(out).resolve()  # "." and "dir/" have no name of their own to put the progress file beside
    before = module_folder_contents(out)  # a folder we may not write to is refused before the long pass
    model = load_model(checkpoint)
    spec = model.input_spec
    dataset = load_data(data, split, default_split="train", channels=spec.channels, size=spec.size,
                        crop_pct=spec.crop_pct, stream=True)
    device = resolve_device(options.pop("device", "auto"))
    distributed = init_from_env(device)
    rank = rank_and_world()[0]
    progress_file = out.with_name(out.name + ".stats-progress.safetensors")
    distill_file = out.with_name(out.name + ".distill-progress.safetensors")
    try:
        modules = decompose(model, dataset, progress=progress, progress_file=str(progress_file), resume=resume,
                            device=str(device), distill_progress_file=str(distill_file), **options)
        paths = write_modules(modules, out, progress=progress) if rank == 0 else []  # one writer
    finally:
        if distributed:
            finish()
    first = modules[0]
    return {
        "rank": rank,
        "seconds": time.perf_counter() - start,
        "statistics_seconds": first.timing["statistics_seconds"],
        "images": first.timing["images"],
        "negatives_from": first.timing["negatives_from"],
        "statistics_macs": first.timing["statistics_macs"],
        "statistics_share_of_parent_training": _share(first.timing["statistics_macs"], model,
                                                      first.timing["statistics_macs"] // first.timing["images"]),
        "calibration_macs": first.timing["calibration_macs"],
        "calibration_share_of_parent_training": _share(first.timing["calibration_macs"], model,
                                                       first.timing["statistics_macs"] // first.timing["images"]),
        "held_back": first.timing.get("held_back"),
        **({"max_loss": first.meta["max_loss"]} if "max_loss" in first.meta else {}),
        "strategy": first.meta["strategy"],
        "modules": {m.class_name: dict({k: m.meta[k] for k in ("share_kept", "observed_images", "params_fraction",
                                                               "macs_fraction", "channels_prunable", "channels_kept",
                                                               "elements_total") if k in m.meta},
                                       kept=STRATEGIES[m.meta["strategy"]].kept(m.meta),  # one phrase, as inspect's
                                       **({"file_bytes": p.stat().st_size} if paths else {}))
                    for m, p in zip(modules, paths or [None] * len(modules))},
        "files": {str(p): p.stat().st_size for p in paths},
        "kept": sorted(set(before) - {p.name for p in paths}),  # other modules already in the folder
        **({"distillation": _distillation(first.meta["distillation"], model)} if "distillation" in first.meta else {}),
    }


def _distillation(report: dict, model) -> dict:
    """The distillation's cost, and its share of what training the parent cost where its checkpoint says."""
    share = _share(report["macs"], model, report["parent_macs_per_image"])
    return dict(report, share_of_parent_training=share)


def _share(macs: int, model, macs_per_image: int) -> float | None:
    """``macs`` as a share of what training the parent cost (None: its checkpoint records no recipe)."""
    parent = training_macs(getattr(model, "cnnmod_meta", {}), macs_per_image)
    return macs / parent if parent else None
