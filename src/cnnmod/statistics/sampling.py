"""Which images the statistics pass sees: the paper's budgets, chosen by a fixed seeded rule.

Module c observes its positives P_c (``positives`` images of class c, or all there are) and,
1:1, ``m = floor(positives / (N - 1))`` negatives of every other class (the paper's rule;
CIFAR-10: 111). The negatives taken from class j are the first m of P_j in the same seeded
order, so they are the same for every module and one pass serves all classes:

    counts seen by module c = counts over P_c + sum over j != c of counts over Neg_j

A class with fewer images than the budget uses all it has; m then follows the smallest class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CnnmodError


@dataclass
class Sample:
    negatives: torch.Tensor  # (M,) data indices of Neg_j for all j (the first m of each P_j)
    rest: torch.Tensor  # (R,) indices of P_j minus Neg_j for all j
    positives: int  # images per class actually used (at most)
    negatives_per_class: int


def select_sample(labels: torch.Tensor, num_classes: int, *, positives: int = 1000,
                  negatives_per_class: int | None = None, seed: int = 0) -> Sample:
    """Choose the images of the statistics pass (see the module docstring)."""
    if num_classes < 2:
        raise CnnmodError(f"expected a classifier of 2 or more classes, found {num_classes}.")
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    missing = [c for c, idx in enumerate(per_class) if len(idx) == 0]
    if missing:
        raise CnnmodError(f"expected images of every class of the model, found none of class index(es) {missing}.")
    used = min(positives, min(len(idx) for idx in per_class))
    m = negatives_per_class if negatives_per_class is not None else used // (num_classes - 1)
    if not 0 <= m <= used:
        raise CnnmodError(f"expected 0..{used} negatives per class, found {m}.")
    gen = torch.Generator().manual_seed(seed)
    neg, rest = [], []
    for idx in per_class:
        chosen = idx[torch.randperm(len(idx), generator=gen)[: min(positives, len(idx))]]
        neg.append(chosen[:m])
        rest.append(chosen[m:])
    return Sample(torch.cat(neg), torch.cat(rest), used, m)


@torch.inference_mode()
@torch.inference_mode()  # as the statistics pass runs: no autograd bookkeeping in either
def plain_pass(model, spec, data, sample: Sample, batch_size: int = 256) -> None:
    """One plain inference pass over the sample's images: the statistics pass's cost baseline."""
    for part in (sample.negatives, sample.rest):
        for idx in part.split(batch_size):
            model(spec.prepare(data.images[idx]))
