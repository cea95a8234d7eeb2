"""Benchmark of issue #24, item 4: the modularity metrics of the field on the reference ResNet-20's modules.

    .venv/bin/python benchmarks/bench_metrics.py [--per-class 50]

One observation of the reference CIFAR-10 ResNet-20 (its training split, the default sample), the
modules of three configurations built from it, and for each what ``cnnmod inspect DIR --metrics``
reports (``modules/metrics.py``): mean kernel retention, the mean overlap of two modules (Jaccard
index of their kept kernels), and cohesion and coupling on the first N validation images of each
class, each image through its class's module. MwT (Qi et al. 2023) and MODA report the same
quantities for modules trained modular from the start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, write_section  # noqa: E402

from cnnmod import build, load_data, load_model, observe  # noqa: E402
from cnnmod.modules.metrics import cohesion_coupling, overlap, retention  # noqa: E402

CONFIGS = {
    "paper": ("paper", {}),
    "channels, keep 0.5": ("channels", {"keep": 0.5}),
    "channels, quarter-size (--keep-streams --score energy --keep 0.22)":
        ("channels", {"keep": 0.22, "streams": False, "score": "energy"}),
    "channels, quarter-size, shared trunk (--trunk 1.0)":
        ("channels", {"keep": 0.22, "streams": False, "score": "energy", "trunk": 1.0}),
}


# What the rows say, written after they were measured.
NOTES = """\
- Paper modules keep every kernel, to four decimals (their masks remove feature elements, not whole
  kernels): retention and overlap 1.0, and every image lights almost every kernel, so cohesion and
  coupling are both 0.99. By the kernel measures of modular training they are not modular at all; their
  modularity is in the masks, which these measures do not see.
- Channels modules at keep 0.5 are the modular ones: each keeps half the kernels, two modules share 41%
  of theirs, and two images of different classes share 40% of their active kernels against 97% for two
  images of one class.
- Quarter-size modules with `--keep-streams` keep 67% of the kernels (the residual streams' kernels all,
  22% of those inside the blocks: 24% of the MACs) and share 92% of them: what keeps them small is the
  blocks, and the streams are common to every class. A shared trunk makes them one network (overlap 1.0)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from the last results")
    args = parser.parse_args(argv)
    if args.render:
        rows = json.loads((RESULTS / "metrics.json").read_text())["rows"]
        write_section("metrics", render(rows, args.per_class), {"rows": rows})
        return 0
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    obs = observe(model, train_set, sums=True)
    chosen = [torch.nonzero(val.labels == c).flatten()[:args.per_class] for c in range(len(val.classes))]
    index = torch.cat(chosen)
    x, labels = model.input_spec.prepare(val.images[index]), val.labels[index]
    rows = []
    for name, (strategy, options) in CONFIGS.items():
        modules = build(obs, strategy, **options)
        o = overlap(modules)
        k = len(modules)
        row = {"configuration": name, "retention": sum(retention(m) for m in modules) / k,
               "module_overlap": float((o.sum() - o.diagonal().sum()) / (k * (k - 1))),
               **cohesion_coupling(modules, x, labels), "machine": machine()}
        print(row, flush=True)
        rows.append(row)
    write_section("metrics", render(rows, args.per_class), {"rows": rows})
    return 0


def render(rows: list[dict], per_class: int) -> str:
    lines = ["## Modularity metrics (issue #24): the reference ResNet-20's modules", "",
             f"Command: `.venv/bin/python benchmarks/bench_metrics.py --per-class {per_class}` (x86_64, 2 CPU "
             "cores, torch 2.13.0+cpu). The modules of one observation (training split, default sample); cohesion and "
             f"coupling on the first {per_class} validation images of each class ({rows[0]['images']:,} images), each "
             "through its class's module; a kernel is active on an image where its output is positive somewhere. "
             "`cnnmod inspect DIR --metrics --data ...` prints the same for a folder.", "",
             "| modules | mean kernel retention | mean overlap of two modules (Jaccard) | cohesion | coupling |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['retention']:.4f} | {r['module_overlap']:.4f} | {r['cohesion']:.4f} | "
              f"{r['coupling']:.4f} |" for r in rows]
    return "\n".join(lines + ["", NOTES]) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
