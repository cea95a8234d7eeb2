"""Channel spaces: which layers' channels are one and the same, derived from the traced graph.

Element-wise layers (BatchNorm, activations, pooling, flatten) and depthwise convolutions keep
their input's channels; a residual ``add`` and squeeze-excitation's ``x * gate`` tie their
inputs' channels together; any other convolution or a linear layer starts new ones. A
channel can be removed from a module only as a whole *space*: from every layer of it at once.

A space is *prunable* when removing a channel and putting a constant in its place (what the
``channels`` strategy does at the space's ReLUs) is exactly what every reader outside the space
sees: each reader (a convolution, a linear layer, a concat, the output) must read a node that
comes after the space's activations.

A space that starts at a concatenation, a channel split or a channel shuffle (ops whose channels
are ``index``: each output channel is one input channel) is *derived*: which of its channels a
module keeps follows from the spaces it reads (``Spaces.expand``), and its removed channels are
constants already, computed from their sources' constants. A derived space that is also tied to
other channels (an add with a convolution's output), or kept whole for another reason, keeps its
sources whole. Spaces of the input, of linear layers' outputs, those touching a grouped (not
depthwise) convolution, LayerNorm or a permute are kept whole (their channels would need
bookkeeping across groups or layouts); ``Spaces.whole`` says why for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graph import Graph, Node
from .ops import REGISTRY, ops_where

_SAME_CHANNELS = ops_where(channels="same")  # BatchNorm, activations, pooling, flatten, identity
_TIED = ops_where(channels="tied")  # add, mul: both inputs' channels are one space
_ACTIVATIONS = ops_where(activation=True)
_INDEX = ops_where(channels="index")  # cat, chunk, shuffle, select: each output channel is an input channel


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

    def expand(self, keep: dict[int, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[int, torch.Tensor]:
        """``keep`` (a bool per channel of some spaces) with the derived spaces' keeps added."""
        keep = dict(keep)
        for space, node in self.derived.items():
            masks = [keep.get(self.of[i], torch.ones(shapes[i][0], dtype=torch.bool)) for i in node.inputs]
            keep[space] = torch.cat(masks)[_sources(node, [len(m) for m in masks])]
        return keep


def _sources(node: Node, channels: list[int]) -> torch.Tensor:
    """For an index op reading inputs of ``channels`` channels: each output channel's position among
    all the inputs' channels side by side (found by running the op on channel labels: exact below 2**24)."""
    labels = torch.arange(sum(channels), dtype=torch.float32).split(channels)
    return REGISTRY[node.op].run(node, [t.view(1, -1, 1, 1) for t in labels], None).flatten().long()


def index_map(node: Node, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For an index op reading inputs of ``channels`` channels: which input, and which channel of
    it, each output channel is."""
    base = torch.tensor([0, *channels]).cumsum(0)
    out = _sources(node, channels)
    which = torch.searchsorted(base, out, right=True) - 1
    return which, out - base[which]


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
        if node.op == "conv" and node.attrs.get("groups", 1) != 1 and not node.attrs.get("depthwise"):
            keep_whole([node.name, *node.inputs], "a grouped or depthwise convolution")
    keep_whole([graph.output], "the model's output")

    roots = sorted({find(n.name) for n in graph.nodes}, key=[n.name for n in graph.nodes].index)
    ids = {r: i for i, r in enumerate(roots)}
    of = {n.name: ids[find(n.name)] for n in graph.nodes}
    starts: dict[int, list] = {}  # space -> the nodes whose channels it starts with (not taken from an input)
    for node in graph.nodes:
        if not (node.op in _SAME_CHANNELS or node.op in _TIED or node.attrs.get("depthwise")):
            starts.setdefault(of[node.name], []).append(node)
    derived = {}
    for node in graph.nodes:
        if node.op in _INDEX:
            if any(graph.by_name[i].op == "flatten" for i in node.inputs):  # features, not channels
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
        carried = node.op in _SAME_CHANNELS | _TIED or node.attrs.get("depthwise")
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
