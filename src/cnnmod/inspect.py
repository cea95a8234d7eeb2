"""``cnnmod inspect``: say what a checkpoint, module or composed file, or a module folder holds."""

from __future__ import annotations

from pathlib import Path

from .errors import CnnmodError
from .files import read_file
from .modules.shared import is_parent_file, module_files


def describe(path: str) -> tuple[str, dict]:
    """Return (readable text, metadata without the layer graph) of a cnnmod file or module folder."""
    from .modules.strategies import STRATEGIES

    if Path(path).is_dir():
        return describe_folder(path)
    tensors, meta = read_file(path)
    shown = {k: v for k, v in meta.items() if k != "graph"}
    if meta["format"] == "cnnmod.composed":
        shown["modules"] = [{k: v for k, v in m.items() if k != "graph"} for m in meta["modules"]]
    n_values = sum(t.numel() for t in tensors.values())
    shown["file_bytes"] = Path(path).stat().st_size
    kind = meta["format"].split(".")[-1]
    lines = [f"{path}: cnnmod {kind} (format version {meta['format_version']}), {shown['file_bytes']:,} bytes on disk, "
             f"{len(tensors)} tensors, {n_values:,} values"]
    if kind == "checkpoint":
        acc = meta.get("accuracy", {})
        lines += [f"  architecture {meta['architecture']} {meta['arch_args']}",
                  f"  classes ({len(meta['classes'])}): {', '.join(meta['classes'][:20])}",
                  f"  input {meta['input']}",
                  f"  accuracy on {acc.get('split')}: top-1 {acc.get('top1', float('nan')):.4f}"]
    elif kind == "module":
        row = module_row(path)
        shown["cost"] = {"params": row["params"], "macs": row["macs"]}
        lines += [f"  class {meta['class_name']!r} (index {meta['class_index']} of {len(meta['parent_classes'])} "
                  f"in parent {meta['parent_fingerprint']}, {meta.get('parent_architecture')})",
                  f"  strategy {meta['strategy']} {meta['options']}",
                  f"  observed {meta['observed_images']} images; {STRATEGIES[meta['strategy']].kept(meta)}",
                  f"  input {meta['input']}",
                  *(["  channel spaces kept whole: " + "; ".join(f"{n} ({r})" for r, n in
                                                                  meta["spaces_kept_whole"].items())]
                    if meta.get("spaces_kept_whole") else []),
                  f"  {row['params']:,} parameters, {row['macs']:,} multiply-accumulates per image"
                  + (f" ({meta['params_fraction']:.3f} and {_macs_fraction(meta):.3f} of the parent's)"
                     if "params_fraction" in meta else "")]
    elif kind == "parent":
        lines += ["  the parent's tensors, shared by the modules of its folder (each names this checksum): "
                  f"{meta['tensors_checksum'][:16]}"]
    elif kind == "observation":
        lines += [f"  one statistics pass: classes ({len(meta['classes'])}): {', '.join(meta['classes'][:20])}",
                  f"  input {meta['input']}; build modules from it with cnnmod.build(cnnmod.load_observation(...))"]
    else:
        from .compose.io import load_composed

        c = load_composed(path).cost()
        shown["cost"] = c
        lines += [f"  classes ({len(meta['modules'])}): " + ", ".join(m["class_name"] for m in meta["modules"]),
                  f"  {c['params']:,} parameters, {c['macs']:,} multiply-accumulates per image "
                  f"(shared trunk: {c['trunk_params']:,} parameters, {c['trunk_macs']:,} MACs, run once; "
                  f"the modules one by one: {c['separate_macs']:,} MACs)"]
    return "\n".join(lines), shown


def _macs_fraction(meta: dict) -> float:
    return meta.get("macs_fraction", meta.get("flops_fraction", float("nan")))  # files before 0.1 said "flops"


def module_row(path) -> dict:
    """One module file's row: class, strategy, parameters, MACs, bytes on disk, calibration, parent."""
    from .modules.extract import cost
    from .modules.io import load_module

    m = load_module(path)
    spec = m.input_spec
    c = cost(m.network, (spec.channels, *spec.size))
    cal = m.meta.get("calibration")
    return {"file": Path(path).name, "class": m.class_name, "strategy": m.meta.get("strategy"),
            "params": c["params"], "macs": c["macs"], "file_bytes": Path(path).stat().st_size,
            "calibration": None if cal is None else {"a": cal["a"], "b": cal["b"]},
            "parent": m.meta.get("parent_fingerprint"), "parent_architecture": m.meta.get("parent_architecture")}


def describe_folder(path: str) -> tuple[str, dict]:
    """One table row per module file of a folder (other files are named and left alone)."""
    folder = Path(path)
    files = module_files(folder)
    if not files:
        raise CnnmodError(f"{folder}: expected module files (*.safetensors), found none.")
    rows = [module_row(f) for f in files]
    header = ("class", "strategy", "parameters", "MACs", "bytes on disk", "calibration a, b", "parent")
    table = [header] + [(r["class"], r["strategy"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['file_bytes']:,}",
                         "none" if r["calibration"] is None
                         else f"{r['calibration']['a']:.4g}, {r['calibration']['b']:.4g}",
                         r["parent"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    right = {2, 3, 4}
    parents = [p for p in sorted(folder.glob("*.safetensors")) if is_parent_file(p)]
    shared = sum(p.stat().st_size for p in parents)
    lines = [f"{folder}: {len(rows)} module file{'s' if len(rows) != 1 else ''}, "
             f"{sum(r['file_bytes'] for r in rows) + shared:,} bytes on disk"
             + (f" (the parent's tensors, shared, {shared:,} of them)" if parents else "") + ", "
             f"{len({r['parent'] for r in rows})} parent model{'s' if len({r['parent'] for r in rows}) != 1 else ''}"]
    for row in table:
        lines.append(("  " + "  ".join(f"{str(v):>{w}}" if i in right else f"{str(v):<{w}}"
                                       for i, (v, w) in enumerate(zip(row, widths)))).rstrip())
    return "\n".join(lines), {"folder": str(folder), "modules": rows,
                              "parent_files": {p.name: p.stat().st_size for p in parents}}


def describe_metrics(folder: str, data: str | None = None, split: str | None = None, per_class: int = 50,
                     plot: str | None = None) -> tuple[str, dict]:
    """The modularity metrics of a module folder's modules (``modules/metrics.py``): kernel retention
    per module, the overlap matrix, and with ``data`` (images of the modules' classes, as the command
    line names them; its test split unless ``split``) cohesion and coupling on the first
    ``per_class`` images of each class."""
    import torch

    from .compose.io import load_modules
    from .modules.metrics import cohesion_coupling, overlap, retention

    modules = load_modules(folder)
    if len(modules) < 2:
        raise CnnmodError(f"{folder}: expected two or more modules to compare, found {len(modules)}.")
    names = [m.class_name for m in modules]
    matrix = overlap(modules)
    k = len(modules)
    others = (matrix.sum(1) - matrix.diagonal()) / (k - 1)
    rows = [{"class": n, "retention": retention(m), "mean_overlap": float(o)}
            for n, m, o in zip(names, modules, others)]
    coupling = float(others.mean())
    result = {"folder": str(folder), "strategy": modules[0].meta.get("strategy"), "modules": rows,
              "overlap": matrix.tolist(), "mean_retention": sum(r["retention"] for r in rows) / k,
              "module_coupling": coupling}
    width = max(len(n) for n in names + ["class"])
    lines = [f"{folder}: modularity of {k} modules ({result['strategy']} strategy)",
             f"  {'class':<{width}}  kernel retention  mean overlap with the others (Jaccard)"]
    lines += [f"  {r['class']:<{width}}  {r['retention']:>16.4f}  {r['mean_overlap']:>.4f}" for r in rows]
    lines.append(f"  mean kernel retention {result['mean_retention']:.4f}; mean overlap of two modules "
                 f"{coupling:.4f}")
    if data is not None:
        from .data import load_data_for

        data = load_data_for(data, split, [modules[0].input_spec], default_split="test")
        missing = [n for n in names if n not in data.classes]
        if missing:
            raise CnnmodError(f"expected images of every module's class in the data, found none of "
                              f"{', '.join(missing[:5])}.")
        spec = modules[0].input_spec
        chosen = [torch.nonzero(data.labels == data.classes.index(n)).flatten()[:per_class] for n in names]
        index = torch.cat(chosen)
        labels = torch.cat([torch.full((len(c),), i) for i, c in enumerate(chosen)])
        found = cohesion_coupling(modules, spec.prepare(data.images_for(spec)[index]), labels)
        result.update(found)
        lines.append(f"  on {found['images']:,} images ({per_class} per class at most), each through its class's "
                     f"module: cohesion {found['cohesion']:.4f}, coupling {found['coupling']:.4f} (mean Jaccard "
                     f"index of the active kernels of two images of one class / of two classes)")
    if plot is not None:
        from .plot import plot_overlap

        plot_overlap(names, matrix.tolist(), plot, title=f"{folder}: overlap of kept kernels")
        lines.append(f"wrote {plot}")
    return "\n".join(lines), result
