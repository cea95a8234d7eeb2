"""Channel spaces: which layers' channels are one and the same, derived from the traced graph.

Element-wise layers (BatchNorm, activations, pooling, flatten) and depthwise convolutions keep
their input's channels; a residual ``add`` and squeeze-excitation's ``x * gate`` tie their
inputs' channels together; any other convolution or a linear layer starts new ones. A
channel can be removed from a module only as a whole *space*: from every layer of it at once.

A space is *prunable* when removing a channel and putting a constant in its place (what the
``channels`` strategy does at the space's ReLUs) is exactly what every reader outside the space
sees: each reader (a convolution, a linear layer, a concat, the output) must read a node that
comes after the space's activations. Spaces of the input, of linear layers' outputs, those
touching a concatenation, a grouped (not depthwise) convolution, a channel split or shuffle,
LayerNorm or a permute are kept whole (a simplification: their channels would need
index bookkeeping across parts, groups or layouts); ``Spaces.whole`` says why for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Graph
from .ops import REGISTRY, ops_where

_SAME_CHANNELS = ops_where(channels="same")  # BatchNorm, activations, pooling, flatten, identity
_TIED = ops_where(channels="tied")  # add, mul: both inputs' channels are one space
_ACTIVATIONS = ops_where(activation=True)


@dataclass
class Spaces:
    of: dict[str, int]  # node -> space id
    prunable: set[int]
    relus: dict[int, list[str]]  # space -> its activations (where removed channels get their constant)
    streams: set[int] = field(default_factory=set)  # spaces tied by a residual add (a stage's stream)
    whole: dict[int, str] = field(default_factory=dict)  # spaces with activations kept whole -> why

    def members(self, space: int) -> list[str]:
        return [n for n, s in self.of.items() if s == space]


def _moved(node, perm: dict[str, tuple]) -> bool:
    """Record ``node``'s dimension order; whether its dim 1 is not the channels of an N, C, H, W value."""
    source = perm[node.inputs[0]] if node.inputs else (0, 1, 2, 3)
    perm[node.name] = tuple(source[d] for d in node.attrs["dims"]) if node.op == "permute" else source
    return perm[node.name][:2] != (0, 1) or any(perm[i][:2] != (0, 1) for i in node.inputs)


def channel_spaces(graph: Graph) -> Spaces:
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    whole: dict[str, str] = {}  # node -> why its space must be kept whole (the first reason found)

    def keep_whole(names, reason: str) -> None:
        for n in names:
            whole.setdefault(n, reason)

    perm: dict[str, tuple] = {}  # node -> which input dimension each of its dimensions is (after permutes)
    for node in graph.nodes:
        parent[node.name] = node.name
        if node.op in _SAME_CHANNELS or node.op in _TIED or node.attrs.get("depthwise"):
            for i in node.inputs:
                union(node.name, i)
        if node.op in ("input", "linear"):
            keep_whole([node.name], "the input" if node.op == "input" else "a linear layer's output")
        if node.attrs.get("logits"):  # a head over the model's logits: each channel is a class's logit
            keep_whole(node.inputs, "the model's logits")
        if _moved(node, perm):
            keep_whole([node.name, *node.inputs], "channels not on dim 1 (channels-last)")
        if node.op != "input" and REGISTRY[node.op].channels == "whole":
            keep_whole([node.name, *node.inputs], f"{node.op} (mixes or moves channels)")
        if node.op == "cat":
            keep_whole([node.name, *node.inputs], "a concatenation")
        if node.op == "conv" and node.attrs.get("groups", 1) != 1 and not node.attrs.get("depthwise"):
            keep_whole([node.name, *node.inputs], "a grouped or depthwise convolution")
    keep_whole([graph.output], "the model's output")

    roots = sorted({find(n.name) for n in graph.nodes}, key=[n.name for n in graph.nodes].index)
    ids = {r: i for i, r in enumerate(roots)}
    of = {n.name: ids[find(n.name)] for n in graph.nodes}
    relus: dict[int, list[str]] = {}
    for node in graph.nodes:
        if node.op in _ACTIVATIONS:
            relus.setdefault(of[node.name], []).append(node.name)

    # After the fill: a space's ReLUs, and nodes of the space all of whose inputs are after it.
    after: set[str] = set()
    for node in graph.nodes:
        if node.op in _ACTIVATIONS or ((node.op in _SAME_CHANNELS | _TIED or node.attrs.get("depthwise"))
                                       and node.inputs and all(i in after for i in node.inputs)):
            after.add(node.name)
    why: dict[int, str] = {}
    for n, reason in whole.items():
        why.setdefault(of[n], reason)
    for node in graph.nodes:
        for i in node.inputs:
            if of[i] != of[node.name] and i not in after:  # someone outside reads a value from before the fill
                why.setdefault(of[i], "read before its activation")
    prunable = set(relus) - set(why)
    streams = {of[n.name] for n in graph.nodes if n.op == "add"}
    return Spaces(of, prunable, relus, streams, {s: why[s] for s in sorted(relus) if s in why})
