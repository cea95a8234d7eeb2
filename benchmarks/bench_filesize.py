"""Benchmark of issue #14: how many bytes module and composed files take, before and after.

    .venv/bin/python benchmarks/bench_filesize.py

Decomposes the reference CIFAR-10 ResNet-20 with the channels strategy (two configurations, no
calibration: it adds a few bytes of metadata) and writes, in a temporary folder, one module file
and composed files of 2 and of 10 modules, each twice: as cnnmod writes them now (constant maps
in their exact compact form, each distinct tensor of a composed file once) and as it wrote them
before issue #14 (full maps, every module's tensors in full), built here by hand. Sizes are
fractions of the checkpoint file's bytes. Each composed file is loaded again and must score a
batch exactly as the in-memory composition does.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, machine, write_section  # noqa: E402

from cnnmod import compose, decompose, load_composed, load_data, load_model, save_composed, save_module  # noqa: E402
from cnnmod.files import write_file  # noqa: E402
from cnnmod.trace import overlay_maps, plain  # noqa: E402

CHECKPOINT = CHECKPOINTS / "cifar10_resnet20.safetensors"
# label -> channels options, as on the command line (``--trunk 1.0 --retain 0.9 --multiple 8``, ``--keep 0.5``)
CONFIGS = {"--trunk 1.0 --retain 0.9 --multiple 8": dict(trunk=1.0, retain=0.9, multiple=8),
           "--keep 0.5": dict(keep=0.5)}


def old_record(module) -> tuple[dict, dict]:
    """A module's (tensors, metadata) as cnnmod stored them before issue #14: every map in full."""
    net = module.network
    graph, weights = plain(net)
    maps = {kind: overlay_maps(net, kind) for kind in ("mask", "fill", "addmap")}
    tensors = {f"w.{k}": v for k, v in weights.items()}
    tensors.update({f"{kind}.{k}": v for kind, found in maps.items() for k, v in found.items()})
    meta = dict(module.meta, format="cnnmod.module", format_version=2 if maps["fill"] or maps["addmap"] else 1,
                class_index=module.class_index, class_name=module.class_name, input=module.input_spec.to_dict(),
                graph=graph.to_dict())
    return tensors, meta


def save_old_composed(clf, path: Path) -> None:
    """A composed file as cnnmod wrote it before issue #14 (version 1: every module's tensors in full)."""
    tensors, metas = {}, []
    for k, module in enumerate(clf.modules_):
        t, meta = old_record(module)
        tensors.update({f"{k}.{name}": v for name, v in t.items()})
        metas.append(meta)
    write_file(path, tensors, {"format": "cnnmod.composed", "format_version": 1, "modules": metas,
                               "rule": clf.rule, "unknown_below": clf.unknown_below})


def measure(label: str, modules: list, x: torch.Tensor, tmp: Path, checkpoint_bytes: int) -> dict:
    def share(path: Path) -> float:
        return path.stat().st_size / checkpoint_bytes

    row = {"config": label, "params_fraction": [m.meta["params_fraction"] for m in modules],
           "macs_fraction": modules[0].meta["macs_fraction"], "module_after": [], "module_before": [],
           "module_files_unchanged": 0}
    for m in modules:
        save_module(m, tmp / "m.safetensors")
        write_file(tmp / "m_old.safetensors", *old_record(m))
        row["module_after"].append(share(tmp / "m.safetensors"))
        row["module_before"].append(share(tmp / "m_old.safetensors"))
        same = (tmp / "m.safetensors").read_bytes() == (tmp / "m_old.safetensors").read_bytes()
        row["module_files_unchanged"] += same
    net = modules[0].network
    row["addmap_bytes"] = sum(4 * a.numel() for a in overlay_maps(net, "addmap").values()) / checkpoint_bytes
    row["weight_bytes"] = sum(w.numel() * w.element_size() for w in net.weights().values()) / checkpoint_bytes
    row["identical_scores"] = True
    for n in (2, 10):
        clf = compose(modules[:n], rule="vote")
        save_composed(clf, tmp / "c.safetensors")
        save_old_composed(clf, tmp / "c_old.safetensors")
        row[f"composed{n}_after"] = share(tmp / "c.safetensors")
        row[f"composed{n}_before"] = share(tmp / "c_old.safetensors")
        row["identical_scores"] &= bool(torch.equal(load_composed(tmp / "c.safetensors")(x), clf(x)))
        row["identical_scores"] &= bool(torch.equal(load_composed(tmp / "c_old.safetensors")(x), clf(x)))
        row[f"composed{n}_trunk_layers"] = len(clf.trunk_layers()[0])
        row[f"composed{n}_header"] = (8 + int.from_bytes((tmp / "c.safetensors").read_bytes()[:8], "little")) \
            / checkpoint_bytes  # JSON: tensor table and metadata (graphs, aliases)
    return row


def render(rows: list[dict], checkpoint_bytes: int, seconds: float) -> str:
    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    lines = [
        "## File sizes (issue #14)",
        "",
        "Command: `.venv/bin/python benchmarks/bench_filesize.py` "
        f"({machine()}; {seconds:.0f} s). The reference CIFAR-10 ResNet-20 "
        f"(`cifar10_resnet20.safetensors`, {checkpoint_bytes:,} bytes) decomposed with the channels strategy; "
        "every size is a fraction of the checkpoint's bytes. *Before*: as cnnmod wrote files until issue #14 "
        "(every added-constant map in full, every module's tensors in full in a composed file); *after*: "
        "constant maps in their exact compact form where that is smaller (module format 3), each distinct "
        "tensor of a composed file once (composed format 2). Module columns: the mean over the 10 modules.",
        "",
        "| options | module parameters | module file, before | after | maps in it (before and after) "
        "| 2 modules composed, before | after | 10 modules composed, before | after | loaded = in memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['config']}` | {mean(r['params_fraction']):.3f} | {mean(r['module_before']):.3f} "
                     f"| {mean(r['module_after']):.3f} | {r['addmap_bytes']:.3f} "
                     f"| {r['composed2_before']:.2f} | {r['composed2_after']:.2f} "
                     f"| {r['composed10_before']:.2f} | {r['composed10_after']:.2f} "
                     f"| {'yes' if r['identical_scores'] else 'NO'} |")
    lines.append("")
    for r in rows:
        before, after = mean(r["module_before"]), mean(r["module_after"])
        maps = (f"the maps' exact compact form found no repeated rows or columns ({r['module_files_unchanged']} "
                "of 10 files byte for byte the version-2 files of before)" if r["module_files_unchanged"] == 10 else
                f"compact maps make them {after / before:.2f}x as large as before")
        lines.append(f"- `{r['config']}`: a module holds {mean(r['params_fraction']):.3f} of the parameters; its "
                     f"file is {before:.3f} of the checkpoint, {r['addmap_bytes']:.3f} of it added-constant maps; "
                     f"{maps}. 10 modules composed: {r['composed10_after'] / r['composed10_before']:.2f}x the bytes "
                     f"of before ({r['composed10_trunk_layers']} layers shared as a trunk; metadata and tensor table "
                     f"{r['composed10_header']:.3f} of the checkpoint).")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = load_model(CHECKPOINT)
    train_set = load_data(str(CIFAR_TAR), "train")
    x = model.input_spec.prepare(load_data(str(CIFAR_TAR), "val").images[:64])
    checkpoint_bytes = CHECKPOINT.stat().st_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in CONFIGS.items():
            modules = decompose(model, train_set, strategy="channels", calibration=0, **options)
            rows.append(measure(label, modules, x, Path(tmp), checkpoint_bytes))
            print(rows[-1]["config"], {k: v for k, v in rows[-1].items() if not isinstance(v, list)}, flush=True)
    seconds = time.perf_counter() - start
    write_section("filesize", render(rows, checkpoint_bytes, seconds),
                  {"checkpoint_bytes": checkpoint_bytes, "rows": rows, "seconds": seconds, "machine": machine()})


if __name__ == "__main__":
    main()
