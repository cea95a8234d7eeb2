"""The registry of operations: everything the pipeline needs to know about each op, in one entry.

An entry says how the op is recognised when a model is traced (its ``nn.Module`` types, its
functions and tensor-method names), which state-dict tensors it holds, how to run it (plain
torch calls, so graphs export to ONNX), how channels flow through it, and whether it is an
*activation*: a layer whose output elements the paper strategy observes and may mask.

Channel flow (``channels``), read by ``channels.py``, ``backtrack.py`` and the strategies:
- ``same``: output channel c is computed from input channel c alone (BatchNorm, activations,
  pooling, dropout); a removed channel's constant stays a constant.
- ``new``: the op mixes its input channels into new ones (convolution, linear): a space ends.
- ``tied``: an element-wise op of two tensors (add, multiply): their channels are one space.
- ``index``: each output channel is one input channel, moved (concatenation, channel split,
  channel shuffle): running the op on channel labels says which (``channels.index_map``).
- ``whole``: anything else; the space it touches is kept whole by the channels strategy.

*Overlays* (``overlay=True``) are what a strategy adds to a layer of the parent: they run on that
layer's output, in the order its node lists them (``Node.then``), with tensors keyed like the
layer's own ("<layer>.mask"). ``mask`` zeroes a module's inactive elements (the paper strategy),
``fill`` replaces removed channels by constants (the channels strategy, before extraction),
``addmap`` adds what removed inputs contributed (after extraction). A module is thus a graph and
its tensors, nothing else; the executor (network.py) only runs it.

Masking rule of the paper strategy, for every activation: an element is *inactive* for a class
when it is exactly zero on every image the class's module observed, and only inactive elements
are masked. Masking a value that was zero changes nothing, so a module's outputs on its observed
images are exactly the model's, whatever the activation. Activations with an exact zero region
(``zero_region``: ReLU and ReLU6 below 0, Hardswish and Hardsigmoid below -3) have many inactive
elements; those without one (SiLU, GELU, Sigmoid, Tanh, LeakyReLU) have almost none, so their
elements are kept (no loss, and no masking there).

Adding an activation is one ``_activation(...)`` line below and a test.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bits import unpack


@dataclass(frozen=True)
class Op:
    name: str
    run: Callable  # (node, inputs: list[Tensor], weight: name -> Tensor | None) -> Tensor
    channels: str = "same"  # same | new | tied | index | whole (module docstring)
    params: tuple[str, ...] = ()  # state-dict tensors, keyed "<node name>.<param>"
    activation: bool = False  # the paper strategy observes (and may mask) its output elements
    zero_region: str = ""  # where an activation's output is exactly 0 ("x <= 0"); "" if nowhere
    modules: tuple[type, ...] = ()  # nn.Module types traced as this op
    calls: tuple = ()  # functions and tensor-method names traced as this op
    macs: Callable | None = None  # (node, output shape without batch, weight) -> multiply-accumulates per image
    overlay: bool = False  # runs on a layer's output, listed in its node's ``then`` (module docstring)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    REGISTRY[op.name] = op
    return op


def _activation(name: str, fn: Callable, modules: tuple, calls: tuple, zero_region: str = "") -> None:
    register(Op(name, lambda node, xs, w: fn(xs[0]), activation=True, zero_region=zero_region,
                modules=modules, calls=calls))


def _conv(node, xs, w):
    a, weight = node.attrs, w("weight")
    padding = a["padding"] if isinstance(a["padding"], str) else list(a["padding"])
    # A depthwise convolution of a module keeps only its kept channels: its groups follow them.
    x, groups = xs[0], xs[0].shape[1] if a.get("depthwise") else a["groups"]
    if x.shape[1] == 0:  # every channel it read was removed (half of a split): zeros of the output's shape
        x, groups = x.new_zeros(x.shape[0], 1, *x.shape[2:]), 1
        weight = weight.new_zeros(len(weight), 1, *weight.shape[2:])
    return F.conv2d(x, weight, w("bias"), a["stride"], padding, a["dilation"], groups)


register(Op("input", lambda node, xs, w: xs[0], channels="whole"))
register(Op("conv", _conv, channels="new", params=("weight", "bias"), modules=(nn.Conv2d,), calls=(F.conv2d,),
            macs=lambda node, out, weight: math.prod(out) * weight[0].numel()))  # outputs x Cin/groups*kh*kw
register(Op("bn", lambda node, xs, w: F.batch_norm(xs[0], w("running_mean"), w("running_var"), w("weight"), w("bias"),
                                                   False, 0.0, node.attrs["eps"]),
            params=("weight", "bias", "running_mean", "running_var"), modules=(nn.BatchNorm2d,), calls=(F.batch_norm,)))
register(Op("linear", lambda node, xs, w: F.linear(xs[0], w("weight"), w("bias")), channels="new",
            params=("weight", "bias"), modules=(nn.Linear,), calls=(F.linear,),
            macs=lambda node, out, weight: weight.numel() * math.prod(out[:-1])))  # out: (K,), or (H, W, K)
register(Op("add", lambda node, xs, w: xs[0] + xs[1], channels="tied",
            calls=(operator.add, operator.iadd, torch.add, "add", "add_")))
register(Op("mul", lambda node, xs, w: xs[0] * xs[1], channels="tied",
            calls=(operator.mul, operator.imul, torch.mul, "mul", "mul_")))
register(Op("cat", lambda node, xs, w: torch.cat(xs, dim=1), channels="index", calls=(torch.cat, torch.concat)))
register(Op("identity", lambda node, xs, w: xs[0],
            modules=(nn.Identity, nn.Dropout, nn.Dropout2d), calls=("contiguous",)))
register(Op("flatten", lambda node, xs, w: torch.flatten(xs[0], node.attrs["start_dim"], node.attrs["end_dim"]),
            modules=(nn.Flatten,), calls=(torch.flatten, "flatten")))
register(Op("maxpool", lambda node, xs, w: F.max_pool2d(xs[0], node.attrs["kernel_size"], node.attrs["stride"],
                                                        node.attrs["padding"], node.attrs["dilation"],
                                                        node.attrs["ceil_mode"]),
            modules=(nn.MaxPool2d,), calls=(F.max_pool2d,)))
register(Op("avgpool", lambda node, xs, w: F.avg_pool2d(xs[0], node.attrs["kernel_size"], node.attrs["stride"],
                                                        node.attrs["padding"], node.attrs["ceil_mode"],
                                                        node.attrs["count_include_pad"]),
            modules=(nn.AvgPool2d,), calls=(F.avg_pool2d,)))
register(Op("adaptive_avgpool", lambda node, xs, w: F.adaptive_avg_pool2d(xs[0], node.attrs["output_size"]),
            modules=(nn.AdaptiveAvgPool2d,), calls=(F.adaptive_avg_pool2d,)))
register(Op("mean", lambda node, xs, w: xs[0].mean(dim=(2, 3), keepdim=node.attrs["keepdim"]), calls=("mean",)))

register(Op("permute", lambda node, xs, w: xs[0].permute(node.attrs["dims"]), channels="whole",
            calls=(torch.permute, "permute")))
register(Op("layer_norm", lambda node, xs, w: F.layer_norm(xs[0], node.attrs["normalized_shape"], w("weight"),
                                                           w("bias"), node.attrs["eps"]),
            channels="whole", params=("weight", "bias"), modules=(nn.LayerNorm,), calls=(F.layer_norm,)))


def _shuffle(node, xs, w):
    b, c, h, wd = xs[0].shape
    g = node.attrs["groups"]
    return xs[0].reshape(b, g, c // g, h, wd).transpose(1, 2).reshape(b, c, h, wd)


# ShuffleNet's channel split (x.chunk(2, dim=1)[i]) and channel shuffle (view, transpose, view), and
# what a module holds in their place once channels are removed: the kept channels, picked by index.
register(Op("chunk", lambda node, xs, w: xs[0].chunk(node.attrs["chunks"], 1)[node.attrs["index"]], channels="index"))
register(Op("shuffle", _shuffle, channels="index"))
register(Op("select", lambda node, xs, w: xs[0][:, node.attrs["index"]], channels="index"))
# x times a parameter, reshaped to broadcast (ConvNeXt's layer scale): kept whole, as its parameter is
# sliced by no strategy yet.
register(Op("scale", lambda node, xs, w: xs[0] * w("weight").reshape(node.attrs["shape"]), channels="whole",
            params=("weight",)))

_activation("relu", F.relu, (nn.ReLU,), (F.relu, torch.relu, "relu", "relu_"), zero_region="x <= 0")
_activation("relu6", F.relu6, (nn.ReLU6,), (F.relu6,), zero_region="x <= 0")
_activation("hardswish", F.hardswish, (nn.Hardswish,), (F.hardswish,), zero_region="x <= -3")
_activation("hardsigmoid", F.hardsigmoid, (nn.Hardsigmoid,), (F.hardsigmoid,), zero_region="x <= -3")
_activation("silu", F.silu, (nn.SiLU,), (F.silu,))
_activation("sigmoid", torch.sigmoid, (nn.Sigmoid,), (torch.sigmoid, F.sigmoid, "sigmoid"))
_activation("tanh", torch.tanh, (nn.Tanh,), (torch.tanh, F.tanh, "tanh"))
_activation("mish", F.mish, (nn.Mish,), (F.mish,))
# GELU and LeakyReLU carry an attribute (the approximation, the slope): registered in full.
register(Op("gelu", lambda node, xs, w: F.gelu(xs[0], approximate=node.attrs["approximate"]), activation=True,
            modules=(nn.GELU,), calls=(F.gelu,)))
register(Op("leaky_relu", lambda node, xs, w: F.leaky_relu(xs[0], node.attrs["negative_slope"]), activation=True,
            modules=(nn.LeakyReLU,), calls=(F.leaky_relu,)))


# A strategy's overlays (see the module docstring); "mask" is a bool keep-mask, "bitmask" the same
# packed as bits (a paper-strategy module of a ResNet-50 at 224 px: 1.2 MB instead of 9.6 MB) with
# its shape, the others float32.
register(Op("mask", lambda node, xs, w: xs[0] * w("mask"), params=("mask",), overlay=True))
def _bitmask(node, xs, w):
    shape = xs[0].shape[1:]
    return xs[0] * unpack(w("bits"), math.prod(shape)).view(shape)


register(Op("bitmask", _bitmask, params=("bits", "shape"), overlay=True))
register(Op("fill", lambda node, xs, w: torch.where(w("mask"), xs[0], w("fill")), params=("mask", "fill"),
            overlay=True))
register(Op("addmap", lambda node, xs, w: xs[0] + w("addmap"), params=("addmap",), overlay=True))


def weight_keys(node, overlays: bool = True) -> dict[str, str]:
    """The state-dict key of each tensor a node uses, by role ("weight" -> "layer1.0.conv1.weight").

    A layer's tensors are keyed "<node name>.<role>"; a ``scale`` node names its parameter itself
    (ConvNeXt's ``layer_scale``, timm's ``gamma``). With ``overlays``, its overlays' tensors too.
    """
    keys = {"weight": node.attrs["param"]} if node.op == "scale" else \
        {p: f"{node.name}.{p}" for p in REGISTRY[node.op].params}
    for overlay in node.then if overlays else ():
        keys.update({p: f"{node.name}.{p}" for p in REGISTRY[overlay].params})
    return keys


def ops_where(**wanted) -> set[str]:
    """The names of the ops whose fields equal ``wanted`` (``ops_where(channels="same")``)."""
    return {o.name for o in REGISTRY.values() if all(getattr(o, k) == v for k, v in wanted.items())}


PARAMS = {o.name: o.params for o in REGISTRY.values() if o.params and not o.overlay}
