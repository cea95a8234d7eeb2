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
from .reconstruct import reconstruct_


@dataclass
class Parent:
    graph: Graph
    weights: dict[str, torch.Tensor]
    stats: ActivationStats
    shapes: dict[str, tuple[int, ...]]  # layer -> output shape without batch
    head: str  # the final Linear layer
    input_shape: tuple[int, ...] = ()  # one prepared input, without the batch
    sample: torch.Tensor | None = None  # a few hundred prepared images of the statistics sample
    spaces: Spaces | None = None  # channel spaces, traced once for all modules
    _outputs: dict | None = None

    def channel_spaces(self) -> Spaces:
        if self.spaces is None:
            self.spaces = channel_spaces(self.graph)
        return self.spaces

    @torch.no_grad()
    def outputs(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The parent's outputs of layers ``names`` on ``sample`` (computed once, for all modules)."""
        if self._outputs is None:
            self._outputs = {}
            net = GraphNetwork(self.graph, self.weights)
            net.observer = lambda name, out: self._outputs.__setitem__(name, out) if name in names else None
            net(self.sample)
        return self._outputs


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


def channels_strategy(parent: Parent, c: int, *, keep: float = 0.5, refit: bool = True) -> tuple[GraphNetwork, dict]:
    """Keep the ``keep`` share of each prunable channel space that best tells class c apart.

    A channel's score is how differently it fires on class c than on the other classes, from the
    one-pass counts (``channel_scores``). A removed channel is not zeroed but replaced by its mean
    value over the observed images (zeroing shifts every later layer: measured in issue #5, it
    makes every module claim every input); the head is channeled as in the paper. The masked
    network is then extracted into a physically smaller one that computes the same logits, and
    (``refit``) the layers that read removed channels are re-fitted in closed form to reproduce
    the parent's outputs on a sample (``reconstruct_``).
    """
    _check_channels_options(keep)
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
    if refit and parent.sample is not None:
        readers = {n.name for n in parent.graph.nodes if n.op in ("conv", "linear") and n.inputs
                   and spaces.of[n.inputs[0]] in spaces.prunable}
        outputs = parent.outputs(readers)
        pruned = {n for n in readers if not bool(keep_channels[spaces.of[parent.graph.by_name[n].inputs[0]]].all())}
        targets = {n: outputs[n] for n in pruned if n != parent.head}
        if parent.head in pruned:  # the module's head: the parent's logits, channeled
            z = outputs[parent.head]
            others = torch.arange(z.shape[1]) != c
            targets[parent.head] = torch.stack([z[:, others].mean(1), z[:, c]], 1)
        out_index = {n: _kept_index(keep_channels.get(spaces.of[n])) for n in targets if n != parent.head}
        reconstruct_(network, targets, out_index, parent.sample)
    mine, full = cost(network, parent.input_shape), cost(GraphNetwork(parent.graph, parent.weights), parent.input_shape)
    kept = sum(int(k.sum()) for k in keep_channels.values())
    total = sum(k.numel() for k in keep_channels.values())
    summary = {"channels_kept": kept, "channels_prunable": total, "share_kept": kept / max(1, total),
               "params_fraction": mine["params"] / full["params"], "flops_fraction": mine["macs"] / full["macs"]}
    return network, summary


def _kept_index(k: torch.Tensor | None) -> torch.Tensor | None:
    return None if k is None or bool(k.all()) else k.nonzero().flatten()


def _check_channels_options(keep: float = 0.5, refit: bool = True) -> None:
    if not 0.0 < keep <= 1.0:
        raise CnnmodError(f"expected --keep in (0, 1], found {keep}.")


channels_strategy.needs_sums = True  # the statistics pass also sums values (the fills' means)
channels_strategy.check_options = _check_channels_options  # called before the statistics pass

Strategy = Callable[..., tuple[GraphNetwork, dict]]
STRATEGIES: dict[str, Strategy] = {"paper": paper_strategy, "channels": channels_strategy}
