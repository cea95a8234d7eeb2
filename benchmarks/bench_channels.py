"""Benchmark of issue #5: the channels strategy, its keep budget against accuracy, size and latency.

    .venv/bin/python benchmarks/bench_channels.py [--only mnist|cifar]

For each keep budget: every class decomposed with ``--strategy channels --keep K``; all modules
composed (the paper's vote and calibrated scores); per-module parameters and multiply-accumulates
as fractions of the parent; wall-clock latency of the model, one module and the composed set on
the same batch in the same run; and 2-class reuse from one parent against the parent restricted
to the pair (CIFAR-10: the 6 pairs of 4 fixed classes). Writes the "channels" section of
BENCHMARKS.md and results/channels_tradeoff.png.
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
from bench_reuse import CIFAR_FOUR, MNIST_FOUR, restricted  # noqa: E402  (the same pairs as issue #4's)

KEEPS = (1.0, 0.75, 0.5, 0.25)


def measure(name: str, model, train_set, test_set, four: list[str]) -> dict:
    model.eval()
    batch = test_set.images[:256]
    with torch.no_grad():
        model_s = seconds(lambda: model(model.input_spec.prepare(batch)), repeat=5)
    base = evaluate_scores(restricted(model, model.cnnmod_meta["classes"]), test_set, test_set.classes)
    rows = []
    for keep in KEEPS:
        modules = decompose(model, train_set, strategy="channels", keep=keep)
        by_name = {m.class_name: m for m in modules}
        row = {"keep": keep, "decompose_seconds": modules[0].timing["total_seconds"]}
        for rule in ("vote", "calibrated"):
            row[f"top1_{rule}"] = evaluate_scores(compose(modules, rule=rule).score_images, test_set,
                                                  test_set.classes)["top1"]
        for key in ("params_fraction", "flops_fraction"):
            row[key] = sum(m.meta[key] for m in modules) / len(modules)
        clf, one = compose(modules), modules[0]
        with torch.no_grad():
            row["module_over_model"] = seconds(lambda: one.network(one.input_spec.prepare(batch)), repeat=5) / model_s
            row["composed_over_model"] = seconds(lambda: clf.score_images(batch), repeat=5) / model_s
        pairs = []
        for a, b in itertools.combinations(four, 2):
            pair = test_set.only([a, b])
            pairs.append({"pair": [a, b],
                          "modules": evaluate_scores(compose([by_name[a], by_name[b]], rule="vote").score_images,
                                                     pair, [a, b])["top1"],
                          "parent": evaluate_scores(restricted(model, [a, b]), pair, [a, b])["top1"]})
        row["pairs"] = pairs
        row["pair_gap_mean"] = sum(p["parent"] - p["modules"] for p in pairs) / len(pairs)
        row["pair_gap_max"] = max(p["parent"] - p["modules"] for p in pairs)
        print(name, {k: v for k, v in row.items() if k != "pairs"}, flush=True)
        rows.append(row)
    return {"name": name, "model_top1": base["top1"], "rows": rows}


def latencies(model, train_set, test_set, repeat: int = 7) -> dict[float, dict]:
    """Model, one module and all modules composed on one batch, interleaved in one run.

    Latency depends on the modules' sizes, not on how well they were chosen, so the modules here
    come from a quick decomposition (100 images per class); timings alternate between the three
    so that machine noise hits each alike.
    """
    model.eval()
    batch = test_set.images[:256]
    out = {}
    for keep in KEEPS:
        modules = decompose(model, train_set, strategy="channels", keep=keep, positives=100, calibration=0)
        clf, one = compose(modules, rule="vote"), modules[0]
        times = {"model": [], "module": [], "composed": []}
        with torch.no_grad():
            for _ in range(repeat):
                times["model"].append(seconds(lambda: model(model.input_spec.prepare(batch))))
                times["module"].append(seconds(lambda: one.network(one.input_spec.prepare(batch))))
                times["composed"].append(seconds(lambda: clf.score_images(batch)))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out[keep] = {"module_over_model": med["module"] / med["model"],
                     "composed_over_model": med["composed"] / med["model"], "model_ms": 1000 * med["model"]}
        print(keep, out[keep], flush=True)
    return out


def mnist_result() -> dict:
    train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    with tempfile.TemporaryDirectory() as tmp:
        train("smallcnn", train_set, Path(tmp) / "m.safetensors", TrainConfig(epochs=5, lr=0.05), progress=False)
        model = load_model(Path(tmp) / "m.safetensors")
    return measure("mnist5k smallcnn (5 epochs, trained here)", model, train_set, test_set, MNIST_FOUR)


def cifar_result() -> dict:
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors")
    return measure("CIFAR-10 ResNet-20 (reference)", model, load_data(str(CIFAR_TAR), "train"),
                   load_data(str(CIFAR_TAR), "val"), CIFAR_FOUR)


def plot(results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for res in results:
        xs = [r["params_fraction"] for r in res["rows"]]
        ax.plot(xs, [100 * r["top1_vote"] for r in res["rows"]], "o-", label=f"{res['name']}: modules")
        ax.axhline(100 * res["model_top1"], linestyle=":", color=ax.lines[-1].get_color())
        for r, x in zip(res["rows"], xs):
            ax.annotate(f"keep {r['keep']}", (x, 100 * r["top1_vote"]), fontsize=7, xytext=(3, -10),
                        textcoords="offset points")
    ax.set_xlabel("parameters per module, fraction of the parent")
    ax.set_ylabel("all modules composed, top-1 % (dotted: model)")
    ax.set_title("channels strategy: keep budget vs accuracy vs size", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "channels_tradeoff.png", dpi=110)
    return "benchmarks/results/channels_tradeoff.png"


def render(results: list[dict], png: str) -> str:
    lines = ["## Small modules (issue #5): the channels strategy", "",
             f"Command: `.venv/bin/python benchmarks/bench_channels.py` (machine: {machine()}). "
             "`--strategy channels --keep K`: each module keeps the share K of every prunable channel space "
             "(the channels that fire most differently on its class), removed channels are replaced by their "
             "mean, the module is extracted into a physically smaller network, and the layers reading removed "
             "channels are re-fitted in closed form (ridge least squares on 256 sample images, no gradient "
             "training). Latencies (`bench_channels.py --latency-only`, rerun on a quiet machine): one batch of "
             "256 test images, model, one module and all 10 modules composed timed alternately, median of 7; "
             "composed = the 10 modules run one after the other (no shared trunk yet). Decomposition seconds come "
             "from the main run, which shared the 2 cores with other benchmarks.", ""]
    for res in results:
        lines += [f"### {res['name']}: model top-1 {100 * res['model_top1']:.2f}", "",
                  "| keep | composed top-1, vote | calibrated | params / parent | MACs / parent | one module / model "
                  "| 10 modules / model | 2-class reuse: below parent restricted, mean (worst) | decompose (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['keep']} | {100 * r['top1_vote']:.2f} | {100 * r['top1_calibrated']:.2f} | "
                         f"{r['params_fraction']:.3f} | {r['flops_fraction']:.3f} | {r['module_over_model']:.2f}x | "
                         f"{r['composed_over_model']:.2f}x | {100 * r['pair_gap_mean']:.2f} ({100 * r['pair_gap_max']:.2f}) "
                         f"points | {r['decompose_seconds']:.0f} |")
        lines.append("")
    lines += [f"![keep budget vs accuracy vs size]({png})", "",
              "Targets of issue #5 (ResNet-20): modules <= 25% of parameters and FLOPs with the composed set within "
              "1.5 points of the model and no slower than it; 2-class reuse within 1 point of the parent at <= 40% "
              "FLOPs. Where a row misses them, it is reported as measured."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["mnist", "cifar"], default=None)
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latencies (on a quiet machine) into the last results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    previous = RESULTS / "channels.json"
    kept = json.loads(previous.read_text())["results"] if previous.exists() else []
    if args.latency_only:
        for res in kept:
            if res["name"].startswith("mnist"):
                train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
                with tempfile.TemporaryDirectory() as tmp:
                    train("smallcnn", train_set, Path(tmp) / "m.safetensors", TrainConfig(epochs=5, lr=0.05),
                          progress=False)
                    model = load_model(Path(tmp) / "m.safetensors")
            else:
                model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors")
                train_set, test_set = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
            measured = latencies(model, train_set, test_set)
            for row in res["rows"]:
                row.update(measured[row["keep"]], latency_run="--latency-only")
        write_section("channels", render(kept, plot(kept)), {"results": kept})
        return
    fresh = []
    if args.only in (None, "mnist"):
        fresh.append(mnist_result())
    if args.only in (None, "cifar") and CIFAR_TAR.exists():
        fresh.append(cifar_result())
    names = {r["name"] for r in fresh}
    results = [r for r in kept if r["name"] not in names] + fresh
    results.sort(key=lambda r: not r["name"].startswith("mnist"))
    png = plot(results)
    write_section("channels", render(results, png), {"results": results})


if __name__ == "__main__":
    main()
