"""``cnnmod inspect``: say what a checkpoint, module or composed file holds."""

from __future__ import annotations

from .files import read_file


def describe(path: str) -> tuple[str, dict]:
    """Return (readable text, metadata without the layer graph) of a cnnmod file."""
    tensors, meta = read_file(path)
    shown = {k: v for k, v in meta.items() if k != "graph"}
    if meta["format"] == "cnnmod.composed":
        shown["modules"] = [{k: v for k, v in m.items() if k != "graph"} for m in meta["modules"]]
    n_params = sum(t.numel() for t in tensors.values())
    kind = meta["format"].split(".")[-1]
    lines = [f"{path}: cnnmod {kind} (format version {meta['format_version']}), "
             f"{len(tensors)} tensors, {n_params:,} values"]
    if kind == "checkpoint":
        acc = meta.get("accuracy", {})
        lines += [f"  architecture {meta['architecture']} {meta['arch_args']}",
                  f"  classes ({len(meta['classes'])}): {', '.join(meta['classes'][:20])}",
                  f"  input {meta['input']}",
                  f"  accuracy on {acc.get('split')}: top-1 {acc.get('top1', float('nan')):.4f}"]
    elif kind == "module":
        lines += [f"  class {meta['class_name']!r} (index {meta['class_index']} of {len(meta['parent_classes'])} "
                  f"in parent {meta['parent_fingerprint']}, {meta.get('parent_architecture')})",
                  f"  strategy {meta['strategy']} {meta['options']}",
                  (f"  observed {meta['observed_images']} images; keeps {meta['share_kept']:.4f} of "
                   f"{meta['elements_total']:,} observed elements" if "elements_total" in meta else
                   f"  observed {meta['observed_images']} images; keeps {meta['channels_kept']} of "
                   f"{meta['channels_prunable']} prunable channels"),
                  f"  input {meta['input']}"]
        if "params_fraction" in meta:
            lines.append(f"  parameters {meta['params_fraction']:.3f} and multiply-accumulates "
                         f"{meta['flops_fraction']:.3f} of the parent's")
    else:
        from .compose.io import load_composed

        c = load_composed(path).cost()
        shown["cost"] = c
        lines += [f"  classes ({len(meta['modules'])}): " + ", ".join(m["class_name"] for m in meta["modules"]),
                  f"  {c['params']:,} parameters, {c['macs']:,} multiply-accumulates per image "
                  f"(shared trunk: {c['trunk_params']:,} parameters, {c['trunk_macs']:,} MACs, run once; "
                  f"the modules one by one: {c['separate_macs']:,} MACs)"]
    return "\n".join(lines), shown
