"""The activations of the registry (ops.py): the layers whose output elements the paper strategy
observes and may mask, each with its exact zero region where it has one (see ops.py's docstring)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ops import Op, _elementwise, register


def _activation(name: str, fn: Callable, aten: tuple, zero_region: str = "") -> None:
    register(Op(name, lambda node, xs, w: fn(xs[0]), activation=True, zero_region=zero_region,
                aten=aten + tuple(a + "_" for a in aten), backtrack=_elementwise))


_activation("relu", F.relu, ("relu",), zero_region="x <= 0")
_activation("hardswish", F.hardswish, ("hardswish",), zero_region="x <= -3")
_activation("hardsigmoid", F.hardsigmoid, ("hardsigmoid",), zero_region="x <= -3")
_activation("silu", F.silu, ("silu",))
_activation("sigmoid", torch.sigmoid, ("sigmoid",))
_activation("tanh", torch.tanh, ("tanh",))
_activation("mish", F.mish, ("mish",))


def _bounds(call) -> tuple:
    if call.aten.startswith("hardtanh"):
        return float(call.arg("min_val")), float(call.arg("max_val"))
    if call.aten.startswith("clamp_m"):
        value = float(call.arg("min" if "min" in call.aten else "max"))
        return (value, None) if "min" in call.aten else (None, value)
    low, high = call.arg("min", None), call.arg("max", None)
    return None if low is None else float(low), None if high is None else float(high)


_CLAMPS = ("hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")
register(Op("relu6", lambda node, xs, w: F.relu6(xs[0]), activation=True, zero_region="x <= 0",
            aten=("relu6", "relu6_") + _CLAMPS, backtrack=_elementwise,
            capture=lambda call: {} if call.aten.startswith("relu6") or _bounds(call) == (0.0, 6.0) else None))
register(Op("clamp", lambda node, xs, w: torch.clamp(xs[0], node.attrs["min"], node.attrs["max"]), activation=True,
            zero_region="x <= 0 when min is 0", aten=_CLAMPS, backtrack=_elementwise,
            capture=lambda call: dict(zip(("min", "max"), _bounds(call)))))
# GELU and LeakyReLU carry an attribute (the approximation, the slope): registered in full.
register(Op("gelu", lambda node, xs, w: F.gelu(xs[0], approximate=node.attrs["approximate"]), activation=True,
            aten=("gelu", "gelu_"), capture=lambda call: dict(approximate=call.arg("approximate")),
            backtrack=_elementwise))
register(Op("leaky_relu", lambda node, xs, w: F.leaky_relu(xs[0], node.attrs["negative_slope"]), activation=True,
            aten=("leaky_relu", "leaky_relu_"), backtrack=_elementwise,
            capture=lambda call: dict(negative_slope=float(call.arg("negative_slope")))))
