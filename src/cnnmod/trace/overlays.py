"""What a strategy adds to its parent's layers, as overlays of the graph (ops.py: mask, bitmask,
fill, addmap).

The paper strategy masks elements (``bitmask``: the keep-mask packed as bits, with its shape); the
channels strategy first replaces removed channels by constants (``fill``), then, once they are
physically removed, adds what they contributed (``addmap``). ``overlaid`` builds such a network
from the parent's graph and tensors, ``overlay_maps`` reads its overlays back by layer (masks as
bools, whichever way they are stored), and ``plain`` strips them (module files store the two apart).
"""

from __future__ import annotations

import torch

from ..bits import pack, unpack
from .graph import Graph, Node
from .network import GraphNetwork
from .ops import REGISTRY


def overlaid(graph: Graph, weights: dict[str, torch.Tensor], *, masks: dict[str, torch.Tensor] | None = None,
             fills: dict[str, torch.Tensor] | None = None, addmaps: dict[str, torch.Tensor] | None = None,
             packed: bool = True, bitmasks: dict[str, tuple[torch.Tensor, tuple]] | None = None) -> GraphNetwork:
    """A network running ``graph`` with ``weights``, and on layer L's output, in this order: ``addmaps[L]``
    added, then elements where ``masks[L]`` is False replaced by ``fills[L]`` (or zeroed, without a fill).
    A mask without a fill is kept as bits unless ``packed=False``; ``bitmasks[L]`` gives one already
    packed (``bits.pack`` of the flattened mask, and its shape)."""
    masks, fills, addmaps, bitmasks = masks or {}, fills or {}, addmaps or {}, bitmasks or {}
    if not fills.keys() <= masks.keys():
        raise ValueError(f"a fill needs its mask; layers {sorted(fills.keys() - masks.keys())} have none")
    tensors, nodes = dict(weights), []
    for node in graph.nodes:
        then, name = list(node.then), node.name
        if name in addmaps:
            then.append("addmap")
            tensors[f"{name}.addmap"] = addmaps[name].float()
        if name in fills:
            then.append("fill")
            tensors[f"{name}.mask"], tensors[f"{name}.fill"] = masks[name].bool(), fills[name].float()
        elif name in bitmasks or (name in masks and packed):
            bits, shape = bitmasks[name] if name in bitmasks else (pack(masks[name].bool().flatten()),
                                                                   masks[name].shape)
            then.append("bitmask")
            tensors[f"{name}.bits"] = bits
            tensors[f"{name}.shape"] = torch.tensor(tuple(shape), dtype=torch.int64)
        elif name in masks:
            then.append("mask")
            tensors[f"{name}.mask"] = masks[name].bool()
        nodes.append(Node(name, node.op, node.inputs, node.attrs, then))
    return GraphNetwork(Graph(nodes, graph.output), tensors)


def overlay_maps(net: GraphNetwork, kind: str) -> dict[str, torch.Tensor]:
    """The ``kind`` ("mask", "fill" or "addmap") tensor of each layer that has one; a bitmask is
    read as the bool mask it packs."""
    found = {}
    for n in net.graph.nodes:
        if kind == "mask" and "bitmask" in n.then:
            shape = net.weight(f"{n.name}.shape").tolist()
            found[n.name] = unpack(net.weight(f"{n.name}.bits"), int(torch.tensor(shape).prod())).view(shape)
        elif any(kind in REGISTRY[o].params for o in n.then):
            found[n.name] = net.weight(f"{n.name}.{kind}")
    return found


def set_mask(net: GraphNetwork, layer: str, mask: torch.Tensor) -> None:
    """Bind layer ``layer``'s mask (a bool tensor) to ``mask``, in the form the network keeps it."""
    if "bitmask" in net.graph.by_name[layer].then:
        net.set_weight(f"{layer}.bits", pack(mask.bool().flatten()))
    else:
        net.set_weight(f"{layer}.mask", mask.bool())


def plain(net: GraphNetwork) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The network's graph and tensors without its overlays (the parent's layers, as modified)."""
    graph = Graph([Node(n.name, n.op, n.inputs, n.attrs) for n in net.graph.nodes], net.graph.output)
    overlay_keys = {f"{n.name}.{role}" for n in net.graph.nodes for o in n.then for role in REGISTRY[o].params}
    return graph, {k: v for k, v in net.weights().items() if k not in overlay_keys}


def unpacked(net: GraphNetwork) -> GraphNetwork:
    """The same network with its bitmasks as bool masks (for an ONNX export: ONNX cannot unpack bits)."""
    if not any("bitmask" in n.then for n in net.graph.nodes):
        return net
    graph, weights = plain(net)
    return overlaid(graph, weights, masks=overlay_maps(net, "mask"), fills=overlay_maps(net, "fill"),
                    addmaps=overlay_maps(net, "addmap"), packed=False)
