"""Capture a model by running it: torch.export on an example input, mapped onto the registry's ops.

Why running the model (measured, BENCHMARKS.md "Capture of user code"): models as training
repositories write them query shapes in ``forward`` (``F.avg_pool2d(out, out.size(3))``,
``int(x.size(1) * ratio)``), slice channels and pad them, and put all of it in lambda layers.
Symbolic torch.fx sees no shapes, so each of these was a wall. torch.export runs ``forward`` on an
example input of the input specification's shape (non-strict: the user's Python runs as written),
so shape queries are numbers and Python control flow on shapes is resolved; only the batch size
stays symbolic, so a graph runs on any batch. Each ATen call it records is matched to a registry
entry (ops.py: ``aten`` and ``capture``); structure that is not computation (aliases, shape
queries, the pieces of a split, a reshape round trip that shuffles channels) is resolved here.

Every layer of the result is a registry name with data attributes: loading a graph runs no code
of the model's. Whatever cannot be captured is refused in one sentence naming the construct,
the line of the user's source it comes from (file:line) and the nearest supported way to write it
(refusals.py).
"""

from __future__ import annotations

import copy
import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CnnmodError
from .graph import Graph, Node
from .ops import REGISTRY
from .refusals import RESHAPE_HINT, export_failure, first_line, hint, quiet, usage, where_in_source

# The registry's entries by the ATen operation they capture, in registration order: the first
# whose ``capture`` accepts the call is the op (``mul`` takes two tensors of the network, ``scale`` a
# tensor and a parameter, ``arithmetic`` a tensor and a number).
ATEN: dict[str, list] = {}
for _op in REGISTRY.values():
    for _name in _op.aten:
        ATEN.setdefault(_name, []).append(_op)

SKIPPED = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata", "_assert_scalar",
           "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size"}  # shape queries and checks
ALIASES = {"clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy"} | \
    {f"{kind}dropout{inplace}" for kind in ("", "feature_", "alpha_", "feature_alpha_") for inplace in ("", "_")}
# (the same values; dropout: in eval mode)
CONVERSIONS = {"to", "_to_copy", "type_as"}  # an alias when nothing changes (x.float() of float32)
RESHAPES = {"view", "reshape", "_unsafe_view", "view_copy", "squeeze", "unsqueeze"}
SPLITS = {"split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk"}


@dataclass
class _Param:
    fqn: str  # a parameter or buffer of the model ("layer1.0.conv1.weight")
    shape: list[int]  # as the call reads it (viewed to broadcast: [1, C, 1, 1])


@dataclass
class _Pieces:
    source: str  # the graph node split
    dim: int
    bounds: list[tuple[int, int]]  # each piece's [start, end) along dim


@dataclass
class _Chain:
    source: str  # a 4-D graph node reshaped off its (C, H, W) layout: a channel shuffle in the making
    steps: list[tuple[str, list[int]]]  # ("reshape", shape without batch) or ("permute", dims with batch)


# Graphs captured of models still alive, by input shape and layout (their layers' names, types and
# tensor shapes). A graph is reused only after it reproduces the model's outputs again, so a model
# changed since is captured anew. Why: one decomposition captures its model once or twice, and
# export takes seconds where a forward pass takes milliseconds.
_CAPTURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """The graph of ``model`` (put in eval mode while it is captured) on inputs of ``input_shape``."""
    modes = {m: m.training for m in model.modules()}  # each restored as it was (a frozen BatchNorm stays so)
    model.eval()
    try:
        device = next(iter(model.state_dict().values()), torch.empty(0)).device
        example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            try:
                expected = model(example)
            except Exception as e:  # the user's code: anything (an assert on the input's size) says no
                raise CnnmodError(f"expected the model to take inputs of {' x '.join(map(str, input_shape))}, found "
                                  f"that it does not ({type(e).__name__}: {first_line(e)}).") from None
        key = (input_shape, tuple((n, type(m).__qualname__) for n, m in model.named_modules()),
               tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        known = _CAPTURED.get(model, {}).get(key)
        if known is not None:
            try:
                _check(model, known, example, expected)
                return copy.deepcopy(known)
            except CnnmodError:
                pass  # the model computes something else now: captured anew below
        graph = _Converter(model, _export(model, example)).graph()
        _check(model, graph, example, expected)
        _CAPTURED.setdefault(model, {})[key] = copy.deepcopy(graph)
        return graph
    finally:
        for m, training in modes.items():
            m.training = training


def _export(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch")
    try:
        with quiet():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # export raises many kinds (UserError, GuardOnDataDependentSymNode, ...)
        raise CnnmodError(export_failure(model, e)) from None


def _check(model: nn.Module, graph: Graph, example: torch.Tensor, expected) -> None:
    """The captured graph must compute what the model computes (else the capture missed something)."""
    from .network import GraphNetwork

    if not isinstance(expected, torch.Tensor):
        raise CnnmodError("expected a model returning one tensor of logits, found a tuple or dict.")
    try:
        with torch.no_grad():
            got = GraphNetwork(graph, dict(model.state_dict(keep_vars=False)))(example)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise CnnmodError(f"expected the captured graph to run as the model does, found that it fails "
                          f"({type(e).__name__}: {first_line(e)}): the model computes something cnnmod does not "
                          "capture.") from None
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else math.inf
    if not diff <= 1e-4 * (1.0 + float(expected.abs().max())):
        raise CnnmodError(f"expected the captured graph to reproduce the model's outputs, found a difference of "
                          f"{diff:.3g}: the model computes something cnnmod does not capture.")


class _Call:
    """One ATen call, as a registry entry's ``capture`` reads it: its arguments bound by name
    (``arg``), the network tensors it reads (``data``, ``inputs``), the model weights it reads
    (``params``: argument -> qualified name; ``param``/``param_shape``: a lone one, for ``scale``),
    a number it reads (``number``), shapes without the batch (``shape``, ``out``), and ``refuse``."""

    def __init__(self, node: fx.Node, aten: str, values: dict, where: str):
        self.node, self.aten, self.where = node, aten, where
        self.bound = {}
        for i, a in enumerate(node.target._schema.arguments):
            if i < len(node.args):
                self.bound[a.name] = node.args[i]
            elif a.name in node.kwargs:
                self.bound[a.name] = node.kwargs[a.name]
            elif a.has_default_value():
                self.bound[a.name] = a.default_value
        self.data, self.inputs, self.params = [], [], {}
        self.param, self.param_shape, self.number = None, None, None
        for name, value in self.bound.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, fx.Node):
                    found = values.get(item.name)
                    if isinstance(found, str):
                        self.data.append(name)
                        self.inputs.append(found)
                    elif isinstance(found, _Param):
                        self.params[name] = found.fqn
                        self.param, self.param_shape = found.fqn, found.shape
                    elif isinstance(found, (_Pieces, _Chain)):
                        self.refuse("a tensor reshaped off its (channels, height, width) layout", RESHAPE_HINT)
                elif name in ("other", "value", "scalar") and isinstance(item, (int, float)) \
                        and not isinstance(item, bool):
                    self.number = item
        if len(self.params) > 1:
            self.param = None  # a layer's weights, not a lone parameter

    def arg(self, name: str, default=None):
        return self.bound.get(name, default)

    def shape(self, name: str) -> tuple[int, ...]:
        return _shape(self.bound[name])

    @property
    def out(self) -> tuple[int, ...]:
        return _shape(self.node)

    def refuse(self, what: str, how: str):
        raise CnnmodError(f"cannot capture {what} ({self.where}); {how}.")


def _shape(node: fx.Node) -> tuple[int, ...]:
    """A value's shape without its batch dimension, as concrete numbers."""
    return tuple(int(d) for d in node.meta["val"].shape[1:])


class _Converter:
    """Walks an exported program once, mapping each call to a registry op (or resolving it)."""

    def __init__(self, model: nn.Module, program):
        self.program = program
        self.modules = dict(model.named_modules())
        sig = program.graph_signature
        self.weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        stored = set(model.state_dict())
        for fqn in self.weights.values():
            if fqn not in stored:
                raise CnnmodError(f"cannot capture buffer {fqn!r}: it is not in the model's state dict (registered "
                                  "with persistent=False), so no file could hold it; register it as persistent.")
        self.values: dict = {}  # exported node -> graph node name | _Param | _Pieces | _Chain | None
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # graph node -> its shape without the batch
        self.names: set[str] = set()
        self.calls: dict[str, int] = {}  # a stateless module's calls so far
        self.owners: dict[str, str] = {}  # module whose weights a layer uses -> where

    def graph(self) -> Graph:
        output = None
        for n in self.program.graph.nodes:
            if n.op == "placeholder":
                self._placeholder(n)
            elif n.op == "output":
                outs = n.args[0]
                if not (isinstance(outs, (list, tuple)) and len(outs) == 1 and isinstance(outs[0], fx.Node)):
                    raise CnnmodError("expected a model returning one tensor of logits, found a tuple or dict.")
                output = self.values.get(outs[0].name)
                if not isinstance(output, str):
                    raise CnnmodError("expected the model's output to be computed from its input, found a constant "
                                      "or a weight.")
            elif n.op == "call_function":
                self._call(n)
            else:
                raise CnnmodError(f"cannot capture operation {n.op} {n.target!r} of the exported model.")
        used = {output}  # layers the output does not read (a sigmoid folded into a SiLU) are left out
        for node in reversed(self.nodes):
            if node.name in used:
                used.update(node.inputs)
        return Graph([n for n in self.nodes if n.name in used or n.op == "input"], output)

    def _placeholder(self, n: fx.Node) -> None:
        if n.name in self.weights:
            self.values[n.name] = _Param(self.weights[n.name], list(n.meta["val"].shape))
        elif n.meta.get("val") is not None and isinstance(n.meta["val"], torch.Tensor) and \
                any(s.arg.name == n.name for s in self.program.graph_signature.input_specs
                    if s.kind == torch.export.graph_signature.InputKind.USER_INPUT):
            if any(node.op == "input" for node in self.nodes):
                raise CnnmodError("expected a model with one input tensor, found several inputs.")
            self._emit(n, Node(self._name(n, n.name), "input", []))
        else:  # a tensor the model creates in forward (a lifted constant): refused where it is used
            self.values[n.name] = None

    def _emit(self, n: fx.Node, node: Node) -> None:
        """Add ``node`` to the graph as the value of the exported node ``n``."""
        self._add(node, _shape(n))
        self.values[n.name] = node.name

    def _add(self, node: Node, shape: tuple[int, ...]) -> None:
        self.shapes[node.name], self.by_name[node.name] = shape, node
        self.nodes.append(node)
        self.names.add(node.name)

    def _name(self, n: fx.Node, fallback: str) -> str:
        """A stateless module's qualified name (":k" for its k-th op), else the capture's node name."""
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        path = stack[-1][0] if stack else ""
        module = self.modules.get(path)
        if path and module is not None and not any(True for _ in module.children()) \
                and not any(True for _ in module.parameters(recurse=False)):
            self.calls[path] = self.calls.get(path, 0) + 1
            name = path if self.calls[path] == 1 else f"{path}:{self.calls[path]}"
        else:
            name = fallback
            while name in self.modules:  # a later layer with weights will be named after that module
                name += "_"
        while name in self.names:
            name += "_"
        return name

    def _call(self, n: fx.Node) -> None:
        t = n.target
        if t is operator.getitem:
            return self._getitem(n)
        if not isinstance(t, torch._ops.OpOverload):  # arithmetic on symbolic sizes (x.size(0) * 2)
            self.values[n.name] = None
            return
        aten = t._schema.name.split("::")[-1]
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        source = self.values.get(first.name) if first is not None else None
        where = where_in_source(n, self.modules)
        if aten in SKIPPED:
            self.values[n.name] = None
        elif aten in CONVERSIONS:
            out, given = n.meta["val"], n.args[0].meta["val"]
            if (out.dtype, out.device) != (given.dtype, given.device):
                raise CnnmodError(f"cannot capture a conversion to {n.meta['val'].dtype} ({where}); the model runs in "
                                  "float32 throughout.")
            self.values[n.name] = source  # x.float() of a float32 tensor: the same values
        elif aten in ALIASES:
            if "dropout" in aten and (n.args[2] if len(n.args) > 2 else n.kwargs.get("train", False)):
                raise CnnmodError(f"cannot capture dropout that is on in eval mode ({where}); F.dropout is on unless "
                                  "given training=self.training (or use nn.Dropout).")
            self.values[n.name] = source
        elif aten in RESHAPES or (isinstance(source, _Chain) and aten in ("permute", "transpose")):
            self._reshape(n, aten, source, where)
        elif aten in SPLITS:
            self._split(n, aten, source, where)
        elif aten == "slice" and isinstance(source, str) and n.args[1:2] in ((), (0,)):
            start, end, step = (list(n.args[2:]) + [None, None, 1][len(n.args[2:]):])[:3]
            if (start or 0) != 0 or step != 1 or not (end is None or isinstance(end, int) and end >= 2 ** 62):
                raise CnnmodError(f"cannot capture a slice of the batch ({where}); slice dimensions after the first.")
            self.values[n.name] = source  # x[:, ...]: every image
        elif aten in ("expand", "expand_as") and isinstance(source, str):
            self._expand(n, source, where)
        elif aten == "conv1d" and isinstance(source, _Chain):
            self._channel_conv(n, source, where)
        else:
            self._registered(n, aten, where)

    def _registered(self, n: fx.Node, aten: str, where: str) -> None:
        candidates = ATEN.get(aten)
        if not candidates:
            raise CnnmodError(f"cannot capture operation {aten!r} ({where}); {hint(aten, ATEN)}.")
        call = _Call(n, aten, self.values, where)
        for op in candidates:
            try:
                attrs = op.attrs(call)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                attrs = None  # an argument that is a tensor or a size where the op takes a number
            if attrs is not None:
                break
        else:
            raise CnnmodError(f"cannot capture {aten!r} as it is used here ({where}); {usage(aten)}.")
        if any(not isinstance(self.values.get(a.name), (str, _Param)) for a in n.all_input_nodes
               if isinstance(a.meta.get("val"), torch.Tensor)):
            raise CnnmodError(f"cannot capture {aten!r} of a tensor created inside forward ({where}); make it a "
                              "registered parameter or buffer of the model.")
        name = self._owner(op, call.params, call.aten, where) if call.params and op.name != "scale" else None
        inputs = call.inputs
        if op.name == "mul" and self._swish(*inputs):  # x * x.sigmoid(): swish written by hand is SiLU
            op, attrs, inputs = REGISTRY["silu"], {}, [self._swish(*inputs)]
        self._emit(n, Node(name or self._name(n, n.name), op.name, inputs, attrs))

    def _swish(self, a: str, b: str) -> str | None:
        """x, if the product of ``a`` and ``b`` is x * sigmoid(x)."""
        for x, gate in ((a, b), (b, a)):
            node = self.by_name.get(gate)
            if node is not None and node.op == "sigmoid" and node.inputs == [x]:
                return x
        return None

    def _owner(self, op, params: dict, aten: str, where: str) -> str:
        """The module whose weights (``params``: argument -> qualified name) a layer uses: the layer's
        name (its tensors are keyed "<module>.<role>")."""
        owners = {fqn.rpartition(".")[0] for fqn in params.values()}
        if len(owners) != 1 or any(fqn.rpartition(".")[2] != role for role, fqn in params.items()) \
                or not set(params) <= set(op.params):
            raise CnnmodError(f"cannot capture {aten} on weights {sorted(params.values())} ({where}); "
                              f"expected the {', '.join(op.params)} of one module, named so.")
        owner = owners.pop()
        if owner in self.owners:
            raise CnnmodError(f"the weights of module {owner!r} are used more than once ({self.owners[owner]} and "
                              f"{where}); expected each layer with weights to be called once.")
        self.owners[owner] = where
        return owner

    def _getitem(self, n: fx.Node) -> None:
        source, index = self.values.get(n.args[0].name), n.args[1]
        if not isinstance(source, _Pieces):
            self.values[n.name] = None  # an item of something else (a size): not a tensor of the network
            return
        start, end = source.bounds[index]
        self._emit(n, Node(self._name(n, n.name), "slice", [source.source],
                           dict(dim=source.dim, start=start, end=end, step=1)))

    def _split(self, n: fx.Node, aten: str, source, where: str) -> None:
        if not isinstance(source, str):
            raise CnnmodError(f"cannot capture a split of this value ({where}); {RESHAPE_HINT}.")
        shape = _shape(n.args[0])
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % (len(shape) + 1)
        if dim == 0:
            raise CnnmodError(f"cannot capture a split of the batch ({where}); split dimensions after the first.")
        size = shape[dim - 1]
        if aten in ("split_with_sizes",):
            sizes = list(n.args[1])
        elif aten in ("chunk", "unsafe_chunk"):
            step = math.ceil(size / n.args[1])
            sizes = [min(step, size - s) for s in range(0, size, step)]
        else:
            sizes = [min(n.args[1], size - s) for s in range(0, size, n.args[1])]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.values[n.name] = _Pieces(source, dim, [(s, s + k) for s, k in zip(starts, sizes)])

    def _reshape(self, n: fx.Node, aten: str, source, where: str) -> None:
        out = list(_shape(n))
        if isinstance(source, _Param):  # a weight viewed to broadcast (a layer scale)
            self.values[n.name] = _Param(source.fqn, [int(d) for d in n.meta["val"].shape])
            return
        batch_moves = aten in ("permute", "transpose") and _dims(n, aten)[0] != 0
        if batch_moves or str(n.meta["val"].shape[0]) != str(n.args[0].meta["val"].shape[0]):
            raise CnnmodError(f"cannot capture a reshape that folds the batch into other dimensions ({where}); keep "
                              "the batch first: x.reshape(x.size(0), ...).")
        if isinstance(source, _Chain):
            steps = source.steps + [("permute", _dims(n, aten)) if aten in ("permute", "transpose")
                                    else ("reshape", out)]
            chain = _Chain(source.source, steps)
            self.values[n.name] = chain
            if steps[-1][0] == "reshape" and out == list(self.shapes[source.source]):
                index = _channel_permutation(chain, out, where)
                if index == list(range(len(index))):  # back where it started (around a Conv1d across channels)
                    self.values[n.name] = source.source
                else:
                    self._emit(n, Node(self._name(n, n.name), "select", [source.source], {"index": index}))
        elif not isinstance(source, str):
            raise CnnmodError(f"cannot capture a reshape of this value ({where}); {RESHAPE_HINT}.")
        elif out == list(_shape(n.args[0])):
            self.values[n.name] = source  # the same shape: nothing moves
        elif len(out) == 1:  # x.view(x.size(0), -1): the features, flattened
            self._emit(n, Node(self._name(n, n.name), "flatten", [source], dict(start_dim=1, end_dim=-1)))
        elif len(_shape(n.args[0])) == 3:
            self.values[n.name] = _Chain(source, [("reshape", out)])  # resolved when it comes back to (C, H, W)
        else:
            raise CnnmodError(f"cannot capture a reshape to {tuple(out)} ({where}); {RESHAPE_HINT}.")


    def _expand(self, n: fx.Node, source: str, where: str) -> None:
        given, out = self.shapes[source], _shape(n)
        if len(given) != 3 or given[0] != out[0] or given[1:] != (1, 1):
            raise CnnmodError(f"cannot capture this expand ({where}); expected a (batch, channels, 1, 1) gate repeated "
                              "over the rows and columns, or multiply by it directly: broadcasting needs no expand.")
        self._emit(n, Node(self._name(n, n.name), "expand", [source], {"size": list(out[1:])}))

    def _channel_conv(self, n: fx.Node, chain: _Chain, where: str) -> None:
        """``conv1d(x.squeeze(-1).transpose(-1, -2))`` of a (B, C, 1, 1) x: a Conv1d along its channels."""
        call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), n.args))
        call.update(n.kwargs)
        weight, bias = self.values.get(call["weight"].name), call.get("bias")
        bias = self.values.get(bias.name) if isinstance(bias, fx.Node) else None
        c = self.shapes[chain.source][0]
        labels = torch.arange(float(c)).view(1, c, 1, 1)
        for kind, arg in chain.steps:
            labels = labels.reshape(1, *arg) if kind == "reshape" else labels.permute(arg)
        padding, dilation = call.get("padding", [0]), call.get("dilation", [1])
        if self.shapes[chain.source][1:] != (1, 1) or tuple(labels.shape) != (1, 1, c) \
                or not torch.equal(labels.flatten(), torch.arange(float(c))) or not isinstance(weight, _Param) \
                or weight.shape[:2] != [1, 1] or list(call.get("stride", [1])) != [1] or call.get("groups", 1) != 1 \
                or isinstance(padding, str) or _shape(n) != (1, c):
            raise CnnmodError(f"cannot capture this Conv1d ({where}); a Conv1d is captured only across the channels "
                              "of a pooled (batch, channels, 1, 1) value, one channel in and out, stride 1.")
        params = {"weight": weight.fqn, **({"bias": bias.fqn} if isinstance(bias, _Param) else {})}
        owner = self._owner(REGISTRY["channel_conv"], params, "conv1d", where)
        attrs = dict(padding=[int(p) for p in padding], dilation=[int(d) for d in dilation], bias="bias" in params)
        self._add(Node(owner, "channel_conv", [chain.source], attrs), self.shapes[chain.source])
        self.values[n.name] = _Chain(owner, chain.steps)  # its output keeps the chain's (1, C) layout


def _dims(n: fx.Node, aten: str) -> list[int]:
    rank = len(n.meta["val"].shape)
    if aten == "permute":
        return [d % rank for d in n.args[1]]
    dims = list(range(rank))
    a, b = n.args[1] % rank, n.args[2] % rank
    dims[a], dims[b] = dims[b], dims[a]
    return dims


def _channel_permutation(chain: _Chain, shape: list[int], where: str) -> list[int]:
    """The channel each output channel of a reshape round trip is, if the round trip only moves
    whole channels (a channel shuffle); else a refusal."""
    c, h, w = shape
    labels = torch.arange(c * h * w, dtype=torch.float64).view(1, c, h, w)
    x = labels
    for kind, arg in chain.steps:
        x = x.reshape(1, *arg) if kind == "reshape" else x.permute(arg)
    source = x.reshape(c, h * w).long()
    channel = source[:, 0] // (h * w)
    if not torch.equal(source, channel[:, None] * (h * w) + torch.arange(h * w)):
        raise CnnmodError(f"cannot capture a reshape that mixes channels with rows or columns ({where}); "
                          f"{RESHAPE_HINT}.")
    return channel.tolist()
