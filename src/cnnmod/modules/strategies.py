"""Decomposition strategies: how a module is built from the parent and the statistics.

A strategy takes the ``Parent`` (graph, weights, statistics, shapes) and a class index and
returns the module's weights, keep masks and a summary. ``paper`` is Pan & Rajan's
CI + TI + MC-BLN, faithfully.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..concerns import active_masks, backtrack_removed, channel_head, mc_bln_features
from ..statistics import ActivationStats
from ..trace.graph import Graph


@dataclass
class Parent:
    graph: Graph
    weights: dict[str, torch.Tensor]
    stats: ActivationStats
    shapes: dict[str, tuple[int, ...]]  # layer -> output shape without batch
    head: str  # the final Linear layer


def paper_strategy(parent: Parent, c: int, *, delta: float = 0.5) -> tuple[dict, dict, dict]:
    """CI + TI (inactive elements), channeled head, MC-BLN backtracking (delta)."""
    keep = active_masks(parent.stats, c)
    w, b = parent.weights[f"{parent.head}.weight"], parent.weights.get(f"{parent.head}.bias")
    w2, b2 = channel_head(w, b, c)
    removed = mc_bln_features(w2, delta)
    head_input = parent.graph.by_name[parent.head].inputs[0]
    for layer, gone in backtrack_removed(parent.graph, head_input, removed, set(keep), parent.shapes).items():
        keep[layer] = keep[layer] & ~gone
    weights = dict(parent.weights, **{f"{parent.head}.weight": w2, f"{parent.head}.bias": b2})
    kept = sum(int(m.sum()) for m in keep.values())
    total = sum(m.numel() for m in keep.values())
    summary = {"elements_kept": kept, "elements_total": total, "share_kept": kept / total,
               "mc_bln_features_removed": int(removed.sum())}
    return weights, keep, summary


Strategy = Callable[..., tuple[dict, dict, dict]]
STRATEGIES: dict[str, Strategy] = {"paper": paper_strategy}
