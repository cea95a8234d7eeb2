"""The registry of operations: everything the pipeline needs to know about each op, in one entry.

An entry says how the op is recognised when a model is captured (``aten``: the ATen operations
torch.export records for it, and ``capture``: its attributes read off the captured call, or None
when the call is another op's), which state-dict tensors it holds, how to run it (plain torch
calls, so graphs export to ONNX), how channels flow through it, how MC-BLN back-tracks through it,
and whether it is an *activation*: a layer whose output elements the paper strategy observes and
may mask. Capture (capture.py), back-tracking, extraction and the channel spaces read only this.

Channel flow (``channels``: a class, or a function of the node giving one), read by
``channels.py``, ``extract.py`` and the strategies:
- ``same``: output channel c is computed from input channel c alone (BatchNorm, activations,
  pooling, a depthwise convolution, spatial slices, padding and upsampling); a removed channel's
  constant stays independent of the input (a constant map), and a per-channel tensor is sliced
  with the channels.
- ``new``: the op mixes its input channels into new ones (convolution, linear): a space ends.
- ``tied``: an element-wise op of two tensors (add, multiply): their channels are one space.
- ``index``: each output channel is one input channel, moved, or a constant (concatenation,
  channel slices, channel shuffle, channel padding): running the op on channel labels says which
  (``channels.index_map``).
- ``whole``: anything else; the space it touches is kept whole by the channels strategy, for the
  reason ``why`` gives.

Back-tracking (``backtrack``, MC-BLN, concerns/backtrack.py): given which elements of the op's
output must become zero, which elements of each input to zero. ``None``: the op cannot be seen
through; back-tracking stops there and says so (never silently).

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

Adding an activation is one ``_activation(...)`` line in activations.py and a test; adding an op with
attributes is one ``register(Op(...))`` entry (GroupNorm: its entry and a test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..bits import unpack


@dataclass(frozen=True)
class Op:
    name: str
    run: Callable  # (node, inputs: list[Tensor], weight: name -> Tensor | None) -> Tensor
    channels: str | Callable = "same"  # same | new | tied | index | whole, or node -> one of them (docstring)
    params: tuple[str, ...] = ()  # state-dict tensors, keyed "<node name>.<param>"
    activation: bool = False  # the paper strategy observes (and may mask) its output elements
    zero_region: str = ""  # where an activation's output is exactly 0 ("x <= 0"); "" if nowhere
    aten: tuple[str, ...] = ()  # the ATen operations captured as this op ("conv2d", "add_")
    capture: Callable | None = None  # (call) -> attrs, or None when the call is another op's; default: {}
    backtrack: Callable | None = None  # (node, gone, shapes) -> [(input, gone there)]; None: a stop
    why: str | Callable = ""  # why a ``whole`` op keeps its spaces whole (or node -> why)
    macs: Callable | None = None  # (node, output shape without batch, weight) -> multiply-accumulates per image
    overlay: bool = False  # runs on a layer's output, listed in its node's ``then`` (module docstring)

    def flow(self, node) -> str:
        """How channels flow through ``node`` (one of the classes of the module docstring)."""
        return self.channels(node) if callable(self.channels) else self.channels

    def reason(self, node) -> str:
        """Why ``node``'s spaces are kept whole, when its flow is ``whole``."""
        why = self.why(node) if callable(self.why) else self.why
        return why or f"{self.name} (mixes or moves channels)"

    def attrs(self, call) -> dict | None:
        return {} if self.capture is None else self.capture(call)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    REGISTRY[op.name] = op
    return op


def _pair(v) -> list:
    return [int(d) for d in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _data(call, count: int) -> bool:
    """Whether the call reads ``count`` tensors of the network and no weights."""
    return len(call.data) == count and not call.params


# Back-tracking (MC-BLN): which input elements to zero so that ``gone`` output elements become 0.
def _elementwise(node, gone, shapes):
    return [(node.inputs[0], gone)]


def _into_each(node, gone, shapes):
    return [(i, gone) for i in node.inputs]


def _global(node, gone, shapes):
    """A global pooling: a removed feature is every position of its channel."""
    if not all(s == 1 for s in shapes[node.name][1:]):
        return None
    return [(node.inputs[0], gone.reshape(-1, 1, 1).expand(shapes[node.inputs[0]]).clone())]


def _pooled(node, gone, shapes):
    """Windowed pooling: an input position is removed when every window that reads it is removed."""
    a, in_shape = node.attrs, shapes[node.inputs[0]]
    ones = torch.ones(gone.shape[0], 1, *a["kernel_size"])

    def coverage(mask: torch.Tensor) -> torch.Tensor:
        cov = F.conv_transpose2d(mask[None].float(), ones, stride=a["stride"], padding=a["padding"],
                                 dilation=a.get("dilation", [1, 1]), groups=gone.shape[0])[0]
        cov = cov[:, :in_shape[1], :in_shape[2]]  # windows past the edge (ceil_mode) read nothing
        return F.pad(cov, (0, in_shape[2] - cov.shape[2], 0, in_shape[1] - cov.shape[1]))

    return [(node.inputs[0], (coverage(gone) > 0) & (coverage(~gone) == 0))]


def _moved_back(node, gone, shapes):
    """An op that only moves elements (slices, padding, channel maps): each output element's source
    element, found by running the op on element labels (1-based; 0 is a constant)."""
    ins = [shapes[i] for i in node.inputs]
    labels = torch.arange(1, 1 + sum(math.prod(s) for s in ins), dtype=torch.float64)
    parts = [p.view(1, *s) for p, s in zip(labels.split([math.prod(s) for s in ins]), ins)]
    source = REGISTRY[node.op].run(node, parts, None)[0].long().flatten() - 1
    flat = torch.zeros(len(labels) + 1, dtype=torch.bool)  # the last: where constants come from
    flat[source[gone.flatten()]] = True
    sizes = [math.prod(s) for s in ins]
    return [(i, g.view(s)) for i, g, s in zip(node.inputs, flat[:-1].split(sizes), ins)]


def _conv(node, xs, w):
    a, weight = node.attrs, w("weight")
    padding = a["padding"] if isinstance(a["padding"], str) else list(a["padding"])
    # A depthwise convolution of a module keeps only its kept channels: its groups follow them.
    x, groups = xs[0], xs[0].shape[1] if a.get("depthwise") else a["groups"]
    if x.shape[1] == 0:  # every channel it read was removed (half of a split): zeros of the output's shape
        x, groups = x.new_zeros(x.shape[0], 1, *x.shape[2:]), 1
        weight = weight.new_zeros(len(weight), 1, *weight.shape[2:])
    return F.conv2d(x, weight, w("bias"), a["stride"], padding, a["dilation"], groups)


def _conv_attrs(call) -> dict:
    groups, padding = int(call.arg("groups")), call.arg("padding")
    attrs = dict(stride=_pair(call.arg("stride")), dilation=_pair(call.arg("dilation")), groups=groups,
                 padding=padding if isinstance(padding, str) else _pair(padding), bias="bias" in call.params)
    if groups == call.shape("input")[0] == call.out[0] > 1:  # each output channel reads its own input channel
        attrs["depthwise"] = True
    return attrs


def _conv_flow(node) -> str:
    if node.attrs.get("depthwise"):
        return "same"
    return "whole" if node.attrs.get("groups", 1) != 1 else "new"


register(Op("input", lambda node, xs, w: xs[0], channels="whole", why="the input"))
register(Op("conv", _conv, channels=_conv_flow, params=("weight", "bias"), aten=("conv2d",), capture=_conv_attrs,
            why="a grouped or depthwise convolution",
            macs=lambda node, out, weight: math.prod(out) * weight[0].numel()))  # outputs x Cin/groups*kh*kw


def _bn_attrs(call):
    if call.arg("training"):
        call.refuse("batch_norm in training mode", "call model.eval() first")
    if "running_mean" not in call.params or "running_var" not in call.params:
        call.refuse("batch_norm without running statistics", "use nn.BatchNorm2d(track_running_stats=True)")
    return dict(eps=float(call.arg("eps")), affine="weight" in call.params)


register(Op("bn", lambda node, xs, w: F.batch_norm(xs[0], w("running_mean"), w("running_var"), w("weight"), w("bias"),
                                                   False, 0.0, node.attrs["eps"]),
            params=("weight", "bias", "running_mean", "running_var"), aten=("batch_norm",), capture=_bn_attrs,
            backtrack=_elementwise))
register(Op("linear", lambda node, xs, w: F.linear(xs[0], w("weight"), w("bias")), channels="new",
            params=("weight", "bias"), aten=("linear",), capture=lambda call: dict(bias="bias" in call.params),
            macs=lambda node, out, weight: weight.numel() * math.prod(out[:-1])))  # out: (K,), or (H, W, K)
register(Op("add", lambda node, xs, w: xs[0] + xs[1], channels="tied", aten=("add", "add_"), backtrack=_into_each,
            capture=lambda call: {} if _data(call, 2) and call.arg("alpha", 1) == 1 else None))
register(Op("sub", lambda node, xs, w: xs[0] - xs[1], channels="tied", aten=("sub", "sub_"), backtrack=_into_each,
            capture=lambda call: {} if _data(call, 2) and call.arg("alpha", 1) == 1 else None))
register(Op("mul", lambda node, xs, w: xs[0] * xs[1], channels="tied", aten=("mul", "mul_"),
            capture=lambda call: {} if _data(call, 2) else None))

# Arithmetic with a number (x * 1.0, x / 6, 1 - x): each element alone, computed as written.
_ARITHMETIC = {"add": lambda x, v: x + v, "sub": lambda x, v: x - v, "mul": lambda x, v: x * v,
               "div": lambda x, v: x / v, "rsub": lambda x, v: v - x}




def _scale_attrs(call):
    """x times (plus, minus, over) one parameter of the model, reshaped to broadcast."""
    fn = call.aten.rstrip("_")
    if not call.param or len(call.data) != 1 or call.arg("alpha", 1) != 1 or fn in ("sub", "div") and \
            call.data != ["self"]:
        return None
    attrs = dict(param=call.param, shape=call.param_shape)
    return attrs if fn == "mul" else dict(attrs, fn=fn)


# x times a parameter, reshaped to broadcast (ConvNeXt's layer scale), or plus, minus or over one (a
# normalisation inside the model): kept whole, as its parameter is sliced by no strategy yet.
register(Op("scale", lambda node, xs, w: _ARITHMETIC[node.attrs.get("fn", "mul")](
                xs[0], w("weight").reshape(node.attrs["shape"])), channels="whole", params=("weight",),
            aten=("mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_"), capture=_scale_attrs,
            why="a layer scale"))

def _arithmetic_attrs(call):
    if not _data(call, 1) or call.number is None or call.arg("rounding_mode", None) is not None:
        return None
    fn, value = call.aten.rstrip("_"), call.number
    if fn in ("add", "sub", "rsub") and call.arg("alpha", 1) != 1:
        value *= call.arg("alpha")  # x + alpha * v; rsub: v - alpha * x is refused below
        if fn == "rsub":
            return None
    return dict(fn=fn, value=float(value))


def _arithmetic_back(node, gone, shapes):
    """x * v and x / v are 0 where x is; x + v is not (unless v is 0): a stop."""
    zero_kept = node.attrs["fn"] in ("mul", "div") or node.attrs["value"] == 0 and node.attrs["fn"] != "rsub"
    return _elementwise(node, gone, shapes) if zero_kept else None


register(Op("arithmetic", lambda node, xs, w: _ARITHMETIC[node.attrs["fn"]](xs[0], node.attrs["value"]),
            aten=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub"), capture=_arithmetic_attrs,
            backtrack=_arithmetic_back))


def _channel_dim(call, name: str = "dim") -> dict | None:
    rank = len(call.out) + 1
    return dict(dim=1) if call.arg(name) % rank == 1 else None


register(Op("cat", lambda node, xs, w: torch.cat(xs, dim=1), channels="index", aten=("cat", "concat"),
            capture=_channel_dim, backtrack=_moved_back))
register(Op("identity", lambda node, xs, w: xs[0], backtrack=_elementwise))
register(Op("flatten", lambda node, xs, w: torch.flatten(xs[0], node.attrs["start_dim"], node.attrs["end_dim"]),
            aten=("flatten",), backtrack=lambda node, gone, shapes: [(node.inputs[0],
                                                                      gone.reshape(shapes[node.inputs[0]]))],
            capture=lambda call: dict(start_dim=int(call.arg("start_dim")), end_dim=int(call.arg("end_dim")))))
register(Op("maxpool", lambda node, xs, w: F.max_pool2d(xs[0], node.attrs["kernel_size"], node.attrs["stride"],
                                                        node.attrs["padding"], node.attrs["dilation"],
                                                        node.attrs["ceil_mode"]),
            aten=("max_pool2d",), backtrack=_pooled,
            capture=lambda call: dict(kernel_size=_pair(call.arg("kernel_size")),
                                      stride=_pair(call.arg("stride") or call.arg("kernel_size")),
                                      padding=_pair(call.arg("padding")), ceil_mode=bool(call.arg("ceil_mode")),
                                      dilation=_pair(call.arg("dilation")))))
register(Op("avgpool", lambda node, xs, w: F.avg_pool2d(xs[0], node.attrs["kernel_size"], node.attrs["stride"],
                                                        node.attrs["padding"], node.attrs["ceil_mode"],
                                                        node.attrs["count_include_pad"]),
            aten=("avg_pool2d",), backtrack=_pooled,
            capture=lambda call: None if call.arg("divisor_override") is not None else dict(
                kernel_size=_pair(call.arg("kernel_size")), stride=_pair(call.arg("stride") or call.arg("kernel_size")),
                padding=_pair(call.arg("padding")), ceil_mode=bool(call.arg("ceil_mode")),
                count_include_pad=bool(call.arg("count_include_pad")))))
register(Op("adaptive_avgpool", lambda node, xs, w: F.adaptive_avg_pool2d(xs[0], node.attrs["output_size"]),
            aten=("adaptive_avg_pool2d",), backtrack=_global,
            capture=lambda call: dict(output_size=_pair(call.arg("output_size")))))


def _spatial(call):
    """A reduction over the spatial dims (2, 3) of an (N, C, H, W) value."""
    dims = call.arg("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(call.shape("self")) != 3 or sorted(d % 4 for d in dims) != [2, 3]:
        return None
    return dict(keepdim=bool(call.arg("keepdim")))


register(Op("mean", lambda node, xs, w: xs[0].mean(dim=(2, 3), keepdim=node.attrs["keepdim"]), aten=("mean",),
            capture=_spatial, backtrack=_global))
register(Op("amax", lambda node, xs, w: xs[0].amax(dim=(2, 3), keepdim=node.attrs["keepdim"]), aten=("amax",),
            capture=_spatial, backtrack=_global))
register(Op("sum", lambda node, xs, w: xs[0].sum(dim=(2, 3), keepdim=node.attrs["keepdim"]), aten=("sum",),
            capture=lambda call: None if call.arg("dtype") is not None else _spatial(call), backtrack=_global))
# log-probabilities over the classes (MNIST-style models end in F.log_softmax): the differences of
# two outputs are those of the logits, so a module's margin is unchanged by it.
register(Op("log_softmax", lambda node, xs, w: F.log_softmax(xs[0], dim=1), channels="whole",
            aten=("log_softmax", "_log_softmax"), why="log_softmax over the classes",
            capture=lambda call: {} if len(call.out) == 1 and call.arg("dim") % 2 == 1 else None))


def _permute_attrs(call):
    rank = len(call.out) + 1
    if call.aten == "transpose":
        dims = list(range(rank))
        a, b = call.arg("dim0") % rank, call.arg("dim1") % rank
        dims[a], dims[b] = dims[b], dims[a]
    else:
        dims = [d % rank for d in call.arg("dims")]
    return dict(dims=dims) if dims[0] == 0 else None


register(Op("permute", lambda node, xs, w: xs[0].permute(node.attrs["dims"]), channels="whole",
            aten=("permute", "transpose"), capture=_permute_attrs, why="channels not on dim 1 (channels-last)"))
register(Op("layer_norm", lambda node, xs, w: F.layer_norm(xs[0], node.attrs["normalized_shape"], w("weight"),
                                                           w("bias"), node.attrs["eps"]),
            channels="whole", params=("weight", "bias"), aten=("layer_norm",), why="LayerNorm (mixes channels)",
            capture=lambda call: dict(normalized_shape=[int(d) for d in call.arg("normalized_shape")],
                                      eps=float(call.arg("eps")))))

# GroupNorm: per channel when each channel is its own group (then a module keeps any channels), else
# its groups' statistics mix channels and its spaces are kept whole.
register(Op("group_norm", lambda node, xs, w: F.group_norm(
                xs[0], xs[0].shape[1] if node.attrs["groups"] == node.attrs["channels"] else node.attrs["groups"],
                w("weight"), w("bias"), node.attrs["eps"]),
            channels=lambda node: "same" if node.attrs["groups"] == node.attrs["channels"] else "whole",
            params=("weight", "bias"), aten=("group_norm",), why="GroupNorm over groups of channels",
            capture=lambda call: dict(groups=int(call.arg("num_groups")), channels=call.shape("input")[0],
                                      eps=float(call.arg("eps")))))


def _slice(node, xs, w):
    a = node.attrs
    return xs[0][(slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)]


def _slice_attrs(call):
    """x[:, a:b:s] on one dimension other than the batch, its bounds made concrete by the input's size."""
    size = call.shape("self")
    dim = call.arg("dim") % (len(size) + 1)
    if dim == 0:
        return None  # the batch: the capture keeps only x[:] (every image)
    start, end, step = slice(call.arg("start"), call.arg("end"), call.arg("step")).indices(size[dim - 1])
    return dict(dim=dim, start=start, end=end, step=step)


# A slice along the channels is an index map (a channel split: chunk, split, x[:, :c]); along the
# rows or columns it keeps the channels (a crop, x[:, :, ::2, ::2]).
register(Op("slice", _slice, channels=lambda node: "index" if node.attrs["dim"] == 1 else
            "same" if node.attrs["dim"] in (2, 3) else "whole", aten=("slice",), capture=_slice_attrs,
            backtrack=_moved_back, why="a slice of flattened features"))


def _pad_attrs(call):
    pad, rank = [int(p) for p in call.arg("pad")], len(call.out) + 1
    mode = call.arg("mode", "constant") if call.aten == "pad" else "constant"
    value = (call.arg("value") or 0.0) if mode == "constant" else None  # aten.pad's default None is 0
    if rank != 4 or len(pad) > 6 or len(pad) % 2 or mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    return dict(pad=pad, mode=mode, value=None if value is None else float(value))


def _pad_flow(node) -> str:
    """Spatial padding keeps the channels; zero channels padded around the others are an index map
    whose new channels are constants (option-A shortcuts); both at once are kept whole."""
    pad = node.attrs["pad"] + [0] * (6 - len(node.attrs["pad"]))
    if not any(pad[4:]):
        return "same"
    return "index" if not any(pad[:4]) and node.attrs["value"] == 0 else "whole"


register(Op("pad", lambda node, xs, w: F.pad(xs[0], node.attrs["pad"], node.attrs["mode"], node.attrs["value"]),
            channels=_pad_flow, aten=("pad", "constant_pad_nd"), capture=_pad_attrs,
            backtrack=lambda node, gone, shapes: _moved_back(node, gone, shapes)  # its zeros read no input
            if node.attrs["mode"] == "constant" and node.attrs["value"] == 0 else None,
            why="padding of rows and channels at once"))

_UPSAMPLING = {"upsample_nearest2d": "nearest", "_upsample_nearest_exact2d": "nearest-exact",
               "upsample_bilinear2d": "bilinear", "upsample_bicubic2d": "bicubic"}


def _interpolate_attrs(call):
    scales = call.arg("scale_factors", None)
    return dict(mode=_UPSAMPLING[call.aten], size=None if scales else list(call.out[1:]),
                scale=[float(s) for s in scales] if scales else None, align_corners=call.arg("align_corners", None))


register(Op("interpolate", lambda node, xs, w: F.interpolate(xs[0], node.attrs["size"], node.attrs["scale"],
                                                             node.attrs["mode"], node.attrs["align_corners"]),
            aten=tuple(_UPSAMPLING), capture=_interpolate_attrs))


def _channel_conv(node, xs, w):
    """A Conv1d sliding along the channels of a (B, C, 1, 1) value (efficient channel attention)."""
    b, c = xs[0].shape[:2]
    a = node.attrs
    return F.conv1d(xs[0].reshape(b, 1, c), w("weight"), w("bias"), 1, a["padding"], a["dilation"]).reshape(b, c, 1, 1)


# Captured from ``conv1d(x.squeeze(-1).transpose(-1, -2))`` and back (capture.py): it mixes
# neighbouring channels, so its spaces are kept whole.
register(Op("channel_conv", _channel_conv, channels="whole", params=("weight", "bias"),
            why="a Conv1d across the channels", macs=lambda node, out, weight: math.prod(out) * weight.numel()))
# x.expand_as(y) of a (B, C, 1, 1) gate: each channel repeated over the rows and columns.
register(Op("expand", lambda node, xs, w: xs[0].expand(-1, -1, *node.attrs["size"])))


def _shuffle(node, xs, w):
    b, c, h, wd = xs[0].shape
    g = node.attrs["groups"]
    return xs[0].reshape(b, g, c // g, h, wd).transpose(1, 2).reshape(b, c, h, wd)


# ShuffleNet's channel split and channel shuffle as module files of earlier versions store them
# (captures now give ``slice`` and ``select``), and what a module holds in place of an index op once
# channels are removed: the kept channels, picked by index (``select``).
register(Op("chunk", lambda node, xs, w: xs[0].chunk(node.attrs["chunks"], 1)[node.attrs["index"]], channels="index",
            backtrack=_moved_back))
register(Op("shuffle", _shuffle, channels="index", backtrack=_moved_back))
register(Op("select", lambda node, xs, w: xs[0][:, node.attrs["index"]], channels="index", backtrack=_moved_back))

# The activations (activations.py), registered here, after the ops above: the ATen map takes the first
# entry that accepts a call, in registration order.
from . import activations  # noqa: E402,F401


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


def channel_sources(node, channels: list[int]) -> torch.Tensor:
    """For an index op reading inputs of ``channels`` channels: each output channel's position among
    all the inputs' channels side by side, or -1 for a constant channel (found by running the op on
    channel labels 1, 2, ...: exact below 2**24)."""
    labels = torch.arange(1, 1 + sum(channels), dtype=torch.float32).split(channels)
    return REGISTRY[node.op].run(node, [t.view(1, -1, 1, 1) for t in labels], None).flatten().long() - 1


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
    """The names of the ops whose fields equal ``wanted`` (``ops_where(activation=True)``)."""
    return {o.name for o in REGISTRY.values() if all(getattr(o, k) == v for k, v in wanted.items())}


PARAMS = {o.name: o.params for o in REGISTRY.values() if o.params and not o.overlay}
