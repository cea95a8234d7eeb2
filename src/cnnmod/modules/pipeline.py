"""The command line's decomposition: checkpoint + data spec -> a directory of module files."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import load_model
from ..data import load_data
from ..distributed import finish, init_from_env, rank_and_world, resolve_device  # noqa: F401
from .decompose import decompose
from .io import save_module
from .module import Module


def module_filename(name: str) -> str:
    """A safe file name for a class: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "class"


def write_modules(modules: list[Module], out: str | os.PathLike, *, progress: bool = False) -> list[Path]:
    """Write ``out/<class>.safetensors`` for every module; ``out`` is replaced as a whole.

    The files are written into a fresh sibling directory that is renamed into place at the end,
    so an interrupted run leaves ``out`` as it was and no partial module file behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        names, paths = set(), []
        for m in tqdm(modules, desc="writing modules", unit="module", disable=not progress):
            name = module_filename(m.class_name)
            while name in names:
                name += "_"
            names.add(name)
            save_module(m, tmp / f"{name}.safetensors")
            paths.append(out / f"{name}.safetensors")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def decompose_to_directory(checkpoint: str, data: str, out: str, *, split: str | None = None,
                           progress: bool = False, resume: bool = False, **options) -> dict:
    """Decompose a checkpoint on a data spec and write its modules; return a summary.

    The statistics are saved to ``<out>.stats-progress.safetensors`` while they are collected;
    ``resume=True`` continues an interrupted run from there.
    """
    start = time.perf_counter()
    model = load_model(checkpoint)
    spec = model.input_spec
    dataset = load_data(data, split, default_split="train", channels=spec.channels, size=spec.size)
    device = resolve_device(options.pop("device", "auto"))
    distributed = init_from_env(device)
    rank = rank_and_world()[0]
    progress_file = Path(out).with_name(Path(out).name + ".stats-progress.safetensors")
    try:
        modules = decompose(model, dataset, progress=progress, progress_file=str(progress_file), resume=resume,
                            device=str(device), **options)
        if rank == 0:  # one writer; every rank built the same modules
            write_modules(modules, out, progress=progress)
    finally:
        if distributed:
            finish()
    return {
        "rank": rank,
        "seconds": time.perf_counter() - start,
        "statistics_seconds": modules[0].timing["statistics_seconds"],
        "images": modules[0].timing["images"],
        "strategy": modules[0].meta["strategy"],
        "modules": {m.class_name: {k: m.meta[k] for k in ("share_kept", "observed_images", "params_fraction",
                                                          "flops_fraction") if k in m.meta}
                    for m in modules},
    }
