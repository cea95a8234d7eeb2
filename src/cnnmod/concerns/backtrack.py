"""Propagate removed features backwards to the observed layers that produce them (MC-BLN).

Rules (paper section 3.4, with the ambiguities resolved so that a removed feature becomes
exactly zero): flatten maps a feature to its (channel, row, column); global pooling maps it to
every position of its channel; windowed pooling removes an input position when every window
that reads it is removed; an elementwise layer (ReLU, identity, un-observed BatchNorm) passes
it through; an add passes it into both summands, a concat into the input that owns the
channel. Propagation stops at the first observed layer on each path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..trace.graph import Graph
from ..trace.ops import ops_where

PASS_THROUGH = {"identity", "bn"} | ops_where(activation=True)  # an observed activation stops it first


def backtrack_removed(graph: Graph, start: str, removed: torch.Tensor, observed: set[str],
                      shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Return, per observed layer, the elements (bool) that must be zeroed so ``start``'s go to 0."""
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
        ins = node.inputs
        if node.op in PASS_THROUGH:
            stack.append((ins[0], gone))
        elif node.op == "add":
            stack.extend((i, gone) for i in ins)
        elif node.op == "flatten":
            stack.append((ins[0], gone.reshape(shapes[ins[0]])))
        elif node.op == "cat":
            sizes = [shapes[i][0] for i in ins]
            stack.extend(zip(ins, torch.split(gone, sizes, dim=0)))
        elif node.op in ("adaptive_avgpool", "mean") and all(s == 1 for s in shapes[name][1:]):
            stack.append((ins[0], gone.reshape(-1, 1, 1).expand(shapes[ins[0]]).clone()))
        elif node.op in ("maxpool", "avgpool"):
            stack.append((ins[0], _pool_inputs_removed(gone, node.attrs, shapes[ins[0]])))
        # Anything else (input, a non-global adaptive pool): stop; nothing is removed there.
    return result


def _pool_inputs_removed(gone: torch.Tensor, attrs: dict, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Input positions read only by removed windows (C, H, W) -> (C, H_in, W_in)."""
    c = gone.shape[0]
    ones = torch.ones(c, 1, *attrs["kernel_size"])

    def coverage(mask: torch.Tensor) -> torch.Tensor:
        cov = F.conv_transpose2d(mask[None].float(), ones, stride=attrs["stride"], padding=attrs["padding"],
                                 dilation=attrs.get("dilation", [1, 1]), groups=c)[0]
        h, w = in_shape[1], in_shape[2]
        cov = cov[:, :h, :w]  # windows past the edge (ceil_mode) read nothing
        return F.pad(cov, (0, w - cov.shape[2], 0, h - cov.shape[1]))

    return (coverage(gone) > 0) & (coverage(~gone) == 0)
