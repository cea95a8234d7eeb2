"""What a strategy adds to its parent's layers, as overlays of the graph (ops.py: mask, fill, addmap).

The paper strategy masks elements (``mask``); the channels strategy first replaces removed channels
by constants (``fill``), then, once they are physically removed, adds what they contributed
(``addmap``). ``overlaid`` builds such a network from the parent's graph and tensors, ``overlay_maps``
reads its overlays back by layer, and ``plain`` strips them (module files store the two apart).
"""

from __future__ import annotations

import torch

from .graph import Graph, Node
from .network import GraphNetwork
from .ops import REGISTRY


def overlaid(graph: Graph, weights: dict[str, torch.Tensor], *, masks: dict[str, torch.Tensor] | None = None,
             fills: dict[str, torch.Tensor] | None = None,
             addmaps: dict[str, torch.Tensor] | None = None) -> GraphNetwork:
    """A network running ``graph`` with ``weights``, and on layer L's output, in this order: ``addmaps[L]``
    added, then elements where ``masks[L]`` is False replaced by ``fills[L]`` (or zeroed, without a fill)."""
    masks, fills, addmaps = masks or {}, fills or {}, addmaps or {}
    if not fills.keys() <= masks.keys():
        raise ValueError(f"a fill needs its mask; layers {sorted(fills.keys() - masks.keys())} have none")
    tensors, nodes = dict(weights), []
    for node in graph.nodes:
        then = list(node.then)
        if node.name in addmaps:
            then.append("addmap")
            tensors[f"{node.name}.addmap"] = addmaps[node.name].float()
        if node.name in masks:
            then.append("fill" if node.name in fills else "mask")
            tensors[f"{node.name}.mask"] = masks[node.name].bool()
            if node.name in fills:
                tensors[f"{node.name}.fill"] = fills[node.name].float()
        nodes.append(Node(node.name, node.op, node.inputs, node.attrs, then))
    return GraphNetwork(Graph(nodes, graph.output), tensors)


def overlay_maps(net: GraphNetwork, kind: str) -> dict[str, torch.Tensor]:
    """The ``kind`` ("mask", "fill" or "addmap") tensor of each layer that has one."""
    return {n.name: net.weight(f"{n.name}.{kind}") for n in net.graph.nodes
            if any(kind in REGISTRY[o].params for o in n.then)}


def plain(net: GraphNetwork) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The network's graph and tensors without its overlays (the parent's layers, as modified)."""
    graph = Graph([Node(n.name, n.op, n.inputs, n.attrs) for n in net.graph.nodes], net.graph.output)
    overlay_keys = {f"{n.name}.{role}" for n in net.graph.nodes for o in n.then for role in REGISTRY[o].params}
    return graph, {k: v for k, v in net.weights().items() if k not in overlay_keys}

