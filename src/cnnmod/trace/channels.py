"""Channel spaces: which layers' channels are one and the same, derived from the traced graph.

Element-wise layers (BatchNorm, ReLU, pooling, flatten) keep their input's channels; a residual
``add`` ties its inputs' channels together; a convolution or a linear layer starts new ones. A
channel can be removed from a module only as a whole *space*: from every layer of it at once.

A space is *prunable* when removing a channel and putting a constant in its place (what the
``channels`` strategy does at the space's ReLUs) is exactly what every reader outside the space
sees: each reader (a convolution, a linear layer, a concat, the output) must read a node that
comes after the space's ReLUs. Spaces of the input, of linear layers' outputs, those touching a
concatenation or a grouped convolution are kept whole (a simplification: their channels would
need index bookkeeping across parts or groups).
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

    whole: set[str] = set()  # nodes whose space must be kept whole
    perm: dict[str, tuple] = {}  # node -> which input dimension each of its dimensions is (after permutes)
    for node in graph.nodes:
        parent[node.name] = node.name
        if node.op in _SAME_CHANNELS or node.op in _TIED:
            for i in node.inputs:
                union(node.name, i)
        if node.op == "input" or node.op == "linear":
            whole.add(node.name)
        if node.attrs.get("logits"):  # a head over the model's logits: each channel is a class's logit
            whole.update(node.inputs)
        moved = _moved(node, perm)
        if REGISTRY[node.op].channels == "whole" and node.op != "input" or moved:
            # LayerNorm over channels, a permute, a layer scale, or a value whose dim 1 is not the
            # channels (ConvNeXt's blocks run channels-last): its spaces are kept whole.
            whole.update([node.name, *node.inputs])
        if node.op in ("cat", "mul") or (node.op == "conv" and node.attrs.get("groups", 1) != 1):
            # mul (squeeze-excitation's x * gate) is kept whole for now: the gate's constant times
            # x's is a constant, but the extraction has not been checked on it yet.
            whole.update([node.name, *node.inputs])
    whole.add(graph.output)

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
        if node.op in _ACTIVATIONS or (node.op in _SAME_CHANNELS | _TIED and node.inputs
                                       and all(i in after for i in node.inputs)):
            after.add(node.name)
    prunable = {s for s in relus} - {of[n] for n in whole}
    for node in graph.nodes:
        for i in node.inputs:
            if of[i] != of[node.name] and i not in after:
                prunable.discard(of[i])  # someone outside reads a value from before the fill
    streams = {of[n.name] for n in graph.nodes if n.op == "add"}
    return Spaces(of, prunable, relus, streams)
