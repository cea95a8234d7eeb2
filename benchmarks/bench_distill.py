"""Benchmark of issue #17, item 1: distilled quarter-size modules of the CIFAR-10 reference ResNet-20.

    .venv/bin/python benchmarks/bench_distill.py [--epochs 0,1,4] [--lr 0.0003] [--keep 0.22] [--trunk 0] [--flip]

One observation of the reference ResNet-20 (``benchmarks/checkpoints/cifar10_resnet20.safetensors``)
on its training split (1,000 images per class: the decomposition images), then for each budget
the channels strategy's training-free modules built again from it (inner channels, energy scores,
``keep`` chosen so that every module holds <= 25% of the parent's parameters and MACs) and
distilled for that many epochs of the decomposition images. Each row: the 10 modules composed
(vote) on the validation split, against the model's own top-1; the distillation's cost in
multiply-accumulates (the teacher's forward pass and 3x, forward and backward, the students'),
as a share of what training the parent cost (3 x its MACs x its 45,000 training images x its 48
epochs: its checkpoint's recipe). Targets (issue #17): within 1.5 points of the model, modules
<= 25% of the parameters and MACs, distillation <= 5% of the parent's training compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, machine, write_section  # noqa: E402

from cnnmod import build, compose, load_data, load_model, observe  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.modules.distill import DistillOptions, distill_, training_macs  # noqa: E402
from cnnmod.modules.observe import _adapt  # noqa: E402
from cnnmod.trace import GraphNetwork  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "distill.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="0,1,4", help="comma-separated budgets (0: the training-free modules)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--keep", type=float, default=0.22)
    parser.add_argument("--trunk", type=float, default=0.0, help="the shared trunk's share of the MACs (--trunk)")
    parser.add_argument("--flip", action="store_true", help="mirror a seeded half of each batch (--distill-flip)")
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from the cached rows")
    args = parser.parse_args(argv)
    rows = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if not args.render:
        torch.manual_seed(0)
        model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
        train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
        model_top1 = evaluate_scores(lambda x: model(model.input_spec.prepare(x)), val, val.classes)["top1"]
        obs = observe(model, train_set, sums=True)
        _, fetch = _adapt(train_set, obs.classes, model.input_spec)
        index = torch.cat([obs.sample.negatives, obs.sample.rest])
        teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
        parent_training = training_macs(model.cnnmod_meta, obs.parent.cost()["macs"])
        options = dict(keep=args.keep, streams=False, score="energy", trunk=args.trunk)
        for epochs in (float(e) for e in args.epochs.split(",")):
            modules = build(obs, "channels", **options)
            row = {"keep": args.keep, "trunk": args.trunk, "flip": args.flip, "epochs": epochs, "lr": args.lr, "model_top1": model_top1,
                   "params_fraction": max(m.meta["params_fraction"] for m in modules),
                   "macs_fraction": max(m.meta["macs_fraction"] for m in modules),
                   "decomposition_images": len(index), "parent_training_macs": parent_training}
            if epochs > 0:
                report = distill_(modules, teacher, fetch, index, DistillOptions(epochs=epochs, lr=args.lr, flip=args.flip))
                row.update({k: report[k] for k in ("steps", "images", "macs", "seconds", "loss_first", "loss_last")})
                row["share_of_parent_training"] = report["macs"] / parent_training
            start = time.perf_counter()
            row["top1"] = evaluate_scores(compose(modules, rule="vote").score_images, val, val.classes)["top1"]
            row["evaluate_seconds"] = time.perf_counter() - start
            row["machine"] = machine()
            print(row, flush=True)
            rows[f"keep {args.keep}, trunk {args.trunk}, flip {args.flip}, lr {args.lr}, epochs {epochs}"] = row
            CACHE.parent.mkdir(exist_ok=True)
            CACHE.write_text(json.dumps(rows, indent=1))
    write_section("distill", render(list(rows.values())), {"rows": list(rows.values())})
    return 0


def render(rows: list[dict]) -> str:
    lines = [
        "## Distilled modules (issue #17): quarter-size modules of the CIFAR-10 ResNet-20",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_distill.py` ({rows[0]['machine']}). Reference ResNet-20, "
        "channels strategy (inner channels, energy scores, `--keep K`, `--trunk T`: the first T of the MACs pruned alike "
        "for every class and shared), 10 modules composed (vote) on the validation "
        f"split (5,000 images); distilled on the {rows[0]['decomposition_images']:,} decomposition images (the "
        "statistics sample: no labels used, the parent's logits are the targets), Adam, "
        "warm-up then a cosine schedule, batches of 128. Cost: the distillation's multiply-accumulates (teacher forward + 3x the students) against "
        "the parent's training (3 x MACs x 45,000 images x 48 epochs, from its checkpoint).",
        "",
        "| keep | trunk | flip | lr | epochs | largest module: params / parent | MACs / parent | composed top-1 | points vs model "
        "| distillation / parent's training | distillation seconds | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["keep"], r.get("trunk", 0.0), r.get("flip", False), r["lr"], r["epochs"])):
        share = r.get("share_of_parent_training", 0.0)
        gap = 100 * (r["top1"] - r["model_top1"])
        met = (r["params_fraction"] <= 0.25 and r["macs_fraction"] <= 0.25, gap >= -1.5, share <= 0.05)
        verdict = "met" if all(met) else "MISSED (" + ", ".join(
            w for w, ok in zip(("size", "accuracy", "cost"), met) if not ok) + ")"
        lines.append(f"| {r['keep']} | {r.get('trunk', 0.0):g} | {'yes' if r.get('flip') else 'no'} | {r['lr']} | {r['epochs']:g} | {r['params_fraction']:.3f} | "
                     f"{r['macs_fraction']:.3f} | {100 * r['top1']:.2f} | {gap:+.2f} | {share:.2%} | "
                     f"{r.get('seconds', 0):.0f} | {verdict} |")
    return "\n".join(lines + ["", f"Model top-1: {100 * rows[0]['model_top1']:.2f}."])


if __name__ == "__main__":
    sys.exit(main())
