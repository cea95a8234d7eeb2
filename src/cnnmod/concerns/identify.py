"""Concern and tangling identification (CI + TI) from the one-pass statistics."""

from __future__ import annotations

import torch

from ..statistics import ActivationStats


def active_masks(stats: ActivationStats, c: int) -> dict[str, torch.Tensor]:
    """Return, per observed layer, which elements module ``c`` keeps (bool, shaped like the layer).

    The paper's rule: an element is inactive iff it is <= 0 on every observed input (the class's
    positives and the 1:1 negatives); a single positive value keeps it.
    """
    return {name: counts > 0 for name, counts in stats.positive_counts(c).items()}
