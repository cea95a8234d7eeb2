"""Which images the statistics pass sees: the paper's budgets, chosen by a fixed seeded rule.

Module c observes its positives P_c (``positives`` images of class c, or all there are) and,
1:1, ``m = floor(positives / (N - 1))`` negatives of every other class (the paper's rule;
CIFAR-10: 111). The negatives taken from class j are the first m of P_j in the same seeded
order, so they are the same for every module and one pass serves all classes:

    counts seen by module c = counts over P_c + sum over j != c of counts over Neg_j

A class with fewer images than the budget uses all it has; m then follows the smallest class.
Classes the data lacks are allowed when they are not ``required`` (a reuse of a few classes
needs only its own classes' images); the 1:1 rule then counts the classes present.
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
                  negatives_per_class: int | None = None, seed: int = 0, required: list[int] | None = None,
                  names: list[str] | None = None) -> Sample:
    """Choose the images of the statistics pass (see the module docstring).

    ``required``: the classes whose images must be present (default: all); ``names`` name the
    classes in errors.
    """
    names = names or [str(c) for c in range(num_classes)]
    if num_classes < 2:
        raise CnnmodError(f"expected a classifier of 2 or more classes, found {num_classes}.")
    if not (isinstance(positives, int) and positives >= 1):
        raise CnnmodError(f"expected positives (images observed per class) >= 1, found {positives}.")
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    required = list(range(num_classes)) if required is None else required
    missing = [names[c] for c in required if len(per_class[c]) == 0]
    if missing:
        raise CnnmodError(f"expected images of every class to decompose, found none of "
                          f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}.")
    present = [idx for idx in per_class if len(idx)]
    if len(present) < 2:
        found = ", ".join(names[c] for c, idx in enumerate(per_class) if len(idx))
        raise CnnmodError("expected images of at least 2 classes (a module needs images of other classes as "
                          f"negatives), found only {found}.")
    used = min(positives, min(len(per_class[c]) for c in required))  # a smaller other class gives what it has
    m = negatives_per_class if negatives_per_class is not None else used // (len(present) - 1)
    if not (isinstance(m, int) and 0 <= m <= used):
        raise CnnmodError(f"expected negatives per class between 0 and {used} (the images observed per class), "
                          f"found {m}.")
    gen = torch.Generator().manual_seed(seed)
    neg, rest = [], []
    for idx in per_class:
        chosen = idx[torch.randperm(len(idx), generator=gen)[: min(positives, len(idx))]]
        neg.append(chosen[:m])
        rest.append(chosen[m:])
    return Sample(torch.cat(neg), torch.cat(rest), used, m)


@torch.inference_mode()
@torch.inference_mode()  # as the statistics pass runs: no autograd bookkeeping in either
@torch.inference_mode()
def plain_pass(model, spec, data, sample: Sample, batch_size: int = 256) -> None:
    """One plain inference pass over the sample's images: the statistics pass's cost baseline."""
    for part in (sample.negatives, sample.rest):
        for idx in part.split(batch_size):
            model(spec.prepare(data.images[idx]))
