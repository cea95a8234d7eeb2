"""Weak-class repair on CIFAR-10 (issue #4), where 500 validation images per class resolve 0.2 points.

    .venv/bin/python benchmarks/bench_weak_cifar.py [--epochs 4] [--repair-epochs 2 --repair-lr 3e-4]
        [--repair-per-class 200]

A ResNet-20 is trained on the 45,000 training images with only 10% of the "dog" images (the
first 450 of its 4,500 in file order), with cnnmod's own ``train`` (written once to
benchmarks/checkpoints/cifar10_resnet20_weakdog.safetensors with its log; rerunning reuses it).
Its modules are composed, then its "dog" module is replaced by the reference ResNet-20's (the
healthy model, trained on all images). Reported per class on the validation split, against
the weak model itself: the dog class's gain and every other class's change. Writes the
"weak_cifar" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, write_section  # noqa: E402

from cnnmod import TrainConfig, compose, decompose, load_data, load_model, replace, train  # noqa: E402
from cnnmod.compose import RepairOptions, fit_composed_, repair_  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from bench_reuse import Energy, _train_batches, restricted, weakened  # noqa: E402

WEAK = CHECKPOINTS / "cifar10_resnet20_weakdog.safetensors"
CLASS = "dog"
EQUAL = CHECKPOINTS / "cifar10_resnet20_4epochs.safetensors"  # the control (all images, same recipe)
FIT = 200  # images per class for the joint fit of the calibrations


def trained(path: Path, data, val, epochs: int) -> Path:
    """Train a ResNet-20 with the weak model's recipe into ``path`` (with its log) unless it exists."""
    if not path.exists():
        config = TrainConfig(epochs=epochs, lr=0.1, batch_size=128, seed=0)
        start = time.perf_counter()
        resume = path.with_name(path.name + ".resume.safetensors").exists()  # an interrupted run continues
        meta = train("resnet20", data, path, config, val=val, progress=False, resume=resume)
        log = {"command": f"benchmarks/bench_weak_cifar.py --epochs {epochs}", "config": vars(config),
               "train_images": len(data.labels), "seconds": time.perf_counter() - start,
               "machine": machine(), "accuracy": meta.get("accuracy")}
        path.with_suffix(".log").write_text(json.dumps(log, indent=1) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)  # the committed weak checkpoint's
    parser.add_argument("--repair-epochs", type=float, default=2.0)
    parser.add_argument("--repair-lr", type=float, default=3e-4)
    parser.add_argument("--repair-per-class", type=int, default=200)
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from results/weak_cifar.json")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((RESULTS / "weak_cifar.json").read_text())
        write_section("weak_cifar", render(result), result)
        return
    torch.set_num_threads(2)
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    weak_set = weakened(train_set, train_set.classes.index(CLASS))
    trained(WEAK, weak_set, val, args.epochs)
    weak, healthy = load_model(WEAK), load_model(CHECKPOINTS / "cifar10_resnet20.safetensors")
    energy = Energy()
    weak_modules = energy.measure("decompose the weak model (10 classes)", lambda: decompose(weak, weak_set))
    healthy_modules = decompose(healthy, train_set)
    dog = val.classes.index(CLASS)
    repaired = replace(weak_modules, healthy_modules[dog])
    rows = {
        "weak model": evaluate_scores(restricted(weak, val.classes), val, val.classes),
        "healthy model (reference)": evaluate_scores(restricted(healthy, val.classes), val, val.classes),
        "weak model's modules, vote": evaluate_scores(compose(weak_modules, rule="vote").score_images, val, val.classes),
        "weak model's modules, calibrated": evaluate_scores(compose(weak_modules, rule="calibrated").score_images,
                                                            val, val.classes),
        "after replacing the dog module, vote": evaluate_scores(compose(repaired, rule="vote").score_images, val,
                                                                val.classes),
        "after replacing the dog module, calibrated": evaluate_scores(compose(repaired, rule="calibrated").score_images,
                                                                      val, val.classes),
    }
    # The composition's calibrations fitted jointly on the user's own data (the weak training set:
    # FIT images per class, 450 dogs among them to draw from); no network weight changes.
    fitted, fitted_weak = copy.deepcopy(repaired), copy.deepcopy(weak_modules)
    start = time.perf_counter()
    fit_composed_(fitted, weak_set, per_class=FIT)
    fit_seconds = time.perf_counter() - start
    clf = compose(fitted, rule="calibrated")
    rows["after replacing the dog module, fitted jointly"] = evaluate_scores(clf.score_images, val, val.classes)
    fit_composed_(fitted_weak, weak_set, per_class=FIT)
    rows["weak model's modules, fitted jointly"] = evaluate_scores(compose(fitted_weak, rule="calibrated").score_images,
                                                                   val, val.classes)
    repairs = {}  # issue #17: adapt only the modules the new dog module confuses, on the weak training set
    for method in ("head", "calibrate", "continuous", "train"):
        options = RepairOptions(method=method, epochs=args.repair_epochs, lr=args.repair_lr,
                                per_class=args.repair_per_class)
        modules = copy.deepcopy(repaired)
        report = energy.measure(f"repair ({method})", lambda: repair_(modules, CLASS, weak_set, options))
        label = f"after replacing the dog module, repaired ({method})"
        rows[label] = evaluate_scores(compose(modules, rule="calibrated").score_images, val, val.classes)
        repairs[label] = {k: v for k, v in report.items()}
    energy.measure("train the weak model's recipe, 20 batches of 128 (for extrapolation)",
                   lambda: _train_batches(train_set, 20))
    equal = load_model(trained(EQUAL, train_set, val, args.epochs))  # the control: every dog image
    rows["control: the weak model's recipe with every dog image"] = evaluate_scores(
        restricted(equal, val.classes), val, val.classes)
    result = {"fit_per_class": FIT, "fit_seconds": fit_seconds, "repairs": repairs, "energy": energy.rows,
              "weak_training_macs": weak_modules[0].meta.get("parent_training_macs"), "control_images": len(train_set),
              "parent_macs_per_image": weak_modules[0].timing["statistics_macs"] // weak_modules[0].timing["images"],
              # decomposing: the statistics pass, then each module's calibration pass (forward passes)
              "decompose_macs": weak_modules[0].timing["statistics_macs"] + sum(
                  m.meta["calibration"]["images"] for m in weak_modules) * (
                  weak_modules[0].timing["statistics_macs"] // weak_modules[0].timing["images"]),
              "frontier": frontier(clf, val, rows["weak model"]["per_class"]),
              "rows": {k: {"top1": v["top1"], "per_class": v["per_class"]} for k, v in rows.items()},
              "weak_log": json.loads(WEAK.with_suffix(".log").read_text())}
    write_section("weak_cifar", render(result), result)


@torch.no_grad()
def frontier(clf, val, weak: dict) -> list[dict]:
    """Every operating point one more scalar can give: the dog module's score shifted by delta
    (log-odds), swept on the validation split itself. A diagnostic, not a method (it looks at the
    answers): no calibration of the dog module can do better than the best point it finds."""
    from cnnmod.evaluate import match_classes

    scores = torch.cat([clf.score_images(chunk) for chunk in val.images.split(500)])
    truth = match_classes(val.classes, clf.classes)[val.labels]
    dog, points = clf.classes.index(CLASS), []
    for delta in torch.linspace(-6, 6, 121).tolist():
        shifted = scores.clone()
        shifted[:, dog] += delta
        pred = shifted.argmax(1)
        acc = {name: float((pred[truth == k] == k).float().mean()) for k, name in enumerate(clf.classes)}
        points.append({"delta": delta, "dog": acc[CLASS],
                       "worst_loss": max(weak[c] - acc[c] for c in acc if c != CLASS)})
    return points


def render(result: dict) -> str:
    rows, weak = result["rows"], result["rows"]["weak model"]["per_class"]
    others = [c for c in weak if c != CLASS]
    lines = ["### Weak-class repair, CIFAR-10 ResNet-20 (dog trained with 10% of its images)", "",
             f"Command: `.venv/bin/python benchmarks/bench_weak_cifar.py` (machine: {machine()}). Weak model: "
             f"ResNet-20 trained here on the training split without 90% of the dog images "
             f"({result['weak_log']['train_images']} images, {result['weak_log']['config']['epochs']} epochs on "
             "this CPU; checkpoint and log in benchmarks/checkpoints/). Healthy model: the reference ResNet-20 "
             "(all images, 48 epochs). Paper strategy; validation split, 500 images per class.", "",
             "| | dog | other classes (mean) | largest loss of another class vs. the weak model (negative: none lost) "
             "| the same vs. the weak model's modules, calibrated | top-1 | training cost: share of the weak model's "
             "training |", "|---|---|---|---|---|---|---|"]
    before = rows["weak model's modules, calibrated"]["per_class"]
    costs = _costs(result)
    for label, r in rows.items():
        pc = r["per_class"]
        worst = max(weak[c] - pc[c] for c in others)
        worst_modules = max(before[c] - pc[c] for c in others)
        lines.append(f"| {label} | {100 * pc[CLASS]:.1f} | {100 * sum(pc[c] for c in others) / len(others):.2f} | "
                     f"{100 * worst:+.1f} points | {100 * worst_modules:+.1f} points | {100 * r['top1']:.2f} | "
                     f"{costs.get(label, '-')} |")
    lines += ["", "Per class (%):", "", "| | " + " | ".join(weak) + " |", "|---|" + "---|" * len(weak)]
    lines += [f"| {label} | " + " | ".join(f"{100 * r['per_class'][c]:.1f}" for c in weak) + " |"
              for label, r in rows.items()]
    gap = rows["healthy model (reference)"]["per_class"][CLASS] - weak[CLASS]
    for rule in ("vote", "calibrated", "fitted jointly"):
        after = rows[f"after replacing the dog module, {rule}"]["per_class"]
        lines.append("")
        lines.append(f"{rule}: recovered {100 * (after[CLASS] - weak[CLASS]) / gap:.0f}% of the {100 * gap:.1f}-point "
                     f"gap on dog; largest loss of another class vs. the weak model "
                     f"{100 * max(weak[c] - after[c] for c in others):.1f} points (target: <= 1).")
    after = rows["after replacing the dog module, fitted jointly"]["per_class"]
    loser = max(others, key=lambda c: weak[c] - after[c])
    lines += ["", f"The class that loses most is {loser}: the healthy model's dog module wins {loser} images that the "
              "weak model's modules had no rival for (the weak model answers dog for almost nothing)."]
    safe = [p for p in result["frontier"] if p["worst_loss"] <= 0.01]
    reach = [p for p in result["frontier"] if p["dog"] - weak[CLASS] >= 0.8 * gap]
    lines += ["", "Could any calibration meet the target? A diagnostic, not a method (it is swept on the validation "
              "split itself): the jointly fitted composition with the dog module's score shifted by every delta in "
              "[-6, 6] (log-odds). "
              + (f"Keeping every other class within 1 point of the weak model, dog reaches at most "
                 f"{100 * max(p['dog'] for p in safe):.1f}% "
                 f"({100 * (max(p['dog'] for p in safe) - weak[CLASS]) / gap:.0f}% of the gap)"
                 if safe else "No shift keeps every other class within 1 point")
              + (f"; recovering 80% of the gap, another class loses at least "
                 f"{100 * min(p['worst_loss'] for p in reach):.1f} points." if reach else ".")]
    lines += repair_lines(result, weak, before, others, gap)
    control = rows.get("control: the weak model's recipe with every dog image")
    if control:
        pc = control["per_class"]
        moved = max(others, key=lambda c: weak[c] - pc[c])
        lines += ["", f"Control: retraining instead, with the weak model's recipe and budget "
                  f"({result['weak_log']['config']['epochs']} epochs) and every dog image, reaches dog "
                  f"{100 * pc[CLASS]:.1f}% ({100 * (pc[CLASS] - weak[CLASS]) / gap:.0f}% of the gap), and its "
                  f"{moved} is {100 * (weak[moved] - pc[moved]):.1f} points below the weak model's ({loser}: "
                  f"{100 * (pc[loser] - weak[loser]):+.1f}). At this budget two trainings differ per class by "
                  "more than the target's 1 point, so the target (no other class losing more than 1 point "
                  "against the weak model) is one that retraining itself misses here, by more than the "
                  "jointly fitted repair does."]
    return "\n".join(lines)


def _costs(result: dict) -> dict[str, str]:
    """Each row's training cost (forward and backward multiply-accumulates, 3x a forward pass for a
    training step) as a share of what training the weak model cost, from its recorded recipe."""
    parent = result.get("weak_training_macs")
    if not parent:
        return {}
    decompose = result["decompose_macs"]
    per_image = result["parent_macs_per_image"]
    out = {"weak model": "100% (its training)", "healthy model (reference)": "(another model)",
           "control: the weak model's recipe with every dog image":
               f"{100 * result['control_images'] / result['weak_log']['train_images']:.0f}% (a new training)"}
    for label in result["rows"]:
        if "modules" in label or "after replacing" in label:
            extra = result["repairs"].get(label, {}).get("macs", 0)
            if "fitted jointly" in label:  # the joint fit's forward passes: every module on FIT images per class
                extra = 10 * 10 * result["fit_per_class"] * per_image
            out[label] = f"{100 * (decompose + extra) / parent:.2f}%"
    return out


def repair_lines(result: dict, weak: dict, before: dict, others: list[str], gap: float) -> list[str]:
    """The repair's paragraph: what each method kept, recovered, cost, and the energy against retraining."""
    lines = ["", "Repair (issue #17): after the replacement, the classes the new dog module confuses on the weak "
             "model's own training images (the user's data: 450 dogs) are adapted, every other module left as it is "
             "(its file byte-identical): `repair_(modules, 'dog', weak_training_set, RepairOptions(method=...))`, "
             "`cnnmod replace ... --repair METHOD --data ...`; 200 images per class to fit, 100 per class to "
             "check: each stage is kept only if it lowers the composition's loss on those. One "
             "class's accuracy here rests on 500 images: 1 point is 5 of them."]
    replaced = result["rows"]["after replacing the dog module, calibrated"]["per_class"]
    for label, report in result["repairs"].items():
        pc = result["rows"][label]["per_class"]
        confused = ", ".join(f"{c} {100 * v:.1f}%" for c, v in report["confused"].items())
        lines.append("")
        lines.append(f"{report['method']}: confused {confused}; kept: {', '.join(report['kept']) or 'nothing'}"
                     + (f" ({report['steps']} training steps run)" if report["steps"] else "") +
                     f"; dog recovered {100 * (pc[CLASS] - weak[CLASS]) / gap:.0f}% of the gap; largest loss of "
                     f"another class {100 * max(weak[c] - pc[c] for c in others):.1f} points vs. the weak model, "
                     f"{100 * max(before[c] - pc[c] for c in others):.1f} vs. its modules, "
                     f"{100 * max(replaced[c] - pc[c] for c in others):.1f} vs. the replacement it starts from "
                     f"(target: <= 1); "
                     f"{report['seconds']:.0f} s.")
    head = result["rows"].get("after replacing the dog module, repaired (head)")
    if head:
        pc = head["per_class"]
        loser = max(others, key=lambda c: before[c] - pc[c])
        worst_weak = max(others, key=lambda c: weak[c] - pc[c])
        recovered = [r["method"] for label, r in result["repairs"].items()
                     if result["rows"][label]["per_class"][CLASS] - weak[CLASS] >= 0.9 * gap]
        lines += ["", f"Targets (issue #17): dog recovers >= 90% of its gap: met by "
                  f"{', '.join(sorted(recovered)) or 'no method'}. Every other class "
                  f"within 1 point of its accuracy before: the head re-fit keeps them within "
                  f"{100 * max(replaced[c] - pc[c] for c in others):.1f} of the replacement it repairs, but "
                  f"{loser} is {100 * (before[loser] - pc[loser]):.1f} below the weak model's modules composed "
                  f"(MISSED by {100 * (before[loser] - pc[loser]) - 1:.1f}) and {worst_weak} "
                  f"{100 * (weak[worst_weak] - pc[worst_weak]):.1f} below the weak model itself, where the calibrated "
                  f"composition of the weak model's own modules already loses "
                  f"{100 * max(weak[c] - before[c] for c in others):.1f} points (the rule, before any replacement). "
                  "Tried in exploratory runs (not in the table): training the confused modules (1 to 4 epochs, lr "
                  "1e-4 to 1e-3, 200 or 500 images per class, with and without a term holding their scores on the "
                  "other classes' images): at best cat 57.8 and another class -1.2 to -3.2 points; calibrating "
                  "the confused modules after the head moved frog by -2.0; the paper's continuous learning added "
                  "nothing the check kept."]
    energy = result["energy"]
    step = energy.get("train the weak model's recipe, 20 batches of 128 (for extrapolation)")
    dec = energy.get("decompose the weak model (10 classes)")
    fix = energy.get("repair (head)")
    if step and dec and fix:
        batches = -(-result["control_images"] // 128) * result["weak_log"]["config"]["epochs"]
        retrain = step["kwh"] / 20 * batches
        lines += ["", f"Energy (CodeCarbon, offline mode, this run): retraining the weak model's recipe with every dog "
                  f"image, extrapolated from 20 measured batches to {batches}, {1000 * retrain:.1f} Wh; decomposing "
                  f"the weak model {1000 * dec['kwh']:.2f} Wh and the head repair {1000 * fix['kwh']:.2f} Wh: "
                  f"replacement with repair costs {retrain / (dec['kwh'] + fix['kwh']):.1f}x less energy than "
                  "retraining (target >= 20x; the healthy model's one-time decomposition not counted). CodeCarbon "
                  "reads no power meter on this virtual machine: its CPU energy is a model of load x TDP."]
    return lines


if __name__ == "__main__":
    main()
