"""Channel spaces: which layers' channels are one and the same, derived from the traced graph.

Element-wise layers (BatchNorm, activations, pooling, flatten) and depthwise convolutions keep
their input's channels; a residual ``add`` and squeeze-excitation's ``x * gate`` tie their
inputs' channels together; any other convolution or a linear layer starts new ones. A
channel can be removed from a module only as a whole *space*: from every layer of it at once.

A space is *prunable* when removing a channel and putting a constant in its place (what the
``channels`` strategy does at the space's ReLUs) is exactly what every reader outside the space
sees: each reader (a convolution, a linear layer, a concat, the output) must read a node that
comes after the space's activations.

A space that starts at a concatenation, a channel slice, a channel shuffle or channel padding
(ops whose channels are ``index``: each output channel is one input channel, or a constant) is
*derived*: which of its channels a module keeps follows from the spaces it reads
(``Spaces.expand``), and its removed channels are constants already, computed from their sources'
constants. A derived space that is also tied to
other channels (an add with a convolution's output), or kept whole for another reason, keeps its
sources whole. Spaces of the input, of linear layers' outputs, and those touching an op whose
channel flow is ``whole`` (a grouped, not depthwise, convolution, LayerNorm, a permute: their
channels would need bookkeeping across groups or layouts) are kept whole; ``Spaces.whole`` says
why for each. How channels flow through each op is the registry's (``Op.flow``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graph import Graph, Node
from .ops import REGISTRY, channel_sources, ops_where

_ACTIVATIONS = ops_where(activation=True)


def flow(node: Node) -> str:
    """How channels flow through ``node``: same, new, tied, index or whole (ops.py)."""
    return REGISTRY[node.op].flow(node)


@dataclass
class Spaces:
    of: dict[str, int]  # node -> space id
    prunable: set[int]
    relus: dict[int, list[str]]  # space -> its activations (where removed channels get their constant)
    streams: set[int] = field(default_factory=set)  # spaces tied by a residual add (a stage's stream)
    whole: dict[int, str] = field(default_factory=dict)  # spaces with activations kept whole -> why
    derived: dict[int, Node] = field(default_factory=dict)  # space -> the index op it starts at, in graph order

    def members(self, space: int) -> list[str]:
        return [n for n, s in self.of.items() if s == space]

    def expand(self, keep: dict[int, torch.Tensor], shapes: dict[str, tuple[int, ...]],
               constants: bool = False) -> dict[int, torch.Tensor]:
        """``keep`` (a bool per channel of some spaces) with the derived spaces' keeps added. A constant
        channel (channel padding) is removed (``constants``: counted as kept: removing it loses nothing)."""
        keep = dict(keep)
        for space, node in self.derived.items():
            masks = [keep.get(self.of[i], torch.ones(shapes[i][0], dtype=torch.bool)) for i in node.inputs]
            padded = torch.cat([*masks, torch.tensor([constants])])  # index -1 (a constant) reads the last
            keep[space] = padded[channel_sources(node, [len(m) for m in masks])]
        return keep


def index_map(node: Node, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For an index op reading inputs of ``channels`` channels: which input, and which channel of
    it, each output channel is (-1 and -1 for a constant channel)."""
    base = torch.tensor([0, *channels]).cumsum(0)
    out = channel_sources(node, channels)
    which = torch.searchsorted(base, out.clamp_min(0), right=True) - 1
    constant = out < 0
    return which.masked_fill(constant, -1), (out - base[which]).masked_fill(constant, -1)


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
    flat: set[str] = set()  # nodes whose values are flattened features, not channels
    for node in graph.nodes:
        parent[node.name] = node.name
        if node.op == "flatten" or flow(node) != "new" and any(i in flat for i in node.inputs):
            flat.add(node.name)
        if flow(node) in ("same", "tied"):
            for i in node.inputs:
                union(node.name, i)
        if node.op in ("input", "linear"):
            keep_whole([node.name], "the input" if node.op == "input" else "a linear layer's output")
        if node.attrs.get("logits"):  # a head over the model's logits: each channel is a class's logit
            keep_whole(node.inputs, "the model's logits")
        if _moved(node, perm):
            keep_whole([node.name, *node.inputs], "channels not on dim 1 (channels-last)")
        if node.op != "input" and flow(node) == "whole":
            keep_whole([node.name, *node.inputs], REGISTRY[node.op].reason(node))
    keep_whole([graph.output], "the model's output")

    roots = sorted({find(n.name) for n in graph.nodes}, key=[n.name for n in graph.nodes].index)
    ids = {r: i for i, r in enumerate(roots)}
    of = {n.name: ids[find(n.name)] for n in graph.nodes}
    starts: dict[int, list] = {}  # space -> the nodes whose channels it starts with (not taken from an input)
    for node in graph.nodes:
        if flow(node) not in ("same", "tied"):
            starts.setdefault(of[node.name], []).append(node)
    derived = {}
    for node in graph.nodes:
        if flow(node) == "index":
            if any(i in flat for i in node.inputs):  # features, not channels
                keep_whole([node.name, *node.inputs], f"{node.op} of flattened features")
            elif len(starts[of[node.name]]) == 1:
                derived[of[node.name]] = node
            else:
                keep_whole([node.name, *node.inputs], f"{node.op} tied to other channels")
    relus: dict[int, list[str]] = {}
    for node in graph.nodes:
        if node.op in _ACTIVATIONS:
            relus.setdefault(of[node.name], []).append(node.name)

    # After the fill: a space's ReLUs, nodes of the space all of whose inputs are after it, and derived
    # spaces (their removed channels are constants computed from constants).
    after: set[str] = set()
    for node in graph.nodes:
        carried = flow(node) in ("same", "tied")
        if of[node.name] in derived or node.op in _ACTIVATIONS or \
                (carried and node.inputs and all(i in after for i in node.inputs)):
            after.add(node.name)
    why: dict[int, str] = {}
    for n, reason in whole.items():
        why.setdefault(of[n], reason)
    for node in graph.nodes:
        for i in node.inputs:
            if of[i] != of[node.name] and i not in after:  # someone outside reads a value from before the fill
                why.setdefault(of[i], "read before its activation")
    for space, node in reversed(derived.items()):  # a derived space kept whole keeps its sources whole
        if space in why:
            for i in node.inputs:
                why.setdefault(of[i], f"read by {node.op} {node.name!r}, kept whole")
    derived = {s: n for s, n in derived.items() if s not in why}
    prunable = set(relus) - set(why) - set(derived)
    streams = {of[n.name] for n in graph.nodes if n.op == "add"}
    return Spaces(of, prunable, relus, streams, {s: why[s] for s in sorted(relus) if s in why}, derived)
