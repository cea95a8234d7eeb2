"""Benchmark of the channels strategy's re-fitting sample and of reuse-specific decomposition.

    .venv/bin/python benchmarks/bench_refit.py [--parts speed,ten,pairs,probe]

On the reference CIFAR-10 ResNet-20, four measurements, each against a baseline in the same run:

- speed: building the 10 modules of a ``--trunk 1.0`` configuration with the shared re-fits
  computed once (what ``decompose`` does) against each module re-fitting everything itself; the
  two must give the same modules, bit for bit.
- ten: the 10 modules composed, with layers re-fitted on 256, 1,024 or 2,048 sample images
  (``--sample-images``).
- pairs: a 2-class reuse decomposed for its pair (``--only a,b``: channels scored, trunk chosen
  and layers re-fitted on the pair's images alone) at <= 40% of the parent's MACs, against the
  parent restricted to the pair, for the 6 pairs of issue #4's 4 classes.
- probe: where a pair's loss lies. A logistic regression fitted on 1,000 labelled training images
  per class of the pair, on the features the head reads, once on the parent's and once on the
  pruned pair network's (1,024 re-fitting images): the best that any new head, calibration or
  vote rule could do with those features. A diagnostic, not a method (it trains a head).

Writes the "refit" section of BENCHMARKS.md; parts not run keep their results of an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, write_section  # noqa: E402

from cnnmod import build, compose, decompose, load_data, load_model, observe  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.modules import strategies  # noqa: E402
from cnnmod.modules.extract import cost  # noqa: E402
from cnnmod.trace import GraphNetwork, trace_graph  # noqa: E402
from bench_channels import CONFIGS  # noqa: E402
from bench_reuse import CIFAR_FOUR, restricted  # noqa: E402

PARTS = ["speed", "ten", "pairs", "probe"]
TEN = ["inner, energy, trunk 1.0, retain 0.9, multiple 8", "inner, energy, trunk 1.0, retain 0.85, multiple 8"]
PAIR = dict(keep=0.625, score="energy", trunk=1.0, multiple=8)  # 8/16, 24/32, 40/64 channels: 0.395 of the MACs
PAIR_LABEL = "energy, trunk 1.0, keep 0.625, multiple 8"


def parent_of(model, data, options: dict):
    """The parent (statistics, sample, shared re-fits) the channels strategy builds its modules from."""
    obs = observe(model, data)
    build(obs, "channels", **options)
    return obs.parent


def speed(model, train_set) -> dict:
    label = TEN[0]
    parent = parent_of(model, train_set, CONFIGS[label])
    build = strategies.channels_strategy
    shared = dataclasses.replace(parent, _refits={})
    start = time.perf_counter()
    once = [build(shared, c, **CONFIGS[label])[0] for c in range(10)]
    t_once = time.perf_counter() - start
    start = time.perf_counter()
    alone = [build(dataclasses.replace(parent, _refits={}), c, **CONFIGS[label])[0] for c in range(10)]
    t_alone = time.perf_counter() - start
    same = all(torch.equal(w, b.weight(k)) for a, b in zip(once, alone) for k, w in a.weights().items())  # maps too
    return {"config": label, "seconds_shared": t_once, "seconds_alone": t_alone, "identical": same}


def ten(model, train_set, val) -> list[dict]:
    rows = []
    base = evaluate_scores(lambda x: model(model.input_spec.prepare(x)), val, val.classes)["top1"]
    for label in TEN:
        for n in (256, 1024, 2048):
            start = time.perf_counter()
            modules = decompose(model, train_set, strategy="channels", calibration=0, sample_images=n,
                                **CONFIGS[label])
            seconds = time.perf_counter() - start
            clf = compose(modules, rule="vote")
            top1 = evaluate_scores(clf.score_images, val, val.classes)["top1"]
            rows.append({"config": label, "images": n, "top1": 100 * top1, "model": 100 * base,
                         "macs": modules[0].meta["macs_fraction"], "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def pairs(model, train_set, val) -> list[dict]:
    rows, full = [], cost(GraphNetwork(trace_graph(model, (3, 32, 32)), model.state_dict()), (3, 32, 32))["macs"]
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        pair = val.only([a, b])
        parent = evaluate_scores(restricted(model, [a, b]), pair, [a, b])["top1"]
        for n in (256, 1024, 2048):
            start = time.perf_counter()
            modules = decompose(model, train_set, strategy="channels", calibration=0, only=[a, b], sample_images=n,
                                **PAIR)
            seconds = time.perf_counter() - start
            clf = compose(modules, rule="vote")
            top1 = evaluate_scores(clf.score_images, pair, [m.class_name for m in modules])["top1"]
            rows.append({"pair": f"{a}/{b}", "images": n, "parent": 100 * parent, "top1": 100 * top1,
                         "macs": clf.cost()["macs"] / full, "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def head_inputs(network, x: torch.Tensor) -> torch.Tensor:
    """What the head (the graph's output layer) reads, for a prepared batch."""
    seen = {}
    head = network.graph.output

    def grab(node, xs):
        if node.name == head:
            seen["x"] = xs[0].flatten(1)
    with torch.no_grad():
        network.run_all(x, keep=False, before=grab)
    return seen["x"]


def probe(model, train_set, val) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, full = [], GraphNetwork(trace_graph(model, (3, 32, 32)), model.state_dict())
    gen = torch.Generator().manual_seed(0)
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        modules = decompose(model, train_set, strategy="channels", calibration=0, only=[a, b], sample_images=1024,
                            **PAIR)
        fit, test = train_set.only([a, b]), val.only([a, b])
        pick = torch.cat([torch.nonzero(fit.labels == k).flatten()[torch.randperm(int((fit.labels == k).sum()),
                                                                                   generator=gen)[:1000]]
                          for k in (0, 1)])
        row = {"pair": f"{a}/{b}",
               "parent": 100 * evaluate_scores(restricted(model, [a, b]), test, [a, b])["top1"],
               "vote": 100 * evaluate_scores(compose(modules, rule="vote").score_images, test,
                                             [m.class_name for m in modules])["top1"]}
        for name, net in (("probe_parent", full), ("probe_pruned", modules[0].network)):
            feats = lambda images: torch.cat([head_inputs(net, model.input_spec.prepare(images[i:i + 500]))
                                              for i in range(0, len(images), 500)]).numpy()
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            clf.fit(feats(fit.images[pick]), fit.labels[pick].numpy())
            row[name] = 100 * float((clf.predict(feats(test.images)) == test.labels.numpy()).mean())
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="speed,ten,pairs,probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors")
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    parts = args.parts.split(",")
    earlier = RESULTS / "refit.json"
    result = json.loads(earlier.read_text()) if earlier.exists() else {}
    result["parts"] = sorted(set(result.get("parts", [])) | set(parts), key=PARTS.index)
    if "speed" in parts:
        result["speed"] = speed(model, train_set)
        print(result["speed"], flush=True)
    if "ten" in parts:
        result["ten"] = ten(model, train_set, val)
    if "pairs" in parts:
        result["pairs"] = pairs(model, train_set, val)
    if "probe" in parts:
        result["probe"] = probe(model, train_set, val)
    write_section("refit", render(result), result)


def render(r: dict) -> str:
    lines = ["### Re-fitting sample and reuse-specific decomposition (CIFAR-10 ResNet-20)", "",
             f"Command: `.venv/bin/python benchmarks/bench_refit.py --parts {','.join(r['parts'])}` "
             f"(machine: {machine()}). No gradient training: the re-fits are ridge least squares, one solve per "
             "layer that reads removed channels.", ""]
    if "speed" in r:
        s = r["speed"]
        lines += [f"Shared re-fits (`{s['config']}`): the 10 modules built in {s['seconds_shared']:.1f} s with the "
                  f"trunk's re-fits computed once, against {s['seconds_alone']:.1f} s with every module re-fitting "
                  f"every layer itself ({s['seconds_alone'] / s['seconds_shared']:.1f}x); the modules are "
                  f"{'identical, bit for bit' if s['identical'] else 'NOT identical'}. Statistics pass excluded.", ""]
    if "ten" in r:
        lines += [f"All 10 modules composed (vote), model top-1 {r['ten'][0]['model']:.2f}, by re-fitting sample "
                  "(`--sample-images`); seconds: the whole decomposition, statistics pass included.", "",
                  "| configuration | sample images | composed top-1 | below the model | MACs / parent | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['config']} | {x['images']} | {x['top1']:.2f} | {x['model'] - x['top1']:.2f} | "
                  f"{x['macs']:.3f} | {x['seconds']:.0f} |" for x in r["ten"]]
        lines.append("")
    if "pairs" in r:
        lines += [f"2-class reuse decomposed for its pair (`--only a,b`, `{PAIR_LABEL}`), vote, against the parent "
                  "restricted to the pair (validation images of the pair):", "",
                  "| pair | sample images | parent restricted | composed pair | below the parent | MACs / parent |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['pair']} | {x['images']} | {x['parent']:.2f} | {x['top1']:.2f} | "
                  f"{x['parent'] - x['top1']:.2f} | {x['macs']:.3f} |" for x in r["pairs"]]
        for n in sorted({x["images"] for x in r["pairs"]}):
            gaps = [x["parent"] - x["top1"] for x in r["pairs"] if x["images"] == n]
            within = sum(g <= 1.0 for g in gaps)
            lines.append(f"\n{n} sample images: {sum(gaps) / len(gaps):.2f} points below the parent on average, worst "
                         f"{max(gaps):.2f}; {within} of {len(gaps)} pairs within 1 point.")
    if "probe" in r:
        lines += ["", f"Where a pair's loss lies (`{PAIR_LABEL}`, 1,024 re-fitting images): a logistic regression "
                  "fitted on 1,000 labelled training images per class on the features the head reads, of the "
                  "parent and of the pruned pair network; the best any new head, calibration or vote rule could do "
                  "with those features (a diagnostic that trains a head, not a method we ship).", "",
                  "| pair | parent restricted | pruned, vote | probe on the parent's features | "
                  "probe on the pruned features |", "|---|---|---|---|---|"]
        lines += [f"| {x['pair']} | {x['parent']:.2f} | {x['vote']:.2f} | {x['probe_parent']:.2f} | "
                  f"{x['probe_pruned']:.2f} |" for x in r["probe"]]
        mean = lambda key, base: sum(x[base] - x[key] for x in r["probe"]) / len(r["probe"])  # noqa: E731
        lines += ["", f"On average the probe on the pruned features is {mean('probe_pruned', 'probe_parent'):.2f} "
                  f"points below the probe on the parent's, and the shipped vote {mean('vote', 'parent'):.2f} below "
                  f"the parent; the head trained on the pruned features differs from the vote by "
                  f"{-mean('probe_pruned', 'vote'):+.2f} points. A new head cannot win back what the pair loses: it "
                  "is lost in the pruned convolutions' features."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
