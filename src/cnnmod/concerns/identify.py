"""Concern and tangling identification (CI + TI) from the one-pass statistics."""

from __future__ import annotations

import math

import torch

from ..statistics import ActivationStats


def active_masks(stats: ActivationStats, c: int) -> dict[str, torch.Tensor]:
    """Return, per observed layer, which elements module ``c`` keeps, packed as bits (``bits.pack``
    of the flattened layer; ``stats.active(c)`` unpacks them).

    The paper's rule: an element is inactive iff it is <= 0 on every observed input (the class's
    positives and the 1:1 negatives); a single positive value keeps it.
    """
    return stats.active_bits(c)


def channel_scores(stats: ActivationStats, spaces, c: int) -> dict[int, torch.Tensor]:
    """Return, per prunable channel space, how much each channel tells class ``c`` apart (C,).

    A channel's firing rate on class k is the share of its elements > 0 over the images of class
    k in the sample; its score for c is |rate_c - mean rate of the other classes|, averaged over
    the space's ReLUs. Channels that fire alike for every class score low: a constant (their
    mean) replaces them well.
    """
    seen = stats.seen_neg + stats.seen_rest  # (K,) images per class
    n = seen.double().clamp_min(1)
    others = (torch.arange(stats.num_classes) != c) & (seen > 0)  # classes the data lacks (--only) do not count
    scores = {}
    for space in sorted(spaces.prunable):
        total = None
        for relu in spaces.relus[space]:
            counts = stats.channel_counts[relu].double()  # (K, C): over every image and position
            rate = counts / (math.prod(stats.shapes[relu]) // counts.shape[1]) / n[:, None]
            diff = (rate[c] - rate[others].mean(0)).abs()
            total = diff if total is None else total + diff
        scores[space] = total / len(spaces.relus[space])
    return scores
