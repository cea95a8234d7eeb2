"""One shared trunk for modules of one parent: the layers they hold identically run once.

Modules of the ``channels`` strategy built with ``--trunk`` prune the first part of the parent
alike for every class, so their networks agree, tensor for tensor, on those layers. Composing
them, we find the layers that every module of a group computes identically (same operation,
same weights, masks, fills and added constants, and only such layers as inputs), run them once,
and hand their values to each module's remaining layers (its branch). Exact by construction:
every module receives the values it would have computed itself (tested against running the
modules one by one).

Why not a trunk holding the union of the modules' channels: after the first pruned layer, a
channel of module A and the same channel of module B are different computations (each reads only
its own kept channels, and its removed channels were compensated by its own closed-form re-fit),
so a union network would change every module's answers. Sharing what is identical keeps each
module's file the whole truth about what it computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..trace.ops import REGISTRY, weight_keys
from ..trace.network import GraphNetwork
from ..trace.overlays import plain


@dataclass
class Group:
    """Modules (indices into the composition) that read one input preparation, and their trunk."""

    members: list[int]
    trunk: set[str]  # layers run once for the whole group (empty: nothing shared)
    branch: set[str]  # the other layers, run per module


def _tensors(net: GraphNetwork, name: str) -> dict[str, torch.Tensor]:
    """A layer's tensors by role, its overlays' included."""
    found = {p: net.weight(k) for p, k in weight_keys(net.graph.by_name[name]).items()}
    return {k: v for k, v in found.items() if v is not None}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def shared_layers(nets: list[GraphNetwork]) -> set[str]:
    """The layers every network of ``nets`` computes identically from identical inputs."""
    graphs = {json.dumps(plain(n)[0].to_dict(), sort_keys=True) for n in nets}  # overlays: per layer
    if len(nets) < 2 or len(graphs) > 1:
        return set()
    first, shared = nets[0], set()
    for node in first.graph.nodes:
        if node.name == first.graph.output or not all(i in shared for i in node.inputs):
            continue
        mine = _tensors(first, node.name)
        if all(other.graph.by_name[node.name].then == node.then and _same(mine, _tensors(other, node.name))
               for other in nets[1:]):
            shared.add(node.name)
    return shared


def group_modules(modules, networks: list[GraphNetwork]) -> list[Group]:
    """Group modules by input preparation and parent; find each group's shared trunk.

    A trunk that holds no layer with weights (only the input node) is not worth a separate run.
    """
    keys: dict = {}
    for k, m in enumerate(modules):
        keys.setdefault((m.input_spec, m.meta.get("parent_fingerprint")), []).append(k)
    groups = []
    for members in keys.values():
        nets = [networks[k] for k in members]
        trunk = shared_layers(nets)
        if not any(REGISTRY[n.op].params for n in nets[0].graph.nodes if n.name in trunk):
            trunk = set()
        branch = {n.name for n in nets[0].graph.nodes} - trunk
        groups.append(Group(members, trunk, branch))
    return groups


def run_group(group: Group, networks: list[GraphNetwork], x: torch.Tensor, after=None) -> list[torch.Tensor]:
    """Each member's output on ``x`` (prepared for the group), the trunk run once.

    ``after(member, name, output)``, if given, sees each layer's output as it is computed (``member``
    None for the trunk's layers, computed once for all members)."""
    def seen(member):
        return None if after is None else (lambda name, out: after(member, name, out))

    if not group.trunk:
        return [networks[k](x, after=seen(k)) for k in group.members]
    first = networks[group.members[0]]
    frontier = first.run_all(x, keep=False, only=group.trunk, after=seen(None))  # the values branches read
    output = first.graph.output
    return [networks[k].run_all(x, keep=False, only=group.branch, given=frontier, after=seen(k))[output]
            for k in group.members]
