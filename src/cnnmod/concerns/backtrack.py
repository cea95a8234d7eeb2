"""Propagate removed features backwards to the observed layers that produce them (MC-BLN).

Rules (paper section 3.4, with the ambiguities resolved so that a removed feature becomes
exactly zero), each op's own in the registry (``Op.backtrack``, trace/ops.py): flatten maps a
feature to its (channel, row, column); global pooling maps it to every position of its channel;
windowed pooling removes an input position when every window that reads it is removed; an
elementwise layer (ReLU, identity, un-observed BatchNorm) passes it through; an add passes it into
both summands; ops that only move elements (concatenation, slices, padding, channel shuffles) into
the input element it came from. Propagation stops at the first observed layer on each path, and
at an op that cannot be seen through (a convolution, an upsampling, a gate): such a stop is
reported (``stopped``), never silent.
"""

from __future__ import annotations

import torch

from ..trace.graph import Graph
from ..trace.ops import REGISTRY


def backtrack_removed(graph: Graph, start: str, removed: torch.Tensor, observed: set[str],
                      shapes: dict[str, tuple[int, ...]], stopped: dict[str, str] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Return, per observed layer, the elements (bool) that must be zeroed so ``start``'s go to 0.

    ``stopped``, if given, receives each layer where removed elements could not be followed
    further, with the reason (their features stay: nothing is removed there).
    """
    result: dict[str, torch.Tensor] = {}
    stack = [(start, removed)]
    while stack:
        name, gone = stack.pop()
        if not gone.any():
            continue
        if name in observed:
            result[name] = result[name] | gone if name in result else gone.clone()
            continue
        node = graph.by_name[name]
        hook = REGISTRY[node.op].backtrack
        found = hook(node, gone, shapes) if hook is not None else None
        if found is None:
            if stopped is not None and node.op != "input":
                stopped.setdefault(name, f"MC-BLN cannot see through {node.op} {name!r}")
            continue
        stack.extend(found)
    return result
