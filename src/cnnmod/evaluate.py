"""Top-1, top-5 and per-class accuracy of anything that scores raw image batches."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .data.inputspec import InputSpec, measure_spec
from .data.sources import Dataset
from .errors import CnnmodError

Scorer = Callable[[torch.Tensor], torch.Tensor]  # uint8 images (B, C, H, W) -> scores (B, K)


def match_classes(data_classes: list[str], model_classes: list[str]) -> torch.Tensor:
    """Map each data class to the model's index of the class of the same name."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [c for c in data_classes if c not in index]
    if unknown:
        raise CnnmodError(f"expected data classes among the model's ({', '.join(model_classes[:12])}"
                          f"{', ...' if len(model_classes) > 12 else ''}), found unknown class(es) "
                          f"{', '.join(map(repr, unknown[:5]))}.")
    return torch.tensor([index[c] for c in data_classes], dtype=torch.int64)


@torch.no_grad()
def evaluate_scores(scorer: Scorer, data, classes: list[str], *, batch_size: int = 500,
                    reject_below: float | None = None, confusion: bool = False) -> dict:
    """Return {"top1", "top5", "n", "per_class"} of ``scorer`` on ``data``; classes match by name.

    ``data`` is a ``Dataset`` or ``Views`` (the scorer then gets ``Views.batch``). With
    ``reject_below``, an image whose best score is lower is answered "unknown" (a miss); the share
    of such answers is reported as "unknown". ``confusion``: also return the confusion matrix,
    {"true": data classes (rows), "predicted": ``classes`` (+ "unknown"), "matrix": counts}.
    """
    target = match_classes(data.classes, classes)[data.labels]  # (N,) model class index
    k = min(5, len(classes))
    hit1 = torch.zeros(len(data), dtype=torch.bool)
    hit5 = torch.zeros(len(data), dtype=torch.bool)
    unknown = torch.zeros(len(data), dtype=torch.bool)
    predicted = torch.zeros(len(data), dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        scores = scorer(data.batch(sl))  # (B, K)
        top = scores.topk(k, dim=1)  # (B, k)
        if reject_below is not None:
            unknown[sl] = top.values[:, 0] < reject_below
        predicted[sl] = torch.where(unknown[sl], len(classes), top.indices[:, 0])
        hit1[sl] = (top.indices[:, 0] == target[sl]) & ~unknown[sl]
        hit5[sl] = (top.indices == target[sl, None]).any(1) & ~unknown[sl]
    per_class = {}
    for i, name in enumerate(data.classes):
        sel = data.labels == i
        if sel.any():
            per_class[name] = _share(hit1[sel])
    result = {"top1": _share(hit1), "top5": _share(hit5), "n": len(data), "per_class": per_class}
    if reject_below is not None:
        result["unknown"] = _share(unknown)
    if confusion:
        rows = torch.zeros(len(data.classes), len(classes) + 1, dtype=torch.int64)
        rows.index_put_((data.labels, predicted), torch.ones_like(predicted), accumulate=True)
        present = [i for i, name in enumerate(data.classes) if name in per_class]
        columns = len(classes) + (1 if reject_below is not None else 0)
        result["confusion"] = {"true": [data.classes[i] for i in present],
                               "predicted": list(classes) + (["unknown"] if reject_below is not None else []),
                               "matrix": rows[present, :columns].tolist()}
    return result


def _share(hits: torch.Tensor) -> float:
    return int(hits.sum()) / max(1, hits.numel())  # from counts: 0.98, not 0.9800000190734863


@torch.no_grad()
def evaluate_module(module, data, *, batch_size: int = 500) -> dict:
    """Judge one module as the binary classifier it is: its class against every other image of ``data``.

    Returns precision, recall, F1 and accuracy of "this class" at margin > 0 (the module's vote in a
    composition), with the counts; and, where its calibration chose one (``best_threshold``), the same
    at its own threshold (``at_threshold``): the detector a user deploys alone.
    """
    if module.class_name not in data.classes:
        raise CnnmodError(f"expected images of class {module.class_name!r} (the module's) in the data, found only "
                          f"{', '.join(data.classes[:12])}.")
    positive = data.labels == data.classes.index(module.class_name)  # (N,)
    images = data.images_for(module.input_spec)
    margins = torch.cat([module.margin(module.input_spec.prepare(images[i:i + batch_size]))
                         for i in range(0, len(data), batch_size)])
    result = dict(_binary(margins > 0, positive), **{"class": module.class_name})
    threshold = (module.meta.get("calibration") or {}).get("threshold")
    if isinstance(threshold, (int, float)):
        result["at_threshold"] = dict(_binary(margins > threshold, positive), threshold=threshold)
    return result


def _binary(said: torch.Tensor, positive: torch.Tensor) -> dict:
    tp, fp = int((said & positive).sum()), int((said & ~positive).sum())
    fn, tn = int((~said & positive).sum()), int((~said & ~positive).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "accuracy": (tp + tn) / len(said), "n": len(said), "positives": tp + fn,
            "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}


def model_scorer(model: nn.Module, spec: InputSpec, device: torch.device | str = "cpu",
                 columns: list[int] | None = None) -> Scorer:
    """Wrap a model so that it scores raw uint8 batches (preparing them by ``spec``).

    ``columns``: keep only these logits (the model restricted to some of its classes).
    """
    def score(images):
        logits = model(spec.prepare(images).to(device)).cpu()
        return logits if columns is None else logits[:, columns]
    return score


def evaluate_model(model: nn.Module, data: Dataset, spec: InputSpec | None = None,
                   classes: list[str] | None = None, *, device: torch.device | str = "cpu",
                   restrict: list[str] | None = None, confusion: bool = False) -> dict:
    """Evaluate a model; spec and classes default to the model's metadata (or the data's).

    ``restrict``: evaluate the model as a classifier of these classes alone (argmax over their
    logits), the fair baseline of a reuse of their modules; ``data`` should hold only them.
    """
    spec = spec or getattr(model, "input_spec", None) or measure_spec(data.images)
    classes = classes or getattr(model, "cnnmod_meta", {}).get("classes") or data.classes
    columns = None
    if restrict is not None:
        columns = match_classes(restrict, classes).tolist()
        classes = list(restrict)
    was_training = model.training
    model.eval()
    try:
        return evaluate_scores(model_scorer(model, spec, device, columns), data, classes, confusion=confusion)
    finally:
        model.train(was_training)
