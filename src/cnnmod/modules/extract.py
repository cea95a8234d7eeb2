"""Physical extraction: turn a network with whole channels removed into a smaller network.

Input: a ``GraphNetwork`` whose removed channels are replaced by constants at their space's
ReLUs (``fills``), and which channels each space keeps. Output: a network holding only the
kept weights (smaller convolutions, BatchNorms and linear layers) that computes the same
logits. Exact, because convolutions and linear layers are linear: what a reader received from
the removed channels is the same constant for every input, so it is computed once (on a blank
input) and added to the reader's output (``addmaps``), padding borders included.

Why not Torch-Pruning: it removes channels and their dependent weights well, but it edits the
user's ``nn.Module`` in place and drops the removed channels' contribution (zero, not our
constant), so its result would need this correction anyway; our graph already knows every
reader of every channel, and the extracted network must be a data-only ``GraphNetwork`` to be
stored in a module file without code.
"""

from __future__ import annotations

import torch

from ..trace.channels import Spaces, index_map
from ..trace.graph import PARAMS, Graph, Node
from ..trace.network import GraphNetwork
from ..trace.overlays import overlaid
from ..trace.ops import REGISTRY, weight_keys


@torch.no_grad()
def extract(net: GraphNetwork, spaces: Spaces, keep: dict[int, torch.Tensor],
            input_shape: tuple[int, ...]) -> GraphNetwork:
    """Return the physically smaller network; ``keep[space]`` is a bool per channel of that space
    (derived spaces, those after a concatenation, split or shuffle, follow from the others)."""
    graph = net.graph
    values = net.run_all(torch.zeros(1, *input_shape))  # removed channels hold their constants here
    keep = spaces.expand(keep, {k: tuple(v.shape[1:]) for k, v in values.items()})
    w = net.weights()
    new: dict[str, torch.Tensor] = {}
    addmaps: dict[str, torch.Tensor] = {}
    nodes = []

    def kept(node_name: str) -> torch.Tensor | None:
        k = keep.get(spaces.of[node_name])
        return None if k is None or bool(k.all()) else k.nonzero().flatten()

    for node in graph.nodes:
        name, op = node.name, REGISTRY[node.op]
        flow = op.flow(node)
        tensors = {role: w[key] for role, key in weight_keys(node, overlays=False).items() if key in w}
        if flow == "new":  # a convolution or a linear layer
            k_in, k_out = kept(node.inputs[0]), kept(name)
            if k_out is not None:  # its output channels: the weight's rows, the bias
                tensors = {role: t[k_out] for role, t in tensors.items()}
            if k_in is not None:  # its input channels: the weight's columns; what they gave becomes a constant
                source = values[node.inputs[0]]
                per_channel = source[0].numel() // keep[spaces.of[node.inputs[0]]].numel()  # a flattened (C, H, W)
                cols = k_in if node.op != "linear" else \
                    (k_in[:, None] * per_channel + torch.arange(per_channel)).flatten()
                removed_only = source.clone()
                removed_only[:, cols] = 0
                addmaps[name] = op.run(node, [removed_only], {"weight": tensors["weight"]}.get)[0]
                tensors["weight"] = tensors["weight"][:, cols]
        elif tensors and flow == "same":  # per channel: BatchNorm, a depthwise convolution
            k = kept(name)
            tensors = tensors if k is None else {role: t[k] for role, t in tensors.items()}
        # else: LayerNorm, a layer scale: their spaces are kept whole, their tensors stay as they are
        new.update({weight_keys(node, overlays=False)[role]: t for role, t in tensors.items()})
        if flow == "index" and len(node.inputs) == 1 and (kept(name) is not None
                                                                 or kept(node.inputs[0]) is not None):
            node = _select(node, keep, spaces, values)  # a slice, shuffle or padding of fewer channels: the kept ones
        nodes.append(node)
    # The removed channels are gone: no fills; the graph's overlays are replaced by the added constants.
    return overlaid(Graph([Node(n.name, n.op, n.inputs, n.attrs) for n in nodes], graph.output), new, addmaps=addmaps)


def _select(node: Node, keep: dict[int, torch.Tensor], spaces: Spaces, values: dict) -> Node:
    """A ``select`` node picking, from the module's (pruned) input, the channels ``node`` keeps."""
    k_in = keep.get(spaces.of[node.inputs[0]], torch.ones(values[node.inputs[0]].shape[1], dtype=torch.bool))
    k_out = keep[spaces.of[node.name]]
    which, channel = index_map(node, [len(k_in)])
    position = k_in.long().cumsum(0) - 1  # where each kept input channel sits in the module's input
    return Node(node.name, "select", list(node.inputs), {"index": position[channel[k_out]].tolist()})


@torch.no_grad()
def fold_batchnorm(net: GraphNetwork) -> GraphNetwork:
    """Fold each BatchNorm that alone reads a convolution into that convolution (inference only).

    BN(conv(x) + A) = s * conv(x) + s * A + (beta - s * mean), s = gamma / sqrt(var + eps): the
    convolution's weights and bias are scaled per output channel, its added constants
    (``addmaps``) too, and the BatchNorm becomes an identity. Equal up to float rounding (computed
    in float64); saves one pass over every such activation (about 7% of a ResNet-20 on a CPU).
    Every module of one parent folds identical layers identically, so a shared trunk stays shared.
    """
    graph, w = net.graph, net.weights()
    nodes, new = [], dict(w)
    for node in graph.nodes:
        conv = graph.by_name[node.inputs[0]] if node.op == "bn" else None
        if conv is None or conv.op != "conv" or net.readers(conv.name) != {node.name} \
                or set(conv.then) - {"addmap"} or node.then:  # masked or filled: not a plain affine map
            nodes.append(node)
            continue
        mean, var = w[f"{node.name}.running_mean"].double(), w[f"{node.name}.running_var"].double()
        gamma, beta, bias = (w.get(f"{name}.{p}") for name, p in
                             ((node.name, "weight"), (node.name, "bias"), (conv.name, "bias")))
        s = (1.0 if gamma is None else gamma.double()) / (var + node.attrs["eps"]).sqrt()
        bias = 0.0 if bias is None else bias.double()
        new[f"{conv.name}.weight"] = (w[f"{conv.name}.weight"].double() * s.view(-1, 1, 1, 1)).float()
        new[f"{conv.name}.bias"] = ((bias - mean) * s + (0.0 if beta is None else beta.double())).float()
        if "addmap" in conv.then:
            new[f"{conv.name}.addmap"] = (w[f"{conv.name}.addmap"].double() * s.view(-1, 1, 1)).float()
        for p in PARAMS["bn"]:
            new.pop(f"{node.name}.{p}", None)
        nodes.append(Node(node.name, "identity", list(node.inputs), {}))
    return GraphNetwork(Graph(nodes, graph.output), new)


def layer_macs(node, out_shape: tuple[int, ...], weight: torch.Tensor) -> int:
    """Multiply-accumulates per image of a layer, as its registry entry counts them (0 if it has none)."""
    count = REGISTRY[node.op].macs
    return 0 if count is None else count(node, out_shape, weight)


@torch.no_grad()
def cost(net: GraphNetwork, input_shape: tuple[int, ...], nodes: set[str] | None = None) -> dict[str, int]:
    """Parameters (weights and biases, BatchNorm's affine pair) and multiply-accumulates per image
    (of the layers ``nodes`` only, if given: a shared trunk or a module's branch)."""
    values = net.run_all(torch.zeros(1, *input_shape))
    w = net.weights()
    keys = {k for node in net.graph.nodes if nodes is None or node.name in nodes
            for role, k in weight_keys(node, overlays=False).items() if role not in ("running_mean", "running_var")}
    params = sum(w[k].numel() for k in keys if k in w)
    macs = 0
    for node in net.graph.nodes:
        if nodes is not None and node.name not in nodes:
            continue
        if REGISTRY[node.op].macs is not None:
            macs += layer_macs(node, tuple(values[node.name].shape[1:]), w[f"{node.name}.weight"])
    return {"params": int(params), "macs": int(macs)}
