"""Benchmark of issue #15: torchvision/timm architectures trained briefly on CIFAR-10, decomposed.

    .venv/bin/python benchmarks/bench_zoo.py            # train what is not cached yet, then decompose
    .venv/bin/python benchmarks/bench_zoo.py --train    # only the training stage (run it in the background)

Each architecture is trained here from random weights for a CPU budget (the first 1,000 training
images of each class, 32x32, SGD with a cosine schedule, crop and flip), and its weights are
cached in benchmarks/.cache/zoo/ (not committed). Then, on the validation split (the last 10% of
each class by file name, 5,000 images): model top-1; the paper strategy's 10 modules composed
(vote); the channels strategy with a shared trunk (``--trunk 1.0 --multiple 8``, ``--retain`` 0.9
and 0.97, and 0.97 with ``--score energy``) composed, with its multiply-accumulates per image against the model's; and the decomposition time
of each strategy against one plain inference pass over the same images, in the same run.
Decomposition reads the whole training split (45,000 images: the statistics sample, and images
held back from it for calibration and ``--max-loss``'s choice). The channels strategy runs at its
default, ``--max-loss 1.0`` (issue #25), with rate and with energy scores.
Targets: paper within 0.5 points of the model (issue #15); channels within its budget, 1.0 point,
on the validation split (issue #25).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import CIFAR_TAR, ROOT, machine, train_briefly, write_section  # noqa: E402
from zoo import create  # noqa: E402  (random-weight models and the torchvision import of the tests)

from cnnmod import compose, decompose, load_data  # noqa: E402
from cnnmod.data.inputspec import measure_spec  # noqa: E402
from cnnmod.evaluate import evaluate_model, evaluate_scores  # noqa: E402
from cnnmod.modules.extract import cost  # noqa: E402
from cnnmod.statistics import plain_pass, select_sample  # noqa: E402
from cnnmod.trace import GraphNetwork, trace_graph  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "zoo"
ARCHS = [("torchvision", "resnet18"), ("torchvision", "mobilenet_v2"), ("torchvision", "mobilenet_v3_small"),
         ("torchvision", "efficientnet_b0"), ("torchvision", "regnet_y_400mf"), ("torchvision", "densenet121"),
         ("torchvision", "googlenet"), ("torchvision", "mnasnet0_5"), ("timm", "resnet18d"),
         ("torchvision", "shufflenet_v2_x1_0")]
PER_CLASS, EPOCHS, BATCH, LR = 1000, 6, 128, 0.05
# the channels strategy with a shared trunk at its default, --max-loss 1.0 (label, options); issue #25
CHANNELS = [("max-loss 1", dict(trunk=1.0, multiple=8)),
            ("max-loss 1 energy", dict(trunk=1.0, multiple=8, score="energy"))]
MAX_LOSS = 1.0


def first_per_class(data, n: int):
    keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:n] for c in range(len(data.classes))])
    return data.subset(keep.sort().values)


def train_one(library: str, name: str, data, spec) -> dict:
    """Train from random weights (seeded) and cache the weights; returns the recipe and its time."""
    model = create(library, name, num_classes=10).train()
    for m in model.modules():  # MNASNet's own 0.0003 (MobileNetV3's 0.01) would leave the running
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics near their start after a 6-epoch run
            m.momentum = 0.1
    seconds = train_briefly(model, data, spec, epochs=EPOCHS, batch=BATCH, lr=LR)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, CACHE / f"{library}_{name}.safetensors")
    return {"seconds": seconds, "epochs": EPOCHS, "images": len(data)}


def trained(library: str, name: str):
    model = create(library, name, num_classes=10)
    state = OrderedDict(load_file(CACHE / f"{library}_{name}.safetensors"))
    state._metadata = model.state_dict()._metadata  # layer versions (MNASNet checks them), not kept in safetensors
    model.load_state_dict(state)
    return model.eval()


def measure(library: str, name: str, train_set, val, spec) -> dict:
    """``train_set``: the images decomposition reads (not only those the model was trained on)."""
    model = trained(library, name)
    classes = train_set.classes
    row = {"arch": f"{library}:{name}", "model_top1": evaluate_model(model, val, spec, classes)["top1"]}
    sample = select_sample(train_set.labels, 10)
    start = time.perf_counter()
    plain_pass(model, spec, train_set, sample)
    row["inference_seconds"] = time.perf_counter() - start
    shape = (3, 32, 32)
    model_macs = cost(GraphNetwork(trace_graph(model, shape), model.state_dict()), shape)["macs"]
    for strategy, options in [("paper", {})] + [(f"channels {label}", o) for label, o in CHANNELS]:
        start = time.perf_counter()
        try:
            modules = decompose(model, train_set, input_spec=spec, classes=classes, strategy=strategy.split()[0],
                                **options)
        except Exception as e:  # a row that says why, not a crashed benchmark
            row[f"{strategy}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        row[f"{strategy}_seconds"] = time.perf_counter() - start
        clf = compose(modules, rule="vote")
        row[f"{strategy}_top1"] = evaluate_scores(clf.score_images, val, clf.classes)["top1"]
        row[f"{strategy}_macs_fraction"] = clf.cost()["macs"] / model_macs
        if strategy == "paper":
            row["paper_share_kept"] = sum(m.meta["share_kept"] for m in modules) / len(modules)
        else:  # what --max-loss chose, and what it measured on the held-back images
            row[f"{strategy}_max_loss"] = modules[0].meta["max_loss"]
        print(row, flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="only train (and cache) what is missing")
    parser.add_argument("--only", default=None, help="comma-separated architecture names")
    parser.add_argument("--render", action="store_true", help="only rewrite BENCHMARKS.md from the measured rows")
    args = parser.parse_args(argv)
    if args.render:
        return _write()
    torch.manual_seed(0)
    archs = [a for a in ARCHS if args.only is None or a[1] in args.only.split(",")]
    train_all = load_data(str(CIFAR_TAR), "train")
    train_set, val = first_per_class(train_all, PER_CLASS), load_data(str(CIFAR_TAR), "val")
    spec = measure_spec(train_set.images)
    for library, name in archs:
        if not (CACHE / f"{library}_{name}.safetensors").exists():
            recipe = train_one(library, name, train_set, spec)
            (CACHE / f"{library}_{name}.recipe.json").write_text(json.dumps(recipe))
            print(f"trained {library}:{name}: {recipe}", flush=True)
    if args.train:
        return 0
    for library, name in archs:  # each row cached, so that architectures can be measured in several runs
        row = measure(library, name, train_all, val, spec)
        (CACHE / f"{library}_{name}.json").write_text(json.dumps(dict(row, machine=machine()), sort_keys=True))
    return _write()


def _write() -> int:
    rows = [json.loads((CACHE / f"{lib}_{n}.json").read_text()) for lib, n in ARCHS
            if (CACHE / f"{lib}_{n}.json").exists()]
    write_section("zoo", render(rows), {"rows": rows, "per_class": PER_CLASS, "epochs": EPOCHS, "channels": CHANNELS})
    return 0


def _targets(r: dict, strategies: list[str]) -> str:
    """Paper within 0.5 points (issue #15); each channels column within its --max-loss on validation (issue #25)."""
    paper = "paper met" if "paper_error" not in r and r["model_top1"] - r["paper_top1"] <= 0.005 else "paper MISSED"
    within = [f"{'met' if f'{s}_error' not in r and 100 * (r['model_top1'] - r[f'{s}_top1']) <= MAX_LOSS else 'MISSED'}"
              f" ({s.removeprefix('channels max-loss 1').strip() or 'rate'})" for s in strategies[1:]]
    return f"{paper}; within 1 point: {', '.join(within)}"


# What the table cannot say, written after reading it (the numbers above are the run's).
NOTES = {
    "torchvision:regnet_y_400mf": "`--max-loss` chose retain 0.8 (rate) and 0.95 (energy) on losses of 0.8 and "
                                  "-0.4 points on the 500 held-back images; on the 5,000 validation images they "
                                  "lose 1.86 and 2.04. The held-back estimate is a paired difference on 500 images: "
                                  "its standard error is about sqrt(q / 500), 1.4 points where the modules and the "
                                  "model disagree on q = 10% of the images (`decompose` now prints it for each "
                                  "run), so a 1-point budget is kept on average, not on every model: missed here.",
    "torchvision:mobilenet_v3_small": "with rate scores no retain below every channel stayed within the budget "
                                      "(retain 0.999 lost 1.4 points held back), so its modules keep every channel "
                                      "(1.00x); energy scores keep it within budget at 0.96x.",
    "torchvision:mobilenet_v2": "the search met a non-monotone loss (energy: retain 0.95 lost 1.2 points held back, "
                                "0.99 lost 2.0): the bisection's assumption that more channels never lose more "
                                "holds only up to the estimate's noise.",
}


def _cells(r: dict, s: str) -> list[str]:
    """top-1, points against the model, MACs against the model, time against one inference pass; for
    --max-loss, the retain it chose."""
    if f"{s}_error" in r:
        return ["refused", "-", "-", "-"]
    cells = [f"{r[f'{s}_top1']:.4f}", f"{100 * (r[f'{s}_top1'] - r['model_top1']):+.2f}",
             f"{r[f'{s}_macs_fraction']:.2f}x", f"{r[f'{s}_seconds'] / r['inference_seconds']:.1f}x"]
    if f"{s}_max_loss" in r:
        chosen = r[f"{s}_max_loss"]["retain"]
        cells.append("all channels" if chosen >= 1 else f"retain {chosen}")
    return cells


TIMING_NOTE = ("- Not re-measured this time (CPU budget of the session): densenet121, googlenet, mnasnet0_5, "
               "efficientnet_b0 and timm's resnet18d; their earlier rows (fixed retain shares) are in git history. "
               "The time column of every row but ShuffleNet's is not a measure: those four ran while another "
               "process trained a model on the same 2 cores (ResNet-18's plain pass: 39.7 s, against 11.2 s alone); "
               "BENCHMARKS \"One pass\" times these architectures' decompositions alone. The accuracy and MACs "
               "columns are not affected.")


def render(rows: list[dict]) -> str:
    strategies = ["paper"] + [f"channels {label}" for label, _ in CHANNELS]
    lines = [
        "## Model zoo (issue #15): torchvision/timm architectures trained briefly, decomposed",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_zoo.py` ({rows[0]['machine'] if rows else machine()}; one "
        "thread per run). Each architecture trained here from "
        f"random weights on the first {PER_CLASS:,} CIFAR-10 training images of each class (32x32, {EPOCHS} epochs, "
        "SGD one-cycle, crop and flip, BatchNorm momentum 0.1): a CPU budget, so the models are far from their papers' accuracy; what "
        "matters is the modules against their own model. Validation: the last 10% of each class (5,000 images). "
        "Decomposition reads the whole training split (45,000 images; the statistics sample, and 50 images per "
        "class held back from it). Channels: `--trunk 1.0 --multiple 8` at the default `--max-loss 1.0` (the "
        "least `--retain` whose composition loses at most 1 point on the held-back images), with rate and "
        "with energy scores (`--score energy`). Each cell: composed top-1 (vote) on the validation split, "
        "points against the model, composed MACs per image against the model's, decomposition time (statistics "
        "pass, modules (channels: the `--max-loss` search's builds included), calibration) against one plain "
        "inference pass over the statistics sample, same run; for channels, the `--retain` chosen. "
        "Paper-strategy modules are the whole model with masks, so 10 of them cost about 10x its MACs.",
        "",
        "| architecture | model top-1 | " + " | ".join(strategies) + " | targets |",
        "|---|---|" + "---|" * len(strategies) + "---|",
    ]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['model_top1']:.4f} | "
                     + " | ".join(" / ".join(_cells(r, s)) for s in strategies) + f" | {_targets(r, strategies)} |")
    lines.append("")
    for arch, note in NOTES.items():
        if any(r["arch"] == arch for r in rows):
            lines.append(f"- {arch}: {note}")
    lines.append(TIMING_NOTE)
    for r in rows:
        for s in strategies:
            if f"{s}_error" in r:
                lines.append(f"- {r['arch']}, {s}: refused: {r[f'{s}_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
