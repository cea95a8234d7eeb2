"""Benchmark of issue #5: the channels strategy's options against accuracy, size and latency.

    .venv/bin/python benchmarks/bench_channels.py [--only mnist|cifar] [--fresh]

For each configuration (``CONFIGS``: keep budget, residual streams, channel score, shared
trunk): every class decomposed with ``--strategy channels``; all modules composed (the paper's
vote and calibrated scores); per-module parameters and multiply-accumulates as fractions of the
parent, and the composed set's (each shared trunk counted once); wall-clock latency of the
model, one module and the composed set on the same batch in the same run; and 2-class reuse from
one parent against the parent restricted to the pair (CIFAR-10: the 6 pairs of 4 fixed classes).
Configurations already in results/channels.json are kept unless ``--fresh``. Writes the
"channels" section of BENCHMARKS.md and results/channels_tradeoff.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, machine, seconds, write_section  # noqa: E402

from cnnmod import TrainConfig, compose, decompose, load_data, load_model, train  # noqa: E402
from cnnmod.evaluate import evaluate_scores  # noqa: E402
from cnnmod.modules.extract import cost  # noqa: E402
from cnnmod.trace import GraphNetwork, trace_graph  # noqa: E402
from bench_reuse import CIFAR_FOUR, MNIST_FOUR, restricted  # noqa: E402  (the same pairs as issue #4's)

# label -> channels strategy options. "keep K": every prunable space, firing-rate scores (the
# first version); "inner": residual streams kept whole; "retain": the per-space budget that keeps
# this share of each space's score; "trunk": the shared trunk.
CONFIGS = {
    "keep 1.0": dict(keep=1.0), "keep 0.75": dict(keep=0.75), "keep 0.5": dict(keep=0.5),
    "keep 0.25": dict(keep=0.25),
    "inner, energy, keep 0.75": dict(keep=0.75, streams=False, score="energy"),
    "inner, energy, keep 0.5": dict(keep=0.5, streams=False, score="energy"),
    "inner, energy, keep 0.25": dict(keep=0.25, streams=False, score="energy"),
    "inner, energy, retain 0.9": dict(streams=False, score="energy", retain=0.9),
    "inner, energy, retain 0.8": dict(streams=False, score="energy", retain=0.8),
    "inner, energy, trunk 1.0, retain 0.9": dict(streams=False, score="energy", trunk=1.0, retain=0.9),
    "inner, energy, trunk 1.0, retain 0.95": dict(streams=False, score="energy", trunk=1.0, retain=0.95),
    "inner, energy, trunk 1.0, retain 0.95, multiple 8": dict(streams=False, score="energy", trunk=1.0, retain=0.95,
                                                              multiple=8),
    "inner, energy, trunk 1.0, retain 0.9, multiple 8": dict(streams=False, score="energy", trunk=1.0, retain=0.9,
                                                             multiple=8),
    "inner, energy, trunk 1.0, retain 0.85, multiple 8": dict(streams=False, score="energy", trunk=1.0, retain=0.85,
                                                              multiple=8),
    "inner, energy, trunk 1.0, keep 0.75": dict(keep=0.75, streams=False, score="energy", trunk=1.0),
    "inner, energy, trunk 0.67 (keep 0.75), keep 0.5": dict(keep=0.5, streams=False, score="energy", trunk=0.67,
                                                            trunk_keep=0.75),
    "inner, energy, trunk 0.67 (keep 1.0), keep 0.25": dict(keep=0.25, streams=False, score="energy", trunk=0.67,
                                                            trunk_keep=1.0),
}


def measure(name: str, model, train_set, test_set, four: list[str], done: dict) -> dict:
    model.eval()
    base = evaluate_scores(restricted(model, model.cnnmod_meta["classes"]), test_set, test_set.classes)
    shape = (model.input_spec.channels, *model.input_spec.size)
    model_macs = cost(GraphNetwork(trace_graph(model, shape), model.state_dict()), shape)["macs"]
    rows = []
    for label, options in CONFIGS.items():
        if label in done:
            rows.append(done[label])
            continue
        modules = decompose(model, train_set, strategy="channels", **options)
        by_name = {m.class_name: m for m in modules}
        row = {"config": label, "options": options, "decompose_seconds": modules[0].timing["total_seconds"]}
        for rule in ("vote", "calibrated"):
            row[f"top1_{rule}"] = evaluate_scores(compose(modules, rule=rule).score_images, test_set,
                                                  test_set.classes)["top1"]
        for key, meta_key in (("params_fraction", "params_fraction"), ("flops_fraction", "macs_fraction")):
            row[key] = sum(m.meta[meta_key] for m in modules) / len(modules)  # stored rows keep their key
        row["composed_macs_fraction"] = compose(modules).cost()["macs"] / model_macs
        row.update(latency(model, modules, test_set.images[:256]))
        pairs = []
        for a, b in itertools.combinations(four, 2):
            pair, clf = test_set.only([a, b]), compose([by_name[a], by_name[b]], rule="vote")
            pairs.append({"pair": [a, b], "macs_fraction": clf.cost()["macs"] / model_macs,
                          "modules": evaluate_scores(clf.score_images, pair, [a, b])["top1"],
                          "parent": evaluate_scores(restricted(model, [a, b]), pair, [a, b])["top1"]})
        row["pairs"] = pairs
        row["pair_gap_mean"] = sum(p["parent"] - p["modules"] for p in pairs) / len(pairs)
        row["pair_gap_max"] = max(p["parent"] - p["modules"] for p in pairs)
        row["pair_macs_fraction"] = sum(p["macs_fraction"] for p in pairs) / len(pairs)
        print(name, {k: v for k, v in row.items() if k != "pairs"}, flush=True)
        rows.append(row)
    return {"name": name, "model_top1": base["top1"], "rows": rows}


def latency(model, modules, batch: torch.Tensor, repeat: int = 7) -> dict:
    """Model, one module and all modules composed on one batch, timed alternately in one run
    (machine noise hits each alike), median of ``repeat``."""
    clf, one = compose(modules, rule="vote"), modules[0]
    times = {"model": [], "module": [], "composed": []}
    with torch.no_grad():
        for _ in range(repeat):
            times["model"].append(seconds(lambda: model(model.input_spec.prepare(batch))))
            times["module"].append(seconds(lambda: one.network(one.input_spec.prepare(batch))))
            times["composed"].append(seconds(lambda: clf.score_images(batch)))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"module_over_model": med["module"] / med["model"], "composed_over_model": med["composed"] / med["model"],
            "model_ms": 1000 * med["model"]}


def block_sizes(repeat: int = 9) -> list[dict]:
    """A 3x3 convolution (batch 256, C in and out) at each ResNet-20 stage's width and size, timed
    with fewer channels, relative to the full width: why ``--multiple 8`` exists."""
    import torch.nn.functional as F

    rows = []
    with torch.no_grad():
        for size, full in ((32, 16), (16, 32), (8, 64)):
            widths = sorted({full, full - 1, full - 3, full - 5, full - 8, full - 9, full // 2}, reverse=True)
            times = {}
            for c in widths:
                x, w = torch.randn(256, c, size, size), torch.randn(c, c, 3, 3)
                F.conv2d(x, w, None, 1, 1)  # warm-up
                times[c] = sorted(seconds(lambda: F.conv2d(x, w, None, 1, 1)) for _ in range(repeat))[repeat // 2]
            rows.append({"size": size, "full": full, "relative": {c: times[c] / times[full] for c in widths},
                         "macs": {c: (c / full) ** 2 for c in widths}})
    return rows


def mnist_model():
    train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    with tempfile.TemporaryDirectory() as tmp:
        train("smallcnn", train_set, Path(tmp) / "m.safetensors", TrainConfig(epochs=5, lr=0.05), progress=False)
        return load_model(Path(tmp) / "m.safetensors"), train_set, test_set


def cifar_model():
    return (load_model(CHECKPOINTS / "cifar10_resnet20.safetensors"), load_data(str(CIFAR_TAR), "train"),
            load_data(str(CIFAR_TAR), "val"))


def _composed_macs(r: dict) -> float:
    return r.get("composed_macs_fraction", 10 * r["flops_fraction"])  # first-version rows shared nothing


def plot(results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = [("multiply-accumulates per module, fraction of the parent", lambda r: r["flops_fraction"]),
              ("all 10 modules composed: multiply-accumulates / model (log)", _composed_macs)]
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    families = {"all spaces, rate score": ("o-", lambda c: c.startswith("keep")),
                "streams whole, energy score": ("s-", lambda c: c.startswith("inner") and "trunk" not in c),
                "shared trunk": ("^", lambda c: "trunk" in c)}
    for row, (xlabel, x) in enumerate(axes_x):
        for ax, res in zip(axes[row], results):
            for label, (marker, member) in families.items():
                rows = sorted((r for r in res["rows"] if member(r["config"])), key=x)
                if not rows:
                    continue
                style = marker if row == 0 else marker.rstrip("-")  # composed costs do not order a family
                ax.plot([x(r) for r in rows], [100 * r["top1_vote"] for r in rows], style, label=label)
                for r in rows:
                    ax.annotate(r["config"].replace("inner, energy, ", ""), (x(r), 100 * r["top1_vote"]),
                                fontsize=6, xytext=(3, -9), textcoords="offset points")
            ax.axhline(100 * res["model_top1"], linestyle=":", color="grey", label="model")
            if row == 1:
                ax.set_xscale("log")
                ax.axvline(1.0, linestyle="--", color="grey", linewidth=0.8)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("all modules composed (vote), top-1 %", fontsize=8)
            ax.set_title(res["name"], fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("channels strategy: size and composed cost vs accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "channels_tradeoff.png", dpi=100)
    return "benchmarks/results/channels_tradeoff.png"


def render(results: list[dict], png: str, blocks: list[dict]) -> str:
    lines = ["## Small modules (issue #5): the channels strategy", "",
             f"Command: `.venv/bin/python benchmarks/bench_channels.py` (machine: {machine()}). "
             "`--strategy channels`: each module keeps a share of each prunable channel space, removed channels "
             "are replaced by their mean, the module is extracted into a physically smaller network, and the "
             "layers reading removed channels are re-fitted in closed form (ridge least squares on 256 sample "
             "images, no gradient training). Configurations: `keep K` prunes every space, residual streams "
             "included, ranked by firing rate (`--keep K`); `inner, energy` keeps residual streams whole and ranks "
             "by the energy score (`--keep-streams --score energy`); `retain R` keeps per space the fewest best "
             "channels holding the share R of the space's score (`--retain R`); `trunk T (keep k)` chooses the spaces in "
             "the first share T of the MACs alike for every class (`--trunk T --trunk-keep k`), so that "
             "`compose` runs them once; `multiple 8` rounds each space's kept count to a multiple of 8 "
             "(`--multiple 8`). Every module's BatchNorms are folded into its convolutions. MACs: per module, and of the composition with each trunk counted once "
             "(`ComposedClassifier.cost()`). Latency: one batch of 256 validation images, the model, one module "
             "and all 10 modules composed timed alternately in one run, median of 7, the model run as given "
             "(its BatchNorms not folded). 2-class reuse: the pairs of 4 fixed classes, vote, against the parent restricted "
             "to the pair; its MACs count the pair's trunk once.", ""]
    for res in results:
        lines += [f"### {res['name']}: model top-1 {100 * res['model_top1']:.2f}", "",
                  "| configuration | composed top-1, vote | calibrated | params / parent | MACs / parent "
                  "| 10 composed: MACs / model | one module: latency / model | 10 composed: latency / model "
                  "| 2-class reuse: below parent, mean (worst) | 2-class: MACs / parent |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            composed_macs = f"{_composed_macs(r):.2f}x"
            pair_macs = f"{r['pair_macs_fraction']:.2f}" if "pair_macs_fraction" in r else f"{2 * r['flops_fraction']:.2f}"
            lines.append(f"| {r['config']} | {100 * r['top1_vote']:.2f} | {100 * r['top1_calibrated']:.2f} | "
                         f"{r['params_fraction']:.3f} | {r['flops_fraction']:.3f} | {composed_macs} | "
                         f"{r['module_over_model']:.2f}x | {r['composed_over_model']:.2f}x | "
                         f"{100 * r['pair_gap_mean']:.2f} ({100 * r['pair_gap_max']:.2f}) points | {pair_macs} |")
        close = [r for r in res["rows"] if res["model_top1"] - r["top1_vote"] <= 0.015 and r["flops_fraction"] < 0.99]
        if close:
            best = min(close, key=_composed_macs)
            lines += ["", f"Cheapest composition within 1.5 points of the model: `{best['config']}`, "
                      f"{100 * best['top1_vote']:.2f} top-1, {_composed_macs(best):.2f}x the model's MACs, "
                      f"{best['composed_over_model']:.2f}x its latency; each module alone holds "
                      f"{100 * best['params_fraction']:.0f}% of the parameters."]
            fast = min(close, key=lambda r: r["composed_over_model"])
            lines += ["", f"Fastest composition within 1.5 points of the model: `{fast['config']}`, "
                      f"{100 * fast['top1_vote']:.2f} top-1, {fast['composed_over_model']:.2f}x the model's latency, "
                      f"{_composed_macs(fast):.2f}x its MACs."]
        lines.append("")
    lines += [f"![size vs accuracy]({png})", "",
              "Why `multiple 8`: a 3x3 convolution of C channels in and out (batch 256) with fewer channels, "
              "timed relative to the full width in the same run (median of 9); MACs shrink with the square of "
              "the width, time in steps of 8 channels (oneDNN's block on this AVX2 CPU).", "",
              "| stage (size, full width) | " + " | ".join(f"width -{d}" for d in (1, 3, 5, 8, 9)) + " | half width |",
              "|---|---|---|---|---|---|---|"]
    for b in blocks:
        rel = {int(c): v for c, v in b["relative"].items()}
        cells = [rel[b["full"] - d] for d in (1, 3, 5, 8, 9)] + [rel[b["full"] // 2]]
        lines.append(f"| {b['size']}x{b['size']}, {b['full']} | " + " | ".join(f"{v:.2f}x" for v in cells) + " |")
    lines += ["",
              "Targets of issue #5 (ResNet-20): modules <= 25% of parameters and FLOPs with the composed set within "
              "1.5 points of the model and no slower than it; 2-class reuse within 1 point of the parent at <= 40% "
              "FLOPs. Where a row misses them, it is reported as measured."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["mnist", "cifar"], default=None)
    parser.add_argument("--fresh", action="store_true", help="measure every configuration again")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latencies (on a quiet machine) into the last results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    previous = RESULTS / "channels.json"
    kept = json.loads(previous.read_text())["results"] if previous.exists() else []
    for res in kept:  # results of the first version were keyed by keep alone
        for row in res["rows"]:
            row.setdefault("config", f"keep {row.get('keep')}")
    wanted = [("mnist", mnist_model), ("cifar", cifar_model)]
    wanted = [(k, load) for k, load in wanted if args.only in (None, k) and (k == "mnist" or CIFAR_TAR.exists())]
    results = {r["name"]: r for r in kept}
    blocks = block_sizes()
    for key, load in wanted:
        model, train_set, test_set = load()
        old = next((r for r in kept if r["name"].lower().startswith(key)), {"rows": []})
        if args.latency_only:  # latency depends on sizes only: quick decompositions, same options
            for row in old["rows"]:
                modules = decompose(model, train_set, strategy="channels", positives=100, calibration=0,
                                    **CONFIGS[row["config"]])
                row.update(latency(model, modules, test_set.images[:256]), latency_run="--latency-only")
                print(row["config"], row["composed_over_model"], flush=True)
            results[old["name"]] = old
            continue
        done = {} if args.fresh else {r["config"]: r for r in old["rows"]}
        name = "mnist5k smallcnn (5 epochs, trained here)" if key == "mnist" else "CIFAR-10 ResNet-20 (reference)"
        results[name] = measure(name, model, train_set, test_set, MNIST_FOUR if key == "mnist" else CIFAR_FOUR, done)
        ordered = sorted(results.values(), key=lambda r: not r["name"].startswith("mnist"))
        write_section("channels", render(ordered, plot(ordered), blocks), {"results": ordered, "blocks": blocks})
    ordered = sorted(results.values(), key=lambda r: not r["name"].startswith("mnist"))
    write_section("channels", render(ordered, plot(ordered), blocks), {"results": ordered, "blocks": blocks})


if __name__ == "__main__":
    main()
