"""Benchmark of issue #17, item 3: every reported result's training cost, as a share of the parent's.

    .venv/bin/python benchmarks/bench_costs.py [--render]

Decomposes the CIFAR-10 reference ResNet-20 (``benchmarks/checkpoints/cifar10_resnet20.safetensors``)
as the benchmarks do, through ``decompose_to_directory`` (what ``cnnmod decompose`` runs): with the
paper strategy (the reuse and replace results) and with the channels strategy at keep 0.22 (the
small and distilled modules). Each reports its statistics pass and its calibration pass in
multiply-accumulates (forward passes only) and as a share of what training the parent cost (3 x
its MACs x its 45,000 training images x its 48 epochs, from its checkpoint's recipe). Then one table
gathers the share of every result reported in BENCHMARKS.md that trains or decomposes the reference
model: these decompositions, the distillations (results/distill.json) and the weak-dog repairs
(results/weak_cifar.json, against the weak model's own training). Writes the "costs" section.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, write_section  # noqa: E402

from cnnmod.modules.pipeline import decompose_to_directory  # noqa: E402

CONFIGS = {  # as the benchmarks decompose (bench_reuse.py, bench_distill.py)
    "paper strategy (reuse, replace: BENCHMARKS 'Reuse and replace')": {},
    "channels strategy, keep 0.22 (BENCHMARKS 'Small modules', 'Distilled modules')":
        {"strategy": "channels", "keep": 0.22, "streams": False, "score": "energy"},
}


def main() -> None:
    if "--render" in sys.argv[1:]:  # only write BENCHMARKS.md again, from results/costs.json
        result = json.loads((RESULTS / "costs.json").read_text())
        write_section("costs", render(result), result)
        return
    torch.set_num_threads(2)
    rows = {}
    for label, options in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            summary = decompose_to_directory(str(CHECKPOINTS / "cifar10_resnet20.safetensors"), str(CIFAR_TAR),
                                             str(Path(tmp) / "m"), split="train", progress=False, **options)
        rows[label] = {k: summary[k] for k in ("images", "statistics_macs", "statistics_share_of_parent_training",
                                               "calibration_macs", "calibration_share_of_parent_training",
                                               "seconds")}
    result = {"decompositions": rows}
    write_section("costs", render(result), result)


def render(result: dict) -> str:
    lines = ["## Training cost of every result (issue #17)", "",
             f"Command: `.venv/bin/python benchmarks/bench_costs.py` (machine: {machine()}). Every result's cost "
             "in multiply-accumulates, as a share of what training its parent cost (3 x the parent's MACs per image "
             "x its training images x its epochs, from the checkpoint's recorded recipe; a training step counts 3 "
             "forward passes, a forward-only pass 1). `cnnmod decompose` prints the same shares for the statistics "
             "and calibration passes; `replace --repair` and `--distill` print theirs.", "",
             "Decomposing the CIFAR-10 reference ResNet-20 (48 epochs on 45,000 images), measured here:", "",
             "| decomposition | images observed | statistics pass | calibration pass | decomposition / parent's "
             "training | seconds |", "|---|---|---|---|---|---|"]
    for label, r in result["decompositions"].items():
        share = r["statistics_share_of_parent_training"] + r["calibration_share_of_parent_training"]
        lines.append(f"| {label} | {r['images']:,} | {r['statistics_macs']:.3g} MACs "
                     f"({100 * r['statistics_share_of_parent_training']:.3f}%) | {r['calibration_macs']:.3g} MACs "
                     f"({100 * r['calibration_share_of_parent_training']:.3f}%) | {100 * share:.3f}% | "
                     f"{r['seconds']:.0f} |")
    paper, channels = (result["decompositions"][k] for k in CONFIGS)
    decompose_paper = paper["statistics_share_of_parent_training"] + paper["calibration_share_of_parent_training"]
    decompose_channels = (channels["statistics_share_of_parent_training"]
                          + channels["calibration_share_of_parent_training"])
    lines += ["", "Every result, its training and its share (the decomposition it starts from included):", "",
              "| result (BENCHMARKS.md section) | training | share of the parent's training |", "|---|---|---|",
              f"| reuse and replace of the reference ResNet-20's modules ('Reuse and replace') | none: decomposition "
              f"only (composing and swapping run no image) | {100 * decompose_paper:.3f}% |",
              f"| training-free small modules ('Small modules') | none | {100 * decompose_channels:.3f}% |"]
    distill = RESULTS / "distill.json"
    if distill.exists():
        distilled = json.loads(distill.read_text())
        for row in distilled["rows"]:
            if row.get("epochs") and row.get("keep") == 0.22:
                images = f", all {row['decomposition_images']:,} images" if row["decomposition_images"] > 10000 else ""
                composed = f", composed term {row['composed']:g}" if row.get("composed") else ""
                lines.append(f"| distilled modules, keep 0.22, trunk {row.get('trunk', 0):g}, {row['epochs']:g} "
                             f"epochs, lr {row['lr']:g}{', flips' if row.get('flip') else ''}{composed}{images} "
                             f"('Distilled modules') | distillation | "
                             f"{100 * (row['share_of_parent_training'] + decompose_channels):.2f}% |")
        for row in distilled["pairs"]:
            lines.append(f"| 2-class reuse {row['pair']}, decomposed for the pair and distilled {row['epochs']:g} "
                         f"epochs ('Distilled modules') | distillation | <= "
                         f"{100 * (row['share_of_parent_training'] + decompose_channels):.2f}% (its decomposition "
                         "observes at most the 10,000 images above) |")
    weak = RESULTS / "weak_cifar.json"
    if weak.exists():
        w = json.loads(weak.read_text())
        decompose_weak = w.get("decompose_macs", 0) / w["weak_training_macs"] if w.get("weak_training_macs") else None
        for label, report in w.get("repairs", {}).items():
            if decompose_weak is not None:
                lines.append(f"| weak-dog {label} ('Weak-class repair'; share of the weak model's 4-epoch training) "
                             f"| {report['method']} ({', '.join(report['kept']) or 'nothing'} kept) | "
                             f"{100 * (decompose_weak + report['macs'] / w['weak_training_macs']):.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
