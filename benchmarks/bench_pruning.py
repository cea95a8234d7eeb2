"""Benchmark of issue #24, item 3: cnnmod's small modules side by side with Torch-Pruning + distillation.

    .venv/bin/pip install -c constraints.txt -e ".[bench]"     (torch-pruning, a bench-only dependency)
    .venv/bin/python benchmarks/bench_pruning.py --part a [--epochs 16] [--features 1] ...
    .venv/bin/python benchmarks/bench_pruning.py --part b [--epochs 8]
    .venv/bin/python benchmarks/bench_pruning.py --render

The same parent (the reference CIFAR-10 ResNet-20), the same images (the decomposition images of
the statistics sample; no labels), the same training compute (the teacher's forward pass and 3x the
student's, per image, in multiply-accumulates, as a share of what training the parent cost), the
same optimizer and schedule (Adam, warm-up + cosine: cnnmod's one training loop), the same
augmentation (mirror + shift by up to 4 pixels) on both sides:

- (a) 10 classes: cnnmod's channels modules with a shared trunk (``--keep-streams --score energy
  --keep K --trunk 1.0``), distilled, composed; against one network pruned by Torch-Pruning (group
  magnitude importance, one ratio for every layer, the head kept) to the composition's MACs (or just
  below), then distilled from the parent's 10 logits (KL at temperature 4, Hinton et al.) for the
  same compute. Also without a trunk: quarter-size modules (each <= 25% of the MACs) composed.
- (b) 2-class reuse, each pair of 4 classes: ``--only a,b --trunk 1.0`` modules distilled, against
  Torch-Pruning at the pair composition's MACs distilled from the parent's pair of logits, on the
  pair's decomposition images, scored on the pair's validation images.

Both sides' MACs are counted by cnnmod's ``cost`` on a traced graph (the same rules for both).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, machine, write_section  # noqa: E402
from bench_reuse import CIFAR_FOUR, restricted  # noqa: E402

from cnnmod import build, compose, load_data, load_model, observe  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.loop import run_steps, warmup_cosine  # noqa: E402
from cnnmod.modules.decompose import distill_index  # noqa: E402
from cnnmod.modules.distill import DistillOptions, distill_, training_macs  # noqa: E402
from cnnmod.modules.extract import cost  # noqa: E402
from cnnmod.modules.observe import _adapt  # noqa: E402
from cnnmod.trace import GraphNetwork, trace_graph  # noqa: E402
from cnnmod.trace.network import weights_of  # noqa: E402
from cnnmod.training import augment_batch  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "pruning.json"
SHAPE = (3, 32, 32)


def macs_of(model: torch.nn.Module) -> int:
    return cost(GraphNetwork(trace_graph(model, SHAPE), weights_of(model)), SHAPE)["macs"]


def tp_prune(model: torch.nn.Module, target: float, head: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` pruned by Torch-Pruning (group magnitude, one ratio for every layer, ``head``
    kept) to the share of its MACs nearest ``target`` (MACs move in steps of whole channels): the ratio
    found by bisection. Returns it and its share."""
    import torch_pruning as tp

    full, low, high, tried = macs_of(model), 0.0, 0.95, []
    name = next(n for n, m in model.named_modules() if m is head)
    for _ in range(14):
        ratio = (low + high) / 2
        pruned = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(pruned, torch.zeros(1, *SHAPE), importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=ratio, ignored_layers=[dict(pruned.named_modules())[name]])
        pruner.step()
        share = macs_of(pruned) / full
        tried.append((abs(share - target), share, pruned))
        low, high = (low, ratio) if share <= target else (ratio, high)
    _, share, pruned = min(tried, key=lambda t: t[0])
    return pruned, share


def kd_train(student, teacher, fetch, index: torch.Tensor, *, budget: float, parent_macs: int, columns=None,
             temperature: float = 4.0, lr: float = 1e-3, batch: int = 128, seed: int = 0) -> dict:
    """Distil ``student`` from ``teacher``'s logits (``columns`` of them) on ``fetch(index)``, mirrored and
    shifted, for ``budget`` multiply-accumulates (teacher forward + 3x student forward per image)."""
    per_image = parent_macs + 3 * macs_of(student)
    steps = max(1, int(budget / per_image / batch))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    seen = [0]

    def loss_of(rows):
        x = fetch(rows)
        mirror = torch.rand(len(x), generator=gen) < 0.5
        x = augment_batch(torch.where(mirror[:, None, None, None], x.flip(-1), x), gen, "crop", pad=4)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        if columns is not None:
            t = t[:, columns]
        seen[0] += len(x)
        return F.kl_div((s / temperature).log_softmax(1), (t / temperature).log_softmax(1), reduction="batchmean",
                        log_target=True) * temperature ** 2

    student.train()
    start, losses = time.perf_counter(), []
    run_steps(optimizer, loss_of, index=index, batch_size=batch, steps=steps, gen=gen,
              rate=warmup_cosine(lr, steps, max(1, steps // 20)), desc="tp distillation", progress=True,
              after=lambda order, rows, loss: losses.append(float(loss)))
    student.eval()
    curve = [round(float(p.mean()), 4) for p in torch.tensor(losses).tensor_split(min(10, len(losses)))]
    return {"steps": steps, "images": seen[0], "macs": seen[0] * per_image, "seconds": time.perf_counter() - start,
            "loss_curve": curve}


def part_a(args, rows: dict) -> None:
    torch.manual_seed(0)
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    model_top1 = evaluate_scores(lambda x: model(model.input_spec.prepare(x)), val, val.classes)["top1"]
    obs = observe(model, train_set, sums=True)
    _, fetch = _adapt(train_set, obs.classes, model.input_spec)
    index = torch.cat([obs.sample.negatives, obs.sample.rest])
    teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
    parent_macs = obs.parent.cost()["macs"]
    parent_training = training_macs(model.cnnmod_meta, parent_macs)
    options = DistillOptions(epochs=args.epochs, flip=True, crop=args.crop, features=args.features,
                             composed=args.composed, temperature=args.temperature)
    modules = build(obs, "channels", keep=args.keep, streams=False, score="energy", trunk=args.trunk)
    report = distill_(modules, teacher, fetch, index, options)
    composed = compose(modules, rule="vote")
    share = composed.cost()["macs"] / parent_macs
    ours = {"method": "cnnmod", "keep": args.keep, "trunk": args.trunk, "options": {**vars(options)},
            "macs_fraction": share, "largest_module_macs": max(m.meta["macs_fraction"] for m in modules),
            "top1": evaluate_scores(composed.score_images, val, val.classes)["top1"], "model_top1": model_top1,
            "share_of_parent_training": report["macs"] / parent_training, "seconds": report["seconds"],
            "images": len(index), "loss_curve": report.get("loss_curve"), "loss_before": report["loss_before"],
            "loss_after": report["loss_after"], "machine": machine()}
    print(ours, flush=True)
    key = f"a: cnnmod keep {args.keep} trunk {args.trunk} {json.dumps(ours['options'], sort_keys=True)}"
    rows[key] = ours
    _save(rows)
    if args.trunk == 0:  # quarter-size modules, composed at 1.81x: TP at one module's size (see the README)
        share = ours["largest_module_macs"]
    pruned, got = tp_prune(model, share, model.fc)
    before = evaluate_scores(lambda x: pruned(model.input_spec.prepare(x)), val, val.classes)["top1"]
    spent = kd_train(pruned, teacher, fetch, index, budget=report["macs"], parent_macs=parent_macs)
    theirs = {"method": "torch-pruning + KD", "target_macs": share, "macs_fraction": got, "top1_untrained": before,
              "top1": evaluate_scores(lambda x: pruned(model.input_spec.prepare(x)), val, val.classes)["top1"],
              "model_top1": model_top1, "share_of_parent_training": spent["macs"] / parent_training,
              "seconds": spent["seconds"], "images": len(index), "against": key, "loss_curve": spent["loss_curve"],
              "machine": machine()}
    print(theirs, flush=True)
    rows[f"a: torch-pruning against {key}"] = theirs
    _save(rows)


def part_b(args, rows: dict) -> None:
    torch.manual_seed(0)
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors").eval()
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    labels, fetch = _adapt(train_set, model.cnnmod_meta["classes"], model.input_spec)
    classes = model.cnnmod_meta["classes"]
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        obs = observe(model, train_set, only=[a, b], sums=True)
        modules = build(obs, "channels", keep=args.keep, score="energy", trunk=1.0)
        index = distill_index(obs, labels)
        teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
        parent_macs = obs.parent.cost()["macs"]
        parent_training = training_macs(model.cnnmod_meta, parent_macs)
        options = DistillOptions(epochs=args.epochs, flip=True, crop=args.crop, features=args.features,
                                 composed=args.composed, temperature=args.temperature)
        report = distill_(modules, teacher, fetch, index, options)
        pair = val.only([a, b])
        share = compose(modules).cost()["macs"] / parent_macs
        row = {"pair": f"{a}/{b}", "keep": args.keep, "options": {**vars(options)}, "macs_fraction": share,
               "parent": evaluate_scores(restricted(model, [a, b]), pair, [a, b])["top1"],
               "cnnmod": evaluate_scores(compose(modules).score_images, pair, [a, b])["top1"],
               "cnnmod_share": report["macs"] / parent_training, "images": len(index)}
        pruned, got = tp_prune(model, share, model.fc)
        with torch.no_grad():  # the head keeps the pair's two rows
            rows_ab = [classes.index(a), classes.index(b)]
            head = torch.nn.Linear(pruned.fc.in_features, 2)
            head.weight.copy_(pruned.fc.weight[rows_ab])
            head.bias.copy_(pruned.fc.bias[rows_ab])
            pruned.fc = head
        spent = kd_train(pruned, teacher, fetch, index, budget=report["macs"], parent_macs=parent_macs,
                         columns=rows_ab)
        row.update(tp_macs_fraction=got, tp=evaluate_scores(lambda x: pruned(model.input_spec.prepare(x)), pair,
                                                            [a, b])["top1"],
                   tp_share=spent["macs"] / parent_training, machine=machine())
        print(row, flush=True)
        rows[f"b: {a}/{b} keep {args.keep} {json.dumps(row['options'], sort_keys=True)}"] = row
        _save(rows)


def _save(rows: dict) -> None:
    CACHE.parent.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(rows, indent=1))


def render(rows: dict) -> str:
    a = [r for k, r in rows.items() if k.startswith("a: cnnmod")]
    out = ["Command: `.venv/bin/python benchmarks/bench_pruning.py --part a|b ...` (x86_64, 2 CPU cores, torch "
           "2.13.0+cpu, torch-pruning 1.6.1). The reference ResNet-20, its validation split (5,000 images); training "
           "on the 10,000 decomposition images (no labels), Adam 1e-3 with warm-up + cosine (cnnmod's one training "
           "loop on both sides), batches of 128, for the same multiply-accumulates on both sides (teacher forward + "
           "3x student forward per image), as a share of the parent's training (3 x MACs x 45,000 images x 48 "
           "epochs). Torch-Pruning's network sees mirrored and shifted images (flip + crop, as the peer run of the "
           "issue) and learns the parent's logits by KL at temperature 4; cnnmod's modules see mirrored images "
           "(and shifted ones where the row says crop) and learn as `decompose --distill` does (the squared error of "
           "the channeled logits, plus the terms the row names).", "",
           "| side | configuration | MACs / parent (all modules, composed) | largest module: MACs / parent | "
           "training / parent's training | top-1 | points vs model | loss curve (mean of each tenth of the steps) |",
           "|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if not key.startswith("a: "):
            continue
        if r["method"] == "cnnmod":
            o = r["options"]
            what = (f"keep {r['keep']}, trunk {r['trunk']}, {o['epochs']:g} epochs, features {o['features']:g}, "
                    f"composed {o['composed']:g} (T {o['temperature']:g}), crop {'yes' if o['crop'] else 'no'}")
            side = "cnnmod modules, composed"
        else:
            what = f"group magnitude, uniform ratio; untrained {100 * r['top1_untrained']:.2f}"
            side = "Torch-Pruning + KD"
        curve = ", ".join(f"{v:.3g}" for v in r["loss_curve"]) if r.get("loss_curve") else "-"
        largest = f"{r['largest_module_macs']:.3f}" if "largest_module_macs" in r else "-"
        out.append(f"| {side} | {what} | {r['macs_fraction']:.3f} | {largest} | {r['share_of_parent_training']:.2%} | "
                   f"{100 * r['top1']:.2f} | {100 * (r['top1'] - r['model_top1']):+.2f} | {curve} |")
    if a:
        out += ["", f"Model top-1: {100 * a[0]['model_top1']:.2f}.", "", NOTES_A]
    b = [r for k, r in rows.items() if k.startswith("b: ")]
    if b:
        out += ["", "2-class reuse (part b): each pair of airplane, cat, dog, truck; the pair's validation images.", "",
                "| pair | cnnmod MACs / parent | TP MACs / parent | training / parent's (cnnmod, TP) | parent "
                "restricted | cnnmod | Torch-Pruning + KD |", "|---|---|---|---|---|---|---|"]
        for r in b:
            out.append(f"| {r['pair']} | {r['macs_fraction']:.3f} | {r['tp_macs_fraction']:.3f} | "
                       f"{r['cnnmod_share']:.2%}, {r['tp_share']:.2%} | {100 * r['parent']:.2f} | "
                       f"{100 * r['cnnmod']:.2f} | {100 * r['tp']:.2f} |")
        mean = lambda k: sum(100 * (r["parent"] - r[k]) for r in b) / len(b)  # noqa: E731
        out += ["", f"Below the parent restricted to the pair, mean over {len(b)} pairs: cnnmod {mean('cnnmod'):.2f} "
                f"points, Torch-Pruning + KD {mean('tp'):.2f}.", "", NOTES_B]
    return "\n".join(out) + "\n"


# What the rows say, written after they were measured (the numbers are the tables').
NOTES_A = """\
- (a) At the same compute (4.3% of the parent's training) and about the same MACs (0.243 against 0.253),
  Torch-Pruning + KD is ahead of cnnmod's shared-trunk modules by 2.3 points (81.44% against 79.10%);
  issue #24's held-out split said 3.2. cnnmod starts far ahead (43.7% training-free, BENCHMARKS "Distilled
  modules", against 10.0% for the pruned network untrained) and ends behind: the pruned network keeps its
  BatchNorm layers and trains them on batch statistics, where cnnmod's modules hold BatchNorm folded into
  their convolutions (fixed scales); and its uniform ratio keeps about half of every layer, where
  `--keep-streams --keep 0.22` keeps the residual streams whole and 22% inside the blocks.
- Tried on the cnnmod side (composed top-1 on the validation split, all at trunk 1.0 and 16 epochs, 4.3%
  of the parent's training, `/tmp` runs of the same code as the table, not kept as rows): the feature
  term at W = 1 with the composed term at W = 10: 79.10% (78.90% for neither, BENCHMARKS "Distilled
  modules"); streams pruned too at keep 0.48 (the pruned network's shape, 0.24x the MACs) with mirrors,
  shifts, the feature term and the composed term at temperature 4: 77.82% (77.64% without the feature
  term: it adds about 0.2 points in both shapes). Neither closes the gap. The
  loss curve of the quarter-size row (the table) falls from 5.9 to 2.4 and flattens over its last fifth as
  the cosine schedule ends: more of the same training would need more budget, not more steps at its end.
- Not tried for lack of time: BatchNorm kept unfolded during the distillation and trained on batch
  statistics, as the pruned network's is (then folded again): the first difference between the two sides
  that the measurements point at.
- (c) Quarter-size modules without a shared trunk (each <= 25% of the parameters and MACs) compose to
  1.81x the parent's MACs: no network pruned to the same total can exist (it would be larger than the
  parent). The closest right comparison is made instead: Torch-Pruning at one module's size (0.243x; the
  nearest its uniform ratio reaches is 0.253x), distilled for the modules' compute (4.1%): 81.44% against
  the modules' 79.50%, 1.9 points ahead. (Its top-1 equals (a)'s, 4,072 of 5,000 images right, for a
  budget 5% smaller: two runs, as their shares and loss curves show.)
- Targets: quarter-size modules within 4 points of the model for <= 5% of its training: missed by 4.6
  (the best, 79.50%, -8.6 points at 4.1%; issue #17's best was -8.2 at 4.1% with the composed term alone,
  BENCHMARKS "Distilled modules"); ahead of Torch-Pruning + KD in (a) and (c): missed by 2.3 and 1.9
  points; in (b): met (below)."""

NOTES_B = """\
- (b) cnnmod's pair modules (`--only a,b --trunk 1.0 --keep 0.48 --score energy`, 8 epochs with mirrors, the
  feature term W = 1 and the composed term W = 10: 0.66% of the parent's training) are ahead of
  Torch-Pruning + KD at the same compute in 5 of 6 pairs, and on average; the target of 1 point below the
  parent restricted to the pair is missed (cat/dog, the hard pair, stays 3.7 below)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b"], default=None)
    parser.add_argument("--keep", type=float, default=0.22)
    parser.add_argument("--trunk", type=float, default=1.0)
    parser.add_argument("--epochs", type=float, default=16)
    parser.add_argument("--features", type=float, default=0.0)
    parser.add_argument("--composed", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--crop", action="store_true")
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from the cached rows")
    args = parser.parse_args(argv)
    rows = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if not args.render:
        {"a": part_a, "b": part_b}[args.part](args, rows)
    write_section("pruning", "## Small modules against Torch-Pruning + distillation (issue #24)\n\n" + render(rows),
                  {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
