"""Decomposition strategies: how a module is built from the parent and the statistics.

A strategy takes the ``Parent`` (graph, weights, statistics, shapes) and a class index and
returns the module's network and a summary. ``paper`` is Pan & Rajan's CI + TI + MC-BLN,
faithfully: masks over the whole network. ``channels`` keeps whole channels per class and
extracts a physically smaller network (ours; see ``channels_strategy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..concerns import active_masks, backtrack_removed, channel_head, channel_scores, mc_bln_features
from ..errors import CnnmodError
from ..statistics import ActivationStats
from ..trace.channels import Spaces, channel_spaces
from ..trace.graph import Graph
from ..trace.network import GraphNetwork
from .extract import cost, extract


@dataclass
class Parent:
    graph: Graph
    weights: dict[str, torch.Tensor]
    stats: ActivationStats
    shapes: dict[str, tuple[int, ...]]  # layer -> output shape without batch
    head: str  # the final Linear layer
    input_shape: tuple[int, ...] = ()  # one prepared input, without the batch
    spaces: Spaces | None = None  # channel spaces, traced once for all modules

    def channel_spaces(self) -> Spaces:
        if self.spaces is None:
            self.spaces = channel_spaces(self.graph)
        return self.spaces


def paper_strategy(parent: Parent, c: int, *, delta: float = 0.5) -> tuple[GraphNetwork, dict]:
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
    return GraphNetwork(parent.graph, weights, keep), summary


def channels_strategy(parent: Parent, c: int, *, keep: float = 0.5) -> tuple[GraphNetwork, dict]:
    """Keep the ``keep`` share of each prunable channel space that best tells class c apart.

    A channel's score is how differently it fires on class c than on the other classes, from the
    one-pass counts (``channel_scores``). A removed channel is not zeroed but replaced by its mean
    value over the observed images (zeroing shifts every later layer: measured in issue #5, it
    makes every module claim every input); the head is channeled as in the paper. The masked
    network is then extracted into a physically smaller one that computes the same logits.
    """
    if not 0.0 < keep <= 1.0:
        raise CnnmodError(f"expected --keep in (0, 1], found {keep}.")
    spaces = parent.channel_spaces()
    w, b = parent.weights[f"{parent.head}.weight"], parent.weights.get(f"{parent.head}.bias")
    w2, b2 = channel_head(w, b, c)
    weights = dict(parent.weights, **{f"{parent.head}.weight": w2, f"{parent.head}.bias": b2})
    keep_channels = {}
    masks, fills = {}, {}
    for space, score in channel_scores(parent.stats, spaces, c).items():
        k = max(1, round(keep * score.numel()))
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[torch.sort(score, descending=True, stable=True).indices[:k]] = True
        keep_channels[space] = chosen
        for relu in spaces.relus[space]:
            shape = parent.shapes[relu]
            masks[relu] = chosen.view(-1, *([1] * (len(shape) - 1))).expand(shape)
            fills[relu] = parent.stats.mean(relu).float()
    masked = GraphNetwork(parent.graph, weights, masks, fills)
    network = extract(masked, spaces, keep_channels, parent.input_shape)
    mine, full = cost(network, parent.input_shape), cost(GraphNetwork(parent.graph, parent.weights), parent.input_shape)
    kept = sum(int(k.sum()) for k in keep_channels.values())
    total = sum(k.numel() for k in keep_channels.values())
    summary = {"channels_kept": kept, "channels_prunable": total, "share_kept": kept / max(1, total),
               "params_fraction": mine["params"] / full["params"], "flops_fraction": mine["macs"] / full["macs"]}
    return network, summary


channels_strategy.needs_sums = True  # the statistics pass also sums values (the fills' means)

Strategy = Callable[..., tuple[GraphNetwork, dict]]
STRATEGIES: dict[str, Strategy] = {"paper": paper_strategy, "channels": channels_strategy}
