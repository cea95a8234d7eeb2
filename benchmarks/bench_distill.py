"""Benchmark of issue #17, item 1: distilled quarter-size modules of the CIFAR-10 reference ResNet-20.

    .venv/bin/python benchmarks/bench_distill.py [--epochs 0,1,4] [--lr 0.001] [--keep 0.22] [--trunk 0] [--flip]

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
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, machine, write_section  # noqa: E402
from bench_reuse import CIFAR_FOUR, Energy, _train_batches, restricted  # noqa: E402  (the pairs of issue #4)

from cnnmod import build, compose, load_data, load_model, observe  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.modules.decompose import distill_index  # noqa: E402
from cnnmod.modules.distill import DistillOptions, distill_, training_macs  # noqa: E402
from cnnmod.modules.observe import _adapt  # noqa: E402
from cnnmod.trace import GraphNetwork  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "distill.json"
PAIRS_CACHE = CACHE.with_name("distill_pairs.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="0,1,4", help="comma-separated budgets (0: the training-free modules)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--keep", type=float, default=0.22)
    parser.add_argument("--trunk", type=float, default=0.0, help="the shared trunk's share of the MACs (--trunk)")
    parser.add_argument("--flip", action="store_true", help="mirror a seeded half of each batch (--distill-flip)")
    parser.add_argument("--composed", type=float, default=0.0,
                        help="weight of the composed-answer term (KL of the margins' softmax; --distill-composed)")
    parser.add_argument("--features", type=float, default=0.0,
                        help="weight of the feature term (the parent's block outputs; --distill-features)")
    parser.add_argument("--crop", action="store_true", help="shift each image by up to 4 pixels (--distill-crop)")
    parser.add_argument("--temperature", type=float, default=1.0, help="the composed-answer term's temperature")
    parser.add_argument("--all-images", action="store_true",
                        help="distil on every training image (45,000, labels unused), not only the statistics sample")
    parser.add_argument("--pairs", type=float, default=None, metavar="EPOCHS",
                        help="instead: the 6 pairs of 4 classes, each decomposed for its pair (--only a,b, trunk 1.0) "
                             "and distilled for EPOCHS")
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from the cached rows")
    args = parser.parse_args(argv)
    rows = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    pair_rows = json.loads(PAIRS_CACHE.read_text()) if PAIRS_CACHE.exists() else {}
    if args.pairs is not None and not args.render:
        pair_rows.update(pairs(args))
        PAIRS_CACHE.write_text(json.dumps(pair_rows, indent=1))
    elif not args.render:
        torch.manual_seed(0)
        model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
        train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
        model_top1 = evaluate_scores(lambda x: model(model.input_spec.prepare(x)), val, val.classes)["top1"]
        obs = observe(model, train_set, sums=True)
        _, fetch = _adapt(train_set, obs.classes, model.input_spec)
        index = torch.arange(len(train_set.labels)) if args.all_images else \
            torch.cat([obs.sample.negatives, obs.sample.rest])
        teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
        parent_training = training_macs(model.cnnmod_meta, obs.parent.cost()["macs"])
        options = dict(keep=args.keep, streams=False, score="energy", trunk=args.trunk)
        for epochs in (float(e) for e in args.epochs.split(",")):
            modules = build(obs, "channels", **options)
            row = {"keep": args.keep, "trunk": args.trunk, "flip": args.flip, "all_images": args.all_images,
                   "epochs": epochs, "lr": args.lr, "composed": args.composed, "features": args.features,
                   "crop": args.crop, "temperature": args.temperature,
                   "model_top1": model_top1,
                   "params_fraction": max(m.meta["params_fraction"] for m in modules),
                   "macs_fraction": max(m.meta["macs_fraction"] for m in modules),
                   "decomposition_images": len(index), "parent_training_macs": parent_training}
            if epochs > 0:
                chosen = DistillOptions(epochs=epochs, lr=args.lr, flip=args.flip, composed=args.composed,
                                        features=args.features, crop=args.crop, temperature=args.temperature)
                report = distill_(modules, teacher, fetch, index, chosen)
                row.update({k: report[k] for k in ("steps", "images", "macs", "seconds", "loss_first", "loss_last")})
                row["share_of_parent_training"] = report["macs"] / parent_training
            row["composed_macs_fraction"] = compose(modules).cost()["macs"] / obs.parent.cost()["macs"]
            start = time.perf_counter()
            row["top1"] = evaluate_scores(compose(modules, rule="vote").score_images, val, val.classes)["top1"]
            row["evaluate_seconds"] = time.perf_counter() - start
            row["machine"] = machine()
            print(row, flush=True)
            images = ", all images" if args.all_images else ""
            composed = (f", composed {args.composed}" if args.composed else "") + \
                (f", features {args.features}" if args.features else "") + (", crop" if args.crop else "") + \
                (f", T {args.temperature}" if args.temperature != 1.0 else "")
            rows[f"keep {args.keep}, trunk {args.trunk}, flip {args.flip}{images}, lr {args.lr}, epochs {epochs}"
                 f"{composed}"] = row
            CACHE.parent.mkdir(exist_ok=True)
            CACHE.write_text(json.dumps(rows, indent=1))
    write_section("distill", render(list(rows.values())) + render_pairs(list(pair_rows.values())),
                  {"rows": list(rows.values()), "pairs": list(pair_rows.values())})
    return 0


def pairs(args) -> dict:
    """Each pair of ``CIFAR_FOUR`` decomposed for itself and distilled: vote before and after, against
    the parent restricted to the pair, on the pair's validation images."""
    torch.manual_seed(0)
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    labels, fetch = _adapt(train_set, model.cnnmod_meta["classes"], model.input_spec)
    done = {}
    energy = Energy()  # CodeCarbon in the same run: each pair's decomposition and distillation, and retraining
    # Retraining a 2-class ResNet-20 with the parent's recipe (48 epochs of the pair's 9,000 images), from 20
    # measured batches of it (the same for every pair: the same network, batch and recipe).
    energy.measure("retrain", lambda: _train_batches(train_set.only(list(CIFAR_FOUR[:2])), 20))
    recipe = model.cnnmod_meta["train_config"]["epochs"]
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        obs, untrained, modules, report = energy.measure(
            f"{a}/{b}", lambda: _pair(model, train_set, labels, fetch, a, b, args))
        parent_macs = obs.parent.cost()["macs"]
        pair = val.only([a, b])
        row = {"pair": f"{a}/{b}", "keep": args.keep, "epochs": args.pairs, "lr": args.lr, "flip": args.flip,
               "parent": evaluate_scores(restricted(model, [a, b]), pair, [a, b])["top1"],
               "before": evaluate_scores(compose(untrained).score_images, pair, [a, b])["top1"],
               "macs_fraction": compose(modules).cost()["macs"] / parent_macs, "machine": machine()}
        batches = recipe * -(-len(train_set.only([a, b]).labels) // 128)
        row.update(energy_wh=1000 * energy.rows[f"{a}/{b}"]["kwh"],
                   retrain_wh=1000 * energy.rows["retrain"]["kwh"] / 20 * batches, retrain_batches=batches)
        row.update({k: report[k] for k in ("steps", "images", "macs", "seconds")},
                   distillation_images=report["distillation_images"],
                   share_of_parent_training=report["macs"] / training_macs(model.cnnmod_meta, parent_macs),
                   after=evaluate_scores(compose(modules).score_images, pair, [a, b])["top1"])
        print(row, flush=True)
        done[f"{a}/{b}, keep {args.keep}, epochs {args.pairs}, lr {args.lr}, flip {args.flip}"] = row
    return done


def _pair(model, train_set, labels, fetch, a: str, b: str, args):
    """Decompose the pair (``--only a,b``) and distil its modules: what a user runs, measured as one."""
    obs = observe(model, train_set, only=[a, b], sums=True)
    modules = build(obs, "channels", keep=args.keep, score="energy", trunk=1.0)  # streams pruned too
    untrained = copy.deepcopy(modules)  # scored afterwards, outside the measured run
    index = distill_index(obs, labels)  # the pair's images and the negatives, as decompose(only=...) takes
    teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
    chosen = DistillOptions(epochs=args.pairs, lr=args.lr, flip=args.flip)
    report = distill_(modules, teacher, fetch, index, chosen)
    return obs, untrained, modules, dict(report, distillation_images=len(index))


def render_pairs(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [
        "", "", "2-class reuse, each pair decomposed for itself (`--only a,b`, every channel space pruned, energy "
        "scores, `--trunk 1.0`, `--keep K`) and distilled on its decomposition images (the pair's and 111 of each "
        "other class: `--pairs EPOCHS`), vote against the parent restricted to the pair, on the pair's validation "
        "images. Targets (issue #17): <= 25% of the parent's MACs, within 0.5 points of the parent, <= 1% of its "
        "training, >= 20x less energy than retraining. Energy (CodeCarbon, offline, process mode, the same run): the "
        "pair's decomposition and distillation as one run, against retraining a 2-class ResNet-20 with the parent's "
        "recipe (48 epochs of the pair's 9,000 training images), extrapolated from 20 measured batches of it.",
        "",
        "| pair | keep | epochs | flip | pair's MACs / parent | parent restricted | training-free | distilled | below "
        "the parent | distillation / parent's training | seconds | decomposition + distillation (Wh) | retraining "
        "/ that (energy) | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = 100 * (r["parent"] - r["after"])
        ratio = r["retrain_wh"] / r["energy_wh"] if r.get("energy_wh") else None
        met = (r["macs_fraction"] <= 0.25, round(gap, 2) <= 0.5, r["share_of_parent_training"] <= 0.01,
               ratio is None or ratio >= 20)
        verdict = "met" if all(met) else "MISSED (" + ", ".join(
            w for w, ok in zip(("size", "accuracy", "cost", "energy"), met) if not ok) + ")"
        energy = f"{r['energy_wh']:.3f} | {ratio:.0f}x" if ratio else "- | -"
        lines.append(f"| {r['pair']} | {r['keep']} | {r['epochs']:g} | {'yes' if r['flip'] else 'no'} | "
                     f"{r['macs_fraction']:.3f} | {100 * r['parent']:.2f} | {100 * r['before']:.2f} | "
                     f"{100 * r['after']:.2f} | {gap:.2f} | {r['share_of_parent_training']:.2%} | "
                     f"{r['seconds']:.0f} | {energy} | {verdict} |")
    gaps = [100 * (r["parent"] - r[k]) for k in ("before", "after") for r in rows]
    half = len(rows)
    lines += ["", f"Below the parent, mean over the pairs: {sum(gaps[:half]) / half:.2f} points training-free, "
              f"{sum(gaps[half:]) / half:.2f} distilled.", "", *PAIR_NOTES]
    return "\n".join(lines)


PAIR_NOTES = [
    "- One pair (cat/truck) is within the 0.5 points; the mean is 2.2 points below the parent, against 4.1 "
    "training-free at the same 0.238 of the MACs (and 1.88 for the training-free pair networks at 0.395 of the "
    "MACs in the channels benchmark). cat/dog, the hard pair, stays 5.8 below. 8 epochs cost 0.66% of the "
    "parent's training per pair (0.61% before the distillation checked its loss on 2,048 images); the 1% budget "
    "would allow about 12 (not run).",
    "- Energy: a pair's decomposition and distillation take 0.24-0.31 Wh against 5.1 Wh to retrain a 2-class "
    "ResNet-20 with the parent's recipe: 16x to 22x less (19.5x on average; the first two pairs, the most costly, "
    "ran first). The 20x target is missed by two pairs. The training-free reuse of the reference model's modules "
    "(decomposition only) measured 380x (BENCHMARKS 'Reuse and replace', energy).",
    "- The pairs ran after the other rows, alone on the machine; re-run with the final code and CodeCarbon: the same "
    "accuracies.",
]


def render(rows: list[dict]) -> str:
    lines = [
        "## Distilled modules (issue #17): quarter-size modules of the CIFAR-10 ResNet-20",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_distill.py` ({rows[0]['machine']}). Reference ResNet-20, "
        "channels strategy (inner channels, energy scores, `--keep K`, `--trunk T`: the first T of the MACs pruned "
        "alike for every class and shared), 10 modules composed (vote) on the validation "
        "split (5,000 images); distilled on the 10,000 decomposition images (the statistics sample) or on all "
        "45,000 training images (`--all-images`), no labels used: the parent's logits are the targets; Adam, "
        "warm-up then a cosine schedule, batches of 128. Cost: the distillation's multiply-accumulates (teacher "
        "forward + 3x the students) against the parent's training (3 x MACs x 45,000 images x 48 epochs, from its "
        "checkpoint).",
        "",
        "| keep | trunk | flip | composed | images | lr | epochs | largest module: params / parent | MACs / parent | "
        "10 composed: MACs / parent | composed top-1 | points vs model "
        "| distillation / parent's training | distillation seconds | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["keep"], r.get("trunk", 0.0), bool(r.get("flip")), r.get("composed", 0.0),
                                         r["decomposition_images"], r["lr"], r["epochs"])):
        share = r.get("share_of_parent_training", 0.0)
        gap = 100 * (r["top1"] - r["model_top1"])
        met = (r["params_fraction"] <= 0.25 and r["macs_fraction"] <= 0.25, round(gap, 2) >= -1.5, share <= 0.05)
        verdict = "met" if all(met) else "MISSED (" + ", ".join(
            w for w, ok in zip(("size", "accuracy", "cost"), met) if not ok) + ")"
        flip = "yes" if r.get("flip") else "no"
        lines.append(f"| {r['keep']} | {r.get('trunk', 0.0):g} | {flip} | {r.get('composed', 0.0):g} | "
                     f"{r['decomposition_images']:,} | {r['lr']} | "
                     f"{r['epochs']:g} | "
                     f"{r['params_fraction']:.3f} | {r['macs_fraction']:.3f} | {_composed(r, rows)} | "
                     f"{100 * r['top1']:.2f} | {gap:+.2f} | {share:.2%} | {r.get('seconds', 0):.0f} | {verdict} |")
    return "\n".join(lines + ["", f"Model top-1: {100 * rows[0]['model_top1']:.2f}.", "", *NOTES])


def _composed(r: dict, rows: list[dict]) -> str:
    """The composition's MACs: measured on the row, or on its training-free row (distillation changes no
    layer's shape, and a shared trunk stays shared)."""
    def config(row):  # rows made before a column existed ran without it
        return row["keep"], row.get("trunk", 0.0), bool(row.get("flip"))
    same = [o for o in rows if o.get("composed_macs_fraction") is not None and config(o) == config(r)
            and o["epochs"] == 0]
    found = r.get("composed_macs_fraction") or (same[0]["composed_macs_fraction"] if same else None)
    return "-" if found is None else f"{found:.2f}x"


# What the table cannot say, written after reading it (the numbers above are the run's).
NOTES = [
    "- Size and cost are within the targets (the largest module holds 0.230 of the parameters and 0.243 of the "
    "MACs at keep 0.22; every distillation here costs at most 4.3% of the parent's training); accuracy is not: "
    "the best composition is 8.2 points below the model (79.9% against 88.1%: mirrored images and the composed-"
    "answer term at W = 10, on the statistics sample as `decompose --distill` trains; 79.7% with the trunk and all "
    "45,000 training images), up from 57.2% training-free (43.7% with the trunk). Issue #17's 1.5 points are "
    "missed by 6.7.",
    "- A shared trunk (`--trunk 1.0`: every prunable space chosen alike for all classes) makes the 10 composed "
    "modules cost 0.24x the model's MACs (without it 1.81x: only the layers the modules hold identically run once) "
    "and a distillation step a quarter as much: "
    "16 epochs with the trunk cost what 4 cost without, for 78.9% (79.3% without the trunk).",
    "- Mirrored images (`--flip`) add 0.4 points at 4 epochs (79.3% against 78.9%). The 4-epoch row with flips "
    "was run again with the final code (its loss check included): the same 79.32% top-1.",
    "- Learning rate: before the warm-up was added, lr 1e-3 first undid the closed-form fit (0.3 epochs: "
    "39.0% composed; lr 3e-4: 66.2%; `--epochs 0.3` runs, not kept in the table); with the warm-up, lr 1e-3 "
    "beats 3e-4 at 4 epochs (78.9% against 76.7%) and is the default.",
    "- The other rows ran before distillation checked its loss on 2,048 images before and after (weights that do "
    "not lower it are not kept); the check adds at most 0.15% of the parent's training to a row's cost.",
    "- Tried: 1 to 16 epochs, lr 3e-4 and 1e-3, a shared trunk, mirrored images, more images. Between 4 and 16 "
    "epochs the composed top-1 stays near 79% while the distillation loss keeps falling; all 45,000 training "
    "images (labels unused) for the same compute as 16 epochs of the 10,000 gain 0.8 points (79.7% against "
    "78.9%). Not tried yet: distilling on the parent's features as well as its logits, a longer budget.",
    "- The composed-answer term (`--composed W`, `decompose --distill-composed W`: W x KL between the softmax of "
    "the parent's channeled margins and the modules' margins, added to the squared error) at 4 epochs with flips: "
    "W = 1: 79.28% (no gain), W = 10: 79.86% (+0.54 points over 79.32%), for the same cost. Still 8.2 points "
    "below the model.",
]


if __name__ == "__main__":
    sys.exit(main())
