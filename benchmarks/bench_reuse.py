"""Benchmark of issue #4: reuse and replace, measured as the paper measures them, energy included.

    .venv/bin/python benchmarks/bench_reuse.py                 # mnist5k scenarios (+ CIFAR-10 ones if
                                                               #   the reference checkpoint exists)
Scenarios:
- intra-data-set reuse on mnist5k, all 45 pairs: 2 composed modules vs the parent restricted to the
  2 classes vs a smallcnn retrained on the 2 classes with the parent's recipe;
- intra reuse on CIFAR-10 (4 fixed classes, 6 pairs): composed vs the parent restricted;
- inter-data-set reuse, MNIST module + CIFAR-10 module (4 x 4 pairs) on raw mixed images, each
  module preparing its own input: paper vote vs calibrated vs calibrated + continuous learning;
- intra replace on CIFAR-10, the paper's: each module of the ResNet-32 swapped, one at a time, for
  the ResNet-20 module of the same class (needs benchmarks/checkpoints/cifar10_resnet32.safetensors);
- inter-data-set reuse also against a smallcnn retrained on each mixed pair (32x32 colour);
- weak-class repair on mnist5k: a model trained with 10% of class 5's images; its module 5
  replaced by the healthy parent's;
- energy and CO2e with CodeCarbon (offline, this machine, this run): training vs decomposing vs
  reusing/replacing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, write_section  # noqa: E402

from cnnmod import Dataset, TrainConfig, compose, decompose, load_data, load_model, replace, train  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.modules.adapt import adapt_  # noqa: E402

RECIPE = TrainConfig(epochs=5, lr=0.05)  # the parent's recipe, used for every retrained baseline
CIFAR_FOUR = ["airplane", "cat", "dog", "truck"]
MNIST_FOUR = ["0", "3", "5", "8"]


def restricted(model, names):
    idx = [model.cnnmod_meta["classes"].index(n) for n in names]
    return lambda images: model(model.input_spec.prepare(images))[:, idx]


def weakened(data: Dataset, c: int) -> Dataset:
    """``data`` with only the first 10% (in file order) of class c's images: the weak-class scenario."""
    index = torch.nonzero(data.labels == c).flatten()
    dropped = torch.zeros(len(data.labels), dtype=torch.bool)
    dropped[index[len(index) // 10:]] = True
    return data.subset(torch.nonzero(~dropped).flatten())


def composed_acc(modules, data, rule="auto"):
    clf = compose(modules, rule=rule)
    return evaluate_scores(clf.score_images, data, clf.classes)


class Energy:
    """CodeCarbon in offline mode around a block: energy (kWh), CO2e (kg), seconds."""

    def __init__(self):
        from codecarbon import OfflineEmissionsTracker

        self.tracker_cls = OfflineEmissionsTracker
        self.rows = {}

    def measure(self, name, fn):
        tracker = self.tracker_cls(country_iso_code="USA", save_to_file=False, log_level="error",
                                   measure_power_secs=1, tracking_mode="process")
        tracker.start()
        start = time.perf_counter()
        try:
            out = fn()
        finally:
            co2 = tracker.stop()
        d = tracker.final_emissions_data
        self.rows[name] = {"kwh": d.energy_consumed, "co2_kg": co2, "seconds": time.perf_counter() - start}
        return out


def mnist_scenarios(tmp: Path, energy: Energy) -> dict:
    train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    parent_path = tmp / "parent.safetensors"
    energy.measure("train 10-class smallcnn (retrain for replace)",
                   lambda: train("smallcnn", train_set, parent_path, RECIPE, progress=False))
    parent = load_model(parent_path)
    modules = energy.measure("decompose all 10 classes (incl. calibration)", lambda: decompose(parent, train_set))
    per_class_model = evaluate_scores(restricted(parent, parent.cnnmod_meta["classes"]), test_set, train_set.classes)
    per_class_modules = composed_acc(modules, test_set)

    pairs = []
    for a, b in itertools.combinations(train_set.classes, 2):
        names = [a, b]
        pair_test = test_set.only(names)
        path = tmp / f"pair_{a}{b}.safetensors"
        if (a, b) == ("3", "8"):  # one retrain measured for energy, as the reuse baseline
            energy.measure("train 2-class smallcnn (retrain for reuse)",
                           lambda: train("smallcnn", train_set.only(names), path, RECIPE, progress=False))
            energy.measure("reuse: compose 2 modules", lambda: compose([modules[3], modules[8]]))
        else:
            train("smallcnn", train_set.only(names), path, RECIPE, progress=False)
        retrained = load_model(path)
        pairs.append({
            "pair": names,
            "modules_vote": composed_acc([modules[int(a)], modules[int(b)]], pair_test, "vote")["top1"],
            "modules_calibrated": composed_acc([modules[int(a)], modules[int(b)]], pair_test, "calibrated")["top1"],
            "parent_restricted": evaluate_scores(restricted(parent, names), pair_test, names)["top1"],
            "retrained": evaluate_scores(restricted(retrained, names), pair_test, names)["top1"],
        })

    # weak-class repair: only 10% of class 5's training images
    weak_set = weakened(train_set, 5)
    train("smallcnn", weak_set, tmp / "weak.safetensors", RECIPE, progress=False)
    weak = load_model(tmp / "weak.safetensors")
    weak_modules = decompose(weak, weak_set)
    repaired = energy.measure("replace: swap module 5 (healthy module exists)",
                              lambda: replace(weak_modules, modules[5]))
    repair = {
        "weak_model": evaluate_scores(restricted(weak, weak.cnnmod_meta["classes"]), test_set, test_set.classes),
        "healthy_model": per_class_model,
        "weak_modules": composed_acc(weak_modules, test_set, "vote"),
        "weak_modules_calibrated": composed_acc(weak_modules, test_set, "calibrated"),
        "repaired_calibrated": composed_acc(repaired, test_set, "calibrated"),
        "repaired_vote": composed_acc(repaired, test_set, "vote"),
    }
    return {"pairs": pairs, "per_class_model": per_class_model, "per_class_modules": per_class_modules,
            "repair": repair, "modules": modules}


def cifar_scenarios(mnist_modules, energy: Energy) -> dict | None:
    ckpt = CHECKPOINTS / "cifar10_resnet20.safetensors"
    if not (ckpt.exists() and CIFAR_TAR.exists()):
        return None
    parent = load_model(ckpt)
    train_set, val_set = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    modules = energy.measure("decompose CIFAR-10 ResNet-20 (10 classes)", lambda: decompose(parent, train_set))
    by_name = {m.class_name: m for m in modules}
    per_class_model = evaluate_scores(restricted(parent, parent.cnnmod_meta["classes"]), val_set, val_set.classes)
    per_class_modules = composed_acc(modules, val_set)
    pairs = []
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        pair_val = val_set.only([a, b])
        pairs.append({"pair": [a, b],
                      "modules_vote": composed_acc([by_name[a], by_name[b]], pair_val, "vote")["top1"],
                      "modules_calibrated": composed_acc([by_name[a], by_name[b]], pair_val, "calibrated")["top1"],
                      "parent_restricted": evaluate_scores(restricted(parent, [a, b]), pair_val, [a, b])["top1"]})
    mnist_test = load_data("mnist5k", "test")
    inter = []
    for d, c in itertools.product(MNIST_FOUR, CIFAR_FOUR):
        digits, objects = mnist_test.only([d]), val_set.only([c])  # raw images, each in its own format
        row = {"pair": [d, c]}
        for rule in ("vote", "calibrated"):
            row[rule] = _mixed_accuracy([mnist_modules[int(d)], by_name[c]], digits, objects, rule)
        adapted = [copy.deepcopy(mnist_modules[int(d)]), copy.deepcopy(by_name[c])]  # adapt copies
        adapt_(adapted[0], train_set.only([c]).images[:200])  # foreign training images only
        adapt_(adapted[1], load_data("mnist5k", "train").only([d]).images[:200])
        row["calibrated_cl"] = _mixed_accuracy(adapted, digits, objects, "calibrated")
        inter.append(row)
    mnist_train = load_data("mnist5k", "train")
    for row in inter:  # the retrained baseline of the inter-data-set pairs
        d, c = row["pair"]
        row["retrained"] = _retrained_mixed(mnist_train.only([d]), train_set.only([c]).images[:400],
                                            mnist_test.only([d]), val_set.only([c]))
    energy.measure("train CIFAR-10 ResNet-20, 20 batches of 128 (for extrapolation)",
                   lambda: _train_batches(train_set, 20))
    return {"per_class_model": per_class_model, "per_class_modules": per_class_modules, "pairs": pairs,
            "inter": inter, "replace": intra_replace(modules, train_set, val_set),
            "reference_epochs": parent.cnnmod_meta["train_config"]["epochs"]}


def _margins(module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module.margin(module.input_spec.prepare(images[i:i + 500]))
                          for i in range(0, len(images), 500)])


def intra_replace(modules20, train_set: Dataset, val_set: Dataset) -> dict | None:
    """The paper's intra replace: swap each ResNet-32 module for the ResNet-20 one of its class.

    Each module's margins on the validation images are computed once; a composition is then the
    argmax over its modules' margins (vote, the paper's rule) or calibrated log-odds a * m + b
    (what ``compose`` uses for modules of different parents).
    """
    ckpt = CHECKPOINTS / "cifar10_resnet32.safetensors"
    if not ckpt.exists():
        return None
    parent32 = load_model(ckpt)
    modules32 = decompose(parent32, train_set)
    m20 = torch.stack([_margins(m, val_set.images) for m in modules20], 1)  # (N, 10)
    m32 = torch.stack([_margins(m, val_set.images) for m in modules32], 1)
    cal = lambda mods: (torch.tensor([m.meta["calibration"]["a"] for m in mods]),
                        torch.tensor([m.meta["calibration"]["b"] for m in mods]))
    (a20, b20), (a32, b32) = cal(modules20), cal(modules32)
    y = val_set.labels

    def acc(scores):
        pred = scores.argmax(1)
        return {"top1": float((pred == y).float().mean()),
                "per_class": [float((pred[y == c] == c).float().mean()) for c in range(10)]}

    with torch.no_grad():
        model32 = acc(torch.cat([parent32(parent32.input_spec.prepare(val_set.images[i:i + 500]))
                                 for i in range(0, len(y), 500)]))
    before_vote, before_cal = acc(m32), acc(m32 * a32 + b32)
    swaps = []
    for c in range(10):
        mixed = m32 * a32 + b32
        mixed[:, c] = m20[:, c] * a20[c] + b20[c]
        after = acc(mixed)
        swaps.append({"class": val_set.classes[c], "top1": after["top1"], "class_acc": after["per_class"][c],
                      "class_acc_before": before_cal["per_class"][c]})
    return {"model32": model32, "modules32_vote": before_vote, "modules32_calibrated": before_cal,
            "modules20_calibrated": acc(m20 * a20 + b20), "swaps": swaps}


def _retrained_mixed(digits: Dataset, object_images: torch.Tensor, digits_test: Dataset, objects_test: Dataset) -> float:
    """A smallcnn trained on one digit vs one CIFAR-10 class (both as 32x32 colour), the parent's recipe."""
    def colour(images):  # (B, 1, 28, 28) grey digits -> (B, 3, 32, 32), like the CIFAR images
        x = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    data = Dataset(torch.cat([colour(digits.images), object_images]),
                   torch.cat([torch.zeros(len(digits), dtype=torch.int64),
                              torch.ones(len(object_images), dtype=torch.int64)]), ["digit", "object"], "mixed")
    with tempfile.TemporaryDirectory() as d:
        train("smallcnn", data, Path(d) / "m.safetensors", RECIPE, progress=False)
        model = load_model(Path(d) / "m.safetensors")
    hits = 0
    with torch.no_grad():
        for images, target in ((colour(digits_test.images), 0), (objects_test.images, 1)):
            hits += int((model(model.input_spec.prepare(images)).argmax(1) == target).sum())
    return hits / (len(digits_test) + len(objects_test))


def _train_batches(data: Dataset, n: int) -> None:
    """n SGD steps of the reference recipe (ResNet-20, batch 128, crop+flip), to measure energy."""
    from cnnmod import create_model
    from cnnmod.data.inputspec import measure_spec
    from cnnmod.training import augment_batch

    spec = measure_spec(data.images[:5000])
    model = create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for idx in torch.randperm(len(data), generator=gen)[: 128 * n].split(128):
        loss = torch.nn.functional.cross_entropy(model(spec.prepare(augment_batch(data.images[idx], gen, "crop-flip"))),
                                                 data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _mixed_accuracy(modules, digits: Dataset, objects: Dataset, rule: str) -> float:
    clf = compose(modules, rule=rule)
    hits = 0
    for data, target in ((digits, 0), (objects, 1)):
        with torch.no_grad():
            hits += int((clf.score_images(data.images).argmax(1) == target).sum())
    return hits / (len(digits) + len(objects))


def plots(mnist: dict, cifar: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 2 if cifar else 1, figsize=(11 if cifar else 6, 3.5), squeeze=False)
    for ax, (title, res) in zip(axes[0], [("mnist5k smallcnn (test)", mnist)] +
                                ([("CIFAR-10 ResNet-20 (validation)", cifar)] if cifar else [])):
        names = list(res["per_class_model"]["per_class"])
        xs = torch.arange(len(names)).float()
        ax.bar(xs - 0.2, [res["per_class_model"]["per_class"][n] for n in names], 0.4, label="model")
        ax.bar(xs + 0.2, [res["per_class_modules"]["per_class"][n] for n in names], 0.4, label="composed modules")
        ax.set_xticks(xs.tolist(), names, rotation=45, ha="right")
        ax.set_ylim(0.5, 1.0)
        ax.set_title(title)
        ax.set_ylabel("per-class accuracy")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "per_class.png", dpi=110)
    files.append("benchmarks/results/per_class.png")

    acc = torch.full((10, 10), float("nan"))
    diff = torch.full((10, 10), float("nan"))
    for p in mnist["pairs"]:
        a, b = int(p["pair"][0]), int(p["pair"][1])
        acc[a, b] = acc[b, a] = 100 * p["modules_vote"]
        diff[a, b] = diff[b, a] = 100 * (p["modules_vote"] - p["retrained"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [(acc, "composed pair accuracy, % (vote)", "viridis", (90, 100), "{:.1f}"),
              (diff, "composed minus retrained 2-class model, points", "RdBu", (-4, 4), "{:+.1f}")]
    for ax, (grid, title, cmap, (lo, hi), fmt) in zip(axes, panels):
        im = ax.imshow(grid.numpy(), cmap=cmap, vmin=lo, vmax=hi)
        for i in range(10):
            for j in range(10):
                if i != j:
                    ax.text(j, i, fmt.format(float(grid[i, j])), ha="center", va="center", fontsize=6)
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        ax.set_title(f"mnist5k: {title}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / "pair_reuse.png", dpi=110)
    files.append("benchmarks/results/pair_reuse.png")
    return files


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def render(mnist, cifar, energy: Energy, files) -> str:
    p = mnist["pairs"]
    r = mnist["repair"]
    lines = ["## Reuse and replace (issue #4)", "",
             f"Command: `.venv/bin/python benchmarks/bench_reuse.py` (machine: {machine()}). Every retrained "
             f"baseline uses the parent's recipe ({RECIPE.epochs} epochs, lr {RECIPE.lr}). Accuracies are top-1 "
             "on the test split (mnist5k) or the held-out validation split (CIFAR-10).", "",
             "### Intra-data-set reuse, mnist5k, all 45 pairs", "",
             "| | composed, vote (paper) | composed, calibrated | parent restricted to the pair | retrained 2-class |",
             "|---|---|---|---|---|",
             f"| mean | {100 * mean(x['modules_vote'] for x in p):.2f} | {100 * mean(x['modules_calibrated'] for x in p):.2f} "
             f"| {100 * mean(x['parent_restricted'] for x in p):.2f} | {100 * mean(x['retrained'] for x in p):.2f} |",
             f"| worst pair | {100 * min(x['modules_vote'] for x in p):.2f} | {100 * min(x['modules_calibrated'] for x in p):.2f} "
             f"| {100 * min(x['parent_restricted'] for x in p):.2f} | {100 * min(x['retrained'] for x in p):.2f} |", "",
             f"Composed minus retrained, mean over pairs: {100 * mean(x['modules_vote'] - x['retrained'] for x in p):+.2f} "
             f"points with the vote (the default for modules of one parent), "
             f"{100 * mean(x['modules_calibrated'] - x['retrained'] for x in p):+.2f} calibrated (paper: +2.5); "
             f"largest drop below the parent restricted to a pair: "
             f"{100 * max(x['parent_restricted'] - x['modules_calibrated'] for x in p):.2f} points (vote: "
             f"{100 * max(x['parent_restricted'] - x['modules_vote'] for x in p):.2f}).", ""]
    lines += [f"![per-class accuracy, model vs composed modules]({files[0]})", "",
              f"![pair reuse matrix]({files[1]})", ""]
    five = "5"
    gap = r["healthy_model"]["per_class"][five] - r["weak_model"]["per_class"][five]
    rec = r["repaired_calibrated"]["per_class"][five] - r["weak_model"]["per_class"][five]
    def worst_other(after):  # the largest drop of another class vs. the weak model itself
        return max(r["weak_model"]["per_class"][c] - r[after]["per_class"][c]
                   for c in r["weak_model"]["per_class"] if c != five)
    lines += ["### Weak-class repair, mnist5k (class 5 trained with 10% of its images)", "",
              "| | class 5 | other classes (mean) | top-1 |", "|---|---|---|---|"]
    for label, key in [("weak model", "weak_model"), ("healthy model", "healthy_model"),
                       ("weak model's modules, vote", "weak_modules"),
                       ("weak model's modules, calibrated", "weak_modules_calibrated"),
                       ("after replacing module 5, calibrated", "repaired_calibrated"),
                       ("after replacing module 5, vote", "repaired_vote")]:
        res = r[key]
        lines.append(f"| {label} | {100 * res['per_class'][five]:.1f} | "
                     f"{100 * mean(v for c, v in res['per_class'].items() if c != five):.2f} | {100 * res['top1']:.2f} |")
    rec_vote = r["repaired_vote"]["per_class"][five] - r["weak_model"]["per_class"][five]
    lines += ["", f"Gap between the weak and the healthy model on class 5: {100 * gap:.1f} points; recovered "
              f"{100 * rec / gap:.0f}% (calibrated) and {100 * rec_vote / gap:.0f}% (vote). Largest loss of another "
              f"class vs. the weak model: {100 * worst_other('repaired_calibrated'):.1f} points (calibrated), "
              f"{100 * worst_other('repaired_vote'):.1f} (vote). Note the weak model's own modules composed with "
              "calibration already recover much of class 5: the class-balanced calibration undoes the bias of "
              "the model's output layer against the rare class.", ""]
    if cifar:
        cp = cifar["pairs"]
        extra = RESULTS / "cifar_retrained_pairs.json"  # written by bench_retrain_pairs.py
        got = json.loads(extra.read_text()) if extra.exists() else {"rows": [], "epochs": None}
        retrained = {tuple(r["pair"]): r["retrained"] for r in got["rows"]}
        retrained_epochs = got["epochs"]
        retrained_head = f"retrained 2-class ({retrained_epochs} epochs)" if retrained else "retrained 2-class"
        lines += ["### CIFAR-10 ResNet-20 (reference checkpoint)", "",
                  f"All 10 modules composed: top-1 {100 * cifar['per_class_modules']['top1']:.2f} vs model "
                  f"{100 * cifar['per_class_model']['top1']:.2f}.", "",
                  f"| pair (4 fixed classes) | composed, vote | composed, calibrated | parent restricted | {retrained_head} |",
                  "|---|---|---|---|---|"]
        for x in cp:
            r_acc = retrained.get(tuple(x["pair"]))
            lines.append(f"| {' / '.join(x['pair'])} | {100 * x['modules_vote']:.2f} | {100 * x['modules_calibrated']:.2f} "
                         f"| {100 * x['parent_restricted']:.2f} | {'-' if r_acc is None else f'{100 * r_acc:.2f}'} |")
        if retrained:
            lines += ["", f"Retrained: a ResNet-20 trained from scratch on each pair's 9,000 training images "
                      f"(`benchmarks/bench_retrain_pairs.py --epochs {retrained_epochs}`; {retrained_epochs} epochs, "
                      "a CPU budget, against the reference model's 48 on a GPU: the retrained baseline is weaker than "
                      "the paper's equal-epoch one). Composed (vote) minus retrained, mean over the 6 pairs: "
                      f"{100 * mean(x['modules_vote'] - retrained[tuple(x['pair'])] for x in cp):+.2f} points "
                      "(paper: +2.5)."]
        else:
            lines += ["", "Retrained 2-class ResNet-20s (\"-\"): not measured yet; `benchmarks/bench_retrain_pairs.py` "
                      "trains them, at about 4 minutes per epoch and pair on this 2-core machine."]
        inter = cifar["inter"]
        lines += ["", "Inter-data-set reuse: an MNIST module (smallcnn, 28x28 grey) with a CIFAR-10 module "
                  "(ResNet-20, 32x32 colour), on raw mixed test images (100 digits + 500 CIFAR images per pair), "
                  "16 pairs:", "",
                  "| | vote (paper) | calibrated | calibrated + continuous learning | retrained 2-class smallcnn |",
                  "|---|---|---|---|---|",
                  f"| mean | {100 * mean(x['vote'] for x in inter):.2f} | {100 * mean(x['calibrated'] for x in inter):.2f} "
                  f"| {100 * mean(x['calibrated_cl'] for x in inter):.2f} | {100 * mean(x['retrained'] for x in inter):.2f} |",
                  f"| worst | {100 * min(x['vote'] for x in inter):.2f} | {100 * min(x['calibrated'] for x in inter):.2f} "
                  f"| {100 * min(x['calibrated_cl'] for x in inter):.2f} | {100 * min(x['retrained'] for x in inter):.2f} |",
                  "", "The retrained baseline: a smallcnn trained with the parent's recipe on the pair's 400 training "
                  "digits (made 32x32 colour) and 400 training images of the CIFAR-10 class (paper, CIFAR-10 + "
                  "CIFAR-100 classes: modules 12.1 points below retraining, 7.6 with continuous learning).", ""]
        rep = cifar.get("replace")
        if rep:
            sw = rep["swaps"]
            base = rep["modules32_calibrated"]["top1"]
            lines += ["### Intra replace, CIFAR-10 (the paper's: each ResNet-32 module swapped for ResNet-20's)", "",
                      f"ResNet-32 model {100 * rep['model32']['top1']:.2f}; its 10 modules composed: "
                      f"{100 * rep['modules32_vote']['top1']:.2f} (vote), {100 * base:.2f} (calibrated); the "
                      f"ResNet-20's modules: {100 * rep['modules20_calibrated']['top1']:.2f} (calibrated). Modules of "
                      "two parents compose by calibrated scores.", "",
                      "| swapped class | top-1 after | change (points) | that class before | that class after |",
                      "|---|---|---|---|---|"]
            for x in sw:
                lines.append(f"| {x['class']} | {100 * x['top1']:.2f} | {100 * (x['top1'] - base):+.2f} | "
                             f"{100 * x['class_acc_before']:.1f} | {100 * x['class_acc']:.1f} |")
            lines += ["", f"Mean change of top-1 over the 10 swaps: {100 * mean(x['top1'] - base for x in sw):+.2f} "
                      "points (paper: +0.7).", ""]
    lines += ["### Energy (CodeCarbon, offline mode, this machine, this run)", "",
              "| step | energy (Wh) | CO2e (g) | seconds |", "|---|---|---|---|"]
    for name, e in energy.rows.items():
        lines.append(f"| {name} | {1000 * e['kwh']:.4f} | {1000 * e['co2_kg']:.4f} | {e['seconds']:.2f} |")
    rows = energy.rows
    reuse = rows["decompose all 10 classes (incl. calibration)"]["kwh"] + rows["reuse: compose 2 modules"]["kwh"]
    repl = rows["replace: swap module 5 (healthy module exists)"]["kwh"] + rows["decompose all 10 classes (incl. calibration)"]["kwh"]
    lines += ["", f"Reuse (decompose + compose) vs. retraining a 2-class model: "
              f"{rows['train 2-class smallcnn (retrain for reuse)']['kwh'] / reuse:.1f}x less energy; replacement "
              f"(decompose the weak model + swap) vs. retraining the 10-class model: "
              f"{rows['train 10-class smallcnn (retrain for replace)']['kwh'] / repl:.1f}x less (paper: 18-24x and "
              "31-42x, against 200-epoch ResNet trainings). CodeCarbon reads no power meter on this virtual "
              "machine: its CPU energy is a model of load x TDP, so these ratios are close to time ratios."]
    cifar_step = rows.get("train CIFAR-10 ResNet-20, 20 batches of 128 (for extrapolation)")
    if cifar_step and cifar:
        epochs = cifar["reference_epochs"]
        full = cifar_step["kwh"] / 20 * 352 * epochs  # 352 batches of 128 per epoch
        dec = rows["decompose CIFAR-10 ResNet-20 (10 classes)"]["kwh"]
        lines += ["", f"CIFAR-10: training the reference ResNet-20 ({epochs} epochs, on this machine, extrapolated from 20 measured "
                  f"batches) takes about {1000 * full:.1f} Wh; decomposing it {1000 * dec:.3f} Wh, so reusing or "
                  f"replacing its modules costs {full / dec:.0f}x less energy than retraining it."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only-cifar", action="store_true",
                        help="rerun only the CIFAR-10 scenarios; mnist5k results come from results/reuse.json")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite BENCHMARKS.md's section from results/reuse.json (and the retrained pairs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.render_only:
        results = json.loads((RESULTS / "reuse.json").read_text())
        energy = Energy.__new__(Energy)  # rows only: nothing is measured again
        energy.rows = results["energy"]
        files = ["benchmarks/results/per_class.png", "benchmarks/results/pair_reuse.png"]
        write_section("reuse", render(results["mnist"], results["cifar"], energy, files), results)
        return
    energy = Energy()
    with tempfile.TemporaryDirectory() as d:
        if args.only_cifar:
            previous = json.loads((RESULTS / "reuse.json").read_text())
            energy.rows = {k: v for k, v in previous["energy"].items() if "CIFAR" not in k}
            train_set = load_data("mnist5k", "train")
            train("smallcnn", train_set, Path(d) / "parent.safetensors", RECIPE, progress=False)
            mnist = dict(previous["mnist"], modules=decompose(load_model(Path(d) / "parent.safetensors"), train_set))
        else:
            mnist = mnist_scenarios(Path(d), energy)
        cifar = cifar_scenarios(mnist["modules"], energy)
    files = plots(mnist, cifar)
    text = render(mnist, cifar, energy, files)
    print(text)
    results = {"mnist": {k: v for k, v in mnist.items() if k != "modules"}, "cifar": cifar, "energy": energy.rows}
    write_section("reuse", text, json.loads(json.dumps(results, default=str)))


if __name__ == "__main__":
    main()
