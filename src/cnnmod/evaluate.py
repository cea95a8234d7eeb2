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
def evaluate_scores(scorer: Scorer, data: Dataset, classes: list[str], *, batch_size: int = 500,
                    reject_below: float | None = None) -> dict:
    """Return {"top1", "top5", "n", "per_class"} of ``scorer`` on ``data``; classes match by name.

    With ``reject_below``, an image whose best score is lower is answered "unknown" (a miss);
    the share of such answers is reported as "unknown".
    """
    target = match_classes(data.classes, classes)[data.labels]  # (N,) model class index
    k = min(5, len(classes))
    hit1 = torch.zeros(len(data), dtype=torch.bool)
    hit5 = torch.zeros(len(data), dtype=torch.bool)
    unknown = torch.zeros(len(data), dtype=torch.bool)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        scores = scorer(data.images[sl])  # (B, K)
        top = scores.topk(k, dim=1)  # (B, k)
        if reject_below is not None:
            unknown[sl] = top.values[:, 0] < reject_below
        hit1[sl] = (top.indices[:, 0] == target[sl]) & ~unknown[sl]
        hit5[sl] = (top.indices == target[sl, None]).any(1) & ~unknown[sl]
    per_class = {}
    for i, name in enumerate(data.classes):
        sel = data.labels == i
        if sel.any():
            per_class[name] = float(hit1[sel].float().mean())
    result = {"top1": float(hit1.float().mean()), "top5": float(hit5.float().mean()),
              "n": len(data), "per_class": per_class}
    if reject_below is not None:
        result["unknown"] = float(unknown.float().mean())
    return result


def model_scorer(model: nn.Module, spec: InputSpec, device: torch.device | str = "cpu") -> Scorer:
    """Wrap a model so that it scores raw uint8 batches (preparing them by ``spec``)."""
    return lambda images: model(spec.prepare(images).to(device)).cpu()


def evaluate_model(model: nn.Module, data: Dataset, spec: InputSpec | None = None,
                   classes: list[str] | None = None, *, device: torch.device | str = "cpu") -> dict:
    """Evaluate a model; spec and classes default to the model's metadata (or the data's)."""
    spec = spec or getattr(model, "input_spec", None) or measure_spec(data.images)
    classes = classes or getattr(model, "cnnmod_meta", {}).get("classes") or data.classes
    was_training = model.training
    model.eval()
    try:
        return evaluate_scores(model_scorer(model, spec, device), data, classes)
    finally:
        model.train(was_training)
