"""Benchmark of issue #3: the paper's decomposition, faithful and fast.

    .venv/bin/python benchmarks/bench_decompose.py            # all rows whose inputs exist
    .venv/bin/python benchmarks/bench_decompose.py --only mnist

Rows: smallcnn on mnist5k (trained here, 5 epochs), the unfamiliar test architecture on
digits, the reference CIFAR-10 ResNet-20 (benchmarks/checkpoints), and the paper's own
BatchNorm-free ResNet-20 when its checkpoint exists. For each: model vs composed modules
(top-1, top-5), share of observed elements kept per module, the share masked in every module,
the mean pairwise Jaccard index of the modules' kept elements, and the cost of decomposing all
classes relative to one plain inference pass of the model over the same images, both timed in
this run (median of 3, interleaved).
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
from common import CHECKPOINTS, CIFAR_TAR, RESULTS, ROOT, machine, seconds, write_section  # noqa: E402

from cnnmod import TrainConfig, load_data, load_model, train  # noqa: E402
from cnnmod.compose import compose  # noqa: E402
from cnnmod.data.inputspec import measure_spec  # noqa: E402
from cnnmod.evaluate import evaluate_model, evaluate_scores  # noqa: E402
from cnnmod.modules import decompose  # noqa: E402
from cnnmod.statistics import plain_pass, select_sample  # noqa: E402
from cnnmod.trace import overlay_maps  # noqa: E402

PAPER = {  # ICSE'22 Table 1, CI+TI+MC-BLN rows (top-1, top-5, Jaccard)
    "CIFAR-10 ResNet-20": dict(model_top1=87.1, modules_top1=87.0, model_top5=99.5, modules_top5=99.4, jaccard=0.75),
}


def measure(name, model, spec, classes, train_set, test_set, repeat=3):
    sample = select_sample(train_set.labels, len(classes))
    plain, dec, modules = [], [], None
    for _ in range(repeat):  # interleaved, so that machine noise hits both alike
        plain.append(seconds(lambda: plain_pass(model, spec, train_set, sample)))
        modules = decompose(model, train_set, input_spec=spec, classes=classes)
        dec.append(modules[0].timing["total_seconds"])
    ratios = sorted(d / p for d, p in zip(dec, plain))
    model_acc = evaluate_model(model, test_set, spec, classes)
    composed = compose(modules)
    mod_acc = evaluate_scores(composed.score_images, test_set, classes)
    keeps = [torch.cat([k.flatten() for k in overlay_maps(m.network, "mask").values()]) for m in modules]
    masked_everywhere = float((~torch.stack(keeps)).all(0).float().mean())
    jaccard = [float((a & b).sum() / (a | b).sum()) for a, b in itertools.combinations(keeps, 2)]
    shares = [m.meta["share_kept"] for m in modules]
    return {
        "name": name, "classes": len(classes), "images_observed": modules[0].timing["images"],
        "test_images": model_acc["n"],
        "model_top1": model_acc["top1"], "model_top5": model_acc["top5"],
        "modules_top1": mod_acc["top1"], "modules_top5": mod_acc["top5"],
        "loss_top1_points": 100 * (model_acc["top1"] - mod_acc["top1"]),
        "share_kept_mean": sum(shares) / len(shares), "share_kept_min": min(shares), "share_kept_max": max(shares),
        "share_masked_in_every_module": masked_everywhere, "jaccard_mean": sum(jaccard) / len(jaccard),
        "decompose_seconds": sorted(dec)[len(dec) // 2], "inference_pass_seconds": sorted(plain)[len(plain) // 2],
        "decompose_over_inference": ratios[len(ratios) // 2], "ratios": ratios,
        "mc_bln_features_removed_mean": sum(m.meta["mc_bln_features_removed"] for m in modules) / len(modules),
    }


def mnist_row():
    train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    with tempfile.TemporaryDirectory() as tmp:
        train("smallcnn", train_set, Path(tmp) / "m.safetensors", TrainConfig(epochs=5, lr=0.05), progress=False)
        model = load_model(Path(tmp) / "m.safetensors")
    return measure("mnist5k smallcnn (5 epochs, trained here)", model, model.input_spec, model.cnnmod_meta["classes"],
                   train_set, test_set)


def unfamiliar_row():
    sys.path.insert(0, str(ROOT / "tests"))
    from nets import train_unfamiliar  # the architecture the test suite writes: depthwise, concat, add, max pool

    train_set, test_set = load_data("digits", "train"), load_data("digits", "test")
    spec = measure_spec(train_set.images)
    model = train_unfamiliar(train_set, spec)
    return measure("digits, unfamiliar architecture (tests/nets.py)", model, spec, train_set.classes,
                   train_set, test_set)


def cifar_row(checkpoint: Path, name: str):
    model = load_model(checkpoint)
    train_set = load_data(str(CIFAR_TAR), "train")
    val_set = load_data(str(CIFAR_TAR), "val")
    return measure(name, model, model.input_spec, model.cnnmod_meta["classes"], train_set, val_set, repeat=1)


def render(rows: list[dict]) -> str:
    lines = [
        "## Decomposition (issue #3): the paper's strategy",
        "",
        "Command: `.venv/bin/python benchmarks/bench_decompose.py` "
        f"(machine: {machine()}). Modules are composed by the paper's voting rule; the test split is "
        "`mnist5k`/`digits` `test`, and for CIFAR-10 the held-out validation split (last 500 images per "
        "class). Decomposition time covers the statistics pass and building all modules; the baseline is one "
        "plain inference pass of the model over the same images, in the same run.",
        "",
        "| model | model top-1 | modules top-1 | loss (points) | model top-5 | modules top-5 | kept per module (mean, min-max) | masked in every module | Jaccard | decompose / inference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {100 * r['model_top1']:.2f} | {100 * r['modules_top1']:.2f} | {r['loss_top1_points']:.2f} | "
            f"{100 * r['model_top5']:.2f} | {100 * r['modules_top5']:.2f} | {r['share_kept_mean']:.3f} "
            f"({r['share_kept_min']:.3f}-{r['share_kept_max']:.3f}) | {r['share_masked_in_every_module']:.3f} | "
            f"{r['jaccard_mean']:.3f} | {r['decompose_over_inference']:.2f}x ({r['decompose_seconds']:.1f} s / "
            f"{r['inference_pass_seconds']:.1f} s, {r['images_observed']} images) |")
    lines += ["", "Paper (ICSE'22 Table 1, CI+TI+MC-BLN, BatchNorm-free ResNets):", "",
              "| model | model top-1 | modules top-1 | model top-5 | modules top-5 | Jaccard |", "|---|---|---|---|---|---|"]
    for name, p in PAPER.items():
        lines.append(f"| {name} | {p['model_top1']} | {p['modules_top1']} | {p['model_top5']} | {p['modules_top5']} | {p['jaccard']} |")
    lines += ["", "Jaccard here is the mean over module pairs of |A ∩ B| / |A ∪ B| of the kept observed "
              "elements; the paper's FSE'20 code computes it over sets of weight values, which masks of "
              "shared convolution weights do not change, so the two are not the same measure."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["mnist", "unfamiliar", "cifar"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    if args.only in (None, "mnist"):
        rows.append(mnist_row())
    if args.only in (None, "unfamiliar"):
        rows.append(unfamiliar_row())
    if args.only in (None, "cifar"):
        for file, name in [("cifar10_resnet20.safetensors", "CIFAR-10 ResNet-20 (reference, BN)"),
                           ("cifar10_resnet20_nobn.safetensors", "CIFAR-10 ResNet-20 without BN (paper's setting)")]:
            if (CHECKPOINTS / file).exists() and CIFAR_TAR.exists():
                rows.append(cifar_row(CHECKPOINTS / file, name))
    for r in rows:
        print({k: v for k, v in r.items() if k != "ratios"})
    previous = RESULTS / "decompose.json"  # rows not rerun now keep their last measurement
    kept = json.loads(previous.read_text())["rows"] if previous.exists() else []
    fresh = {r["name"] for r in rows}
    rows = [r for r in kept if r["name"] not in fresh] + rows
    order = ["mnist5k", "digits", "CIFAR-10 ResNet-20 (", "CIFAR-10 ResNet-20 without"]
    rows.sort(key=lambda r: next(i for i, o in enumerate(order + [""]) if r["name"].startswith(o)))
    write_section("decompose", render(rows), {"rows": rows})


if __name__ == "__main__":
    main()
