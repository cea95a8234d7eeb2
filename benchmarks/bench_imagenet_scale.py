"""Benchmark of issue #16: ImageNet-size models with 1,000 classes on one machine.

    .venv/bin/python benchmarks/bench_imagenet_scale.py              # every configuration, one process each
    .venv/bin/python benchmarks/bench_imagenet_scale.py --one NAME   # one configuration (what each process runs)

GENERATED data and random weights (cost, not accuracy): torchvision ResNet-50 and EfficientNet-B0
with 1,000 outputs, 2 random 224x224 images per class (2,000 images, uint8 in memory), ImageNet
input preparation. Each configuration runs in its own process, so that its peak resident memory
(max RSS, generated images included) is its own. In that process: ``observe`` and ``build`` (what
``decompose`` does: the statistics pass and every module) and ``save_modules`` (the folder
layout: the parent once, each module's part), timed together, then one plain inference pass over
the images the statistics pass saw (the baseline); the
bytes of all module files and of one self-contained module file, against the parent's tensors.
No calibration (``calibration=0``): with 2 images per class there are none to hold out, and
calibrating 1,000 modules is 1,000 passes. Targets (issue #16), ResNet-50 with 1,000 classes:
peak memory <= 4 GB, decomposition <= 2x one inference pass, all modules on disk <= 3x the
parent's bytes; ``--only`` 10 classes: peak memory <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import machine, write_section  # noqa: E402
from zoo import create  # noqa: E402  (torchvision models, imported as the tests do)

from cnnmod import Dataset, build, observe, save_module, save_modules  # noqa: E402
from cnnmod.data.inputspec import InputSpec  # noqa: E402
from cnnmod.modules.strategies import STRATEGIES  # noqa: E402
from cnnmod.statistics import plain_pass  # noqa: E402

K, PER_CLASS, BATCH = 1000, 2, 32
IMAGENET = InputSpec(3, (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (name, architecture, strategy, options); "only" builds the modules of 10 classes
CONFIGS = [
    ("resnet50 paper", "resnet50", "paper", {}),
    ("resnet50 paper --only 10", "resnet50", "paper", {"only": 10}),
    ("resnet50 channels --only 10", "resnet50", "channels", {"only": 10, "trunk": 1.0, "retain": 0.9,
                                                             "multiple": 8, "sample_images": 64}),
    ("efficientnet_b0 paper", "efficientnet_b0", "paper", {}),
    ("efficientnet_b0 paper --only 10", "efficientnet_b0", "paper", {"only": 10}),
]


def one(name: str) -> dict:
    _, arch, strategy, options = next(c for c in CONFIGS if c[0] == name)
    options = dict(options)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    classes = [f"c{i}" for i in range(K)]
    data = Dataset(torch.randint(0, 256, (K * PER_CLASS, 3, 224, 224), dtype=torch.uint8, generator=gen),
                   torch.arange(K * PER_CLASS) % K, classes, "generated")
    model = create("torchvision", arch, num_classes=K).eval()
    only = classes[:options.pop("only")] if "only" in options else None
    sample_images = options.pop("sample_images", 256)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()  # what decompose does (without calibration), then the folder written
        obs = observe(model, data, input_spec=IMAGENET, classes=classes, positives=PER_CLASS, batch_size=BATCH,
                      only=only, sample_images=sample_images, sums=STRATEGIES[strategy].needs_sums)
        modules = build(obs, strategy, **options)
        paths = save_modules(modules, Path(tmp) / "modules")  # the public folder API
        seconds = time.perf_counter() - start
        start = time.perf_counter()  # the baseline: one plain pass over the images the statistics pass saw
        plain_pass(model, IMAGENET, data, obs.sample, batch_size=BATCH)
        plain = time.perf_counter() - start
        folder = Path(tmp) / "modules"
        on_disk = sum(p.stat().st_size for p in folder.iterdir())
        parent_files = list(folder.glob("_parent-*.safetensors"))
        save_module(modules[0], Path(tmp) / "alone.safetensors")
        alone = (Path(tmp) / "alone.safetensors").stat().st_size
        parent_bytes = sum(t.numel() * t.element_size() for t in modules[0].parent.tensors.values())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
    return {"config": name, "arch": arch, "strategy": strategy, "modules": len(paths),
            "images": modules[0].timing["images"], "plain_seconds": plain, "decompose_seconds": seconds,
            "statistics_seconds": modules[0].timing["statistics_seconds"],
            "statistics_mb": modules[0].timing["statistics_bytes"] / 2**20, "peak_rss_gb": peak,
            "disk_bytes": on_disk, "parent_bytes": parent_bytes, "parent_file": bool(parent_files),
            "self_contained_bytes": alone, "observed_elements": modules[0].meta.get("elements_total")}


def render(rows: list[dict]) -> str:
    lines = [
        "## ImageNet scale (issue #16): 1,000 classes at 224 px on one machine",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_imagenet_scale.py` ({rows[0]['machine']}). **Generated data, "
        f"random weights** (cost, not accuracy): {PER_CLASS} random 224x224 images per class, {K} classes, "
        "torchvision architectures with 1,000 outputs, ImageNet preparation, batches of 32, no calibration. Each row "
        "is its own process: peak RSS includes the 0.3 GB of generated images. Time: `decompose` plus writing the "
        "folder, against one plain inference pass over the same sample in the same process.",
        "",
        "| configuration | modules | observed elements | statistics tables (MB) | peak RSS (GB) | "
        "decomposition / one inference pass | statistics pass / inference | all module files / parent's bytes | "
        "one self-contained module / parent | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['modules']} | {f'{n:,}' if (n := r['observed_elements']) else '-'} | {r['statistics_mb']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | {r['decompose_seconds'] / r['plain_seconds']:.2f}x | "
            f"{r['statistics_seconds'] / r['plain_seconds']:.2f}x | {r['disk_bytes'] / r['parent_bytes']:.2f}x | "
            f"{r['self_contained_bytes'] / r['parent_bytes']:.2f}x | {_targets(r)} |")
    return "\n".join(lines + ["", *NOTES])


# What the table cannot say, written after reading it (the numbers above are the run's).
NOTES = [
    "- Each row ran alone on the machine (a few seconds of unit tests aside).",
    "- `resnet50 paper` was re-run for issue #25 through the public folder API (`save_modules`, what `decompose "
    "--out` writes, byte for byte): 2.62 GB peak, 1.60x one plain pass (that pass took 270 s this time, 138 s at "
    "the earlier run: the machine was slower, the ratio about the same), 6.12x the parent on disk as before. The "
    "notes below are the earlier run's.",
    "- Memory: 2.59 GB for 1,000 ResNet-50 modules (9.76 GB before this session's fixes): each module's "
    "channeled head took the mean of the other 999 rows of the head through a 999 x 2,048 copy, and 1,000 such "
    "8 MB temporaries fragmented the heap by 6.6 MB per module (measured: 7.1 GB for 1,000 modules, 1.4 GB once "
    "the head's totals are computed once per parent); and a class's bits are now a view of the statistics table "
    "where no negative lit the layer (2 images per class: no negatives), not a 1.2 MB copy per module.",
    "- Time: 1.53x, of which the statistics pass 1.29x (bits packed with one multiply per 8 elements, each label's "
    "run OR-ed over packed rows) and building and writing the 1,000 modules 0.24x. The 4.65x of the previous "
    "measurement ran under load and before these changes.",
    "- Disk: module parts (format 5) store their masks as one zlib stream (level 1: 0.39 of the bytes; levels 6 "
    "and 9 keep 0.36 and 0.35 at 3x and 23x the time): 525 KB per module, about 470 KB of masks, 16 KB of head and "
    "the graph and metadata; the folder (the parent file included) is 6.12x the parent. The 3x target is out of reach on these masks without dropping information: their "
    "per-element entropy across the 1,000 classes, given each element's frequency, is 0.24 bit (measured on this "
    "run's tables: 285 KB per module for an ideal coder that shares every element's frequency across the "
    "folder; the folder would still be 4.3x the parent with the parent file, heads and metadata); a majority "
    "mask shared by the folder plus LZMA gave 342 KB per module (tried offline, not shipped). Each class's mask here is the union of 2 noise images' activity; on real photos the "
    "figure may differ (not measured).",
    "- `resnet50 channels --only 10` holds 2.91 GB at its peak, over the 1.5 GB the issue sets for `--only`: "
    "the channels strategy observes every image (its scores compare a class with all the others), keeps value "
    "sums and re-fits on the parent's outputs for 64 sample images at 224 px; how the 2.91 GB divide was not "
    "measured. Its 10 modules are self-contained files (0.59x the parent each).",
    "- EfficientNet-B0 (SiLU, never exactly 0: its paper modules mask nothing, each mask compresses to almost "
    "nothing): 1,000 modules in 1.70x one inference pass, 2.25 GB, 4.15x the parent on disk (67 KB per part: a head, a graph, "
    "metadata and compressed masks).",
    "- The GPU measurement (item 5) needs a lent device; none was lent to this task.",
]


def _targets(r: dict) -> str:
    if r["arch"] != "resnet50" or r["strategy"] != "paper":
        return "-"
    if r["modules"] < K:
        return "memory " + ("met" if r["peak_rss_gb"] <= 1.5 else "MISSED")
    met = [("memory", r["peak_rss_gb"] <= 4), ("time", r["decompose_seconds"] <= 2 * r["plain_seconds"]),
           ("disk", r["disk_bytes"] <= 3 * r["parent_bytes"])]
    return "; ".join(f"{what} {'met' if ok else 'MISSED'}" for what, ok in met)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", default=None, help="run one configuration and print its row as JSON")
    parser.add_argument("--only", default=None, help="comma-separated configuration names to run")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    cache = Path(__file__).resolve().parent / ".cache" / "imagenet_scale.json"
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    for name, *_ in CONFIGS:
        if args.only is None or name in args.only.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows[name] = dict(json.loads(out.stdout.strip().splitlines()[-1]), machine=machine())
            print(rows[name], flush=True)
            cache.parent.mkdir(exist_ok=True)
            cache.write_text(json.dumps(rows, indent=1))
    ordered = [rows[name] for name, *_ in CONFIGS if name in rows]
    write_section("imagenet_scale", render(ordered), {"rows": ordered})
    return 0


if __name__ == "__main__":
    sys.exit(main())
