"""Trace any PyTorch CNN with torch.fx into a plain, JSON-able graph of layers.

A ``Graph`` names which layer feeds which. Layers that are modules are keyed by their
qualified name (``blocks.0.branch.0``), functional operations by their fx node name
(``add_3``). Together with the model's ``state_dict`` the graph is enough to run the network
again (``GraphNetwork``) without the model's Python code, which is what lets module files
load anywhere.

Why torch.fx and not torch.export (measured, BENCHMARKS.md "Capture"): both capture every model
of the zoo test (25 torchvision/timm CNNs). torch.export would give each operation one canonical
ATen spelling (30 overloads across the zoo against fx's 47 module types, functions and tensor
methods), but it takes 22x as long (about 1 s per small model), needs an example input (so
``trace_graph(model)`` could not trace a model before its data is known) and renames every node
(the module files of today's models would change). With the registry (ops.py), an op's spellings
are one line of its entry, so fx's many spellings cost little; the error that names the module a
capture fails in is fx's too.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CnnmodError
from .ops import PARAMS, REGISTRY  # noqa: F401  (PARAMS is re-exported for the pipeline)

# Operations a graph's layers may be: the registry's, less the overlays a strategy adds to a layer.
OPS = {name for name, op in REGISTRY.items() if not op.overlay}


@dataclass
class Node:
    name: str
    op: str  # a name in the registry (ops.py): input, conv, bn, relu, add, cat, linear, ...
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    then: list[str] = field(default_factory=list)  # overlays run on the output, in order (ops.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.then:
            del d["then"]  # a parent's layer: written as before overlays existed
        return d


@dataclass
class Graph:
    nodes: list[Node]  # in execution (topological) order; nodes[0] is the input
    output: str

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.nodes}

    def to_dict(self) -> dict:
        return {"nodes": [n.to_dict() for n in self.nodes], "output": self.output}

    def readers(self) -> dict[str, set[str]]:
        """The layers that read each layer's output."""
        found: dict[str, set[str]] = {n.name: set() for n in self.nodes}
        for node in self.nodes:
            for i in node.inputs:
                found[i].add(node.name)
        return found

    def last_reads(self) -> dict[int, list[str]]:
        """After which node (by position) each value other than the output is read for the last time."""
        last = {i: k for k, node in enumerate(self.nodes) for i in node.inputs}
        after: dict[int, list[str]] = {}
        for name, k in last.items():
            if name != self.output:
                after.setdefault(k, []).append(name)
        return after

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        """Rebuild a graph read from a file, refusing anything that is not a valid graph. Files store a
        strategy's overlays apart from the graph (module files: masks, fills, added constants), so a
        graph read from one has none."""
        try:
            graph = cls([Node(**n) for n in d["nodes"]], d["output"])
        except (KeyError, TypeError) as e:
            raise CnnmodError(f"expected a layer graph (nodes, output), found a damaged one ({e}).") from None
        seen = set()
        for n in graph.nodes:
            if n.then != []:
                raise CnnmodError(f"expected a layer graph without overlays (a file stores them apart), found "
                                  f"node {n.name!r} with {n.then!r}.")
            if n.op not in OPS or not set(n.inputs) <= seen or not isinstance(n.attrs, dict):
                raise CnnmodError(f"expected a layer graph of known operations, found node {n.name!r} "
                                  f"({n.op!r}) that is unknown or uses a later layer.")
            seen.add(n.name)
        if graph.output not in seen:
            raise CnnmodError(f"expected the graph output among its layers, found {graph.output!r}.")
        return graph


class _NamingTracer(fx.Tracer):
    """An fx tracer that remembers the module being traced, to name it in errors."""

    def __init__(self):
        super().__init__()
        self.current, self.failed_in = "<top level>", None

    def call_module(self, m, forward, args, kwargs):
        outer, self.current = self.current, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.current  # the innermost module that failed
            raise
        finally:
            self.current = outer


def trace_graph(model: nn.Module) -> Graph:
    """Trace ``model`` into a ``Graph``; unsupported layers are a clear ``CnnmodError``.

    >>> graph = trace_graph(create_model("resnet20"))
    >>> graph.by_name["blocks.0.branch.0"].op
    'conv'
    """
    from .network import GraphNetwork

    if isinstance(model, GraphNetwork):  # a model loaded from a graph checkpoint: already a graph
        return model.graph
    tracer = _NamingTracer()
    try:
        fx_graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...) for dynamic code
        raise CnnmodError(f"cannot trace the model with torch.fx in module {tracer.failed_in or '<top level>'!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0]} (data-dependent control "
                          "flow is not traceable).") from None
    modules = dict(model.named_modules())
    nodes, output, owned, consts, pending = [], None, {}, {}, {}
    for n in fx_graph.nodes:
        if n.op == "placeholder":
            if nodes:
                raise CnnmodError("expected a model with one input tensor, found several inputs.")
            nodes.append(Node(n.name, "input", []))
        elif n.op == "output":
            if not isinstance(n.args[0], fx.Node):
                raise CnnmodError("expected a model returning one tensor of logits, found a tuple or dict.")
            output = n.args[0].name
        elif n.op == "call_module":
            nodes.append(_module_node(n, modules[n.target]))
        elif n.op == "get_attr":
            consts[n.name] = (n.target, list(_parameter(model, n.target).shape))  # read by the call using it
        elif n.op == "call_method" and n.target in ("reshape", "view") and _arg_name(n) in consts:
            consts[n.name] = (consts[_arg_name(n)][0], _shape_args(n))  # a parameter reshaped to broadcast
        elif n.op in ("call_function", "call_method") and n.target in _SKIPPED:
            continue  # a shape query, its arithmetic, or a shape assertion
        elif (found := _split_or_shuffle(n, pending)) is not None:
            if isinstance(found, Node):
                nodes.append(found)
        elif n.op in ("call_function", "call_method"):
            node = _function_node(n, modules, consts)
            if node.name.startswith("@"):  # a functional call on a module's weights: named after the module
                owned[n.name], node.name = node.name[1:], n.name
            nodes.append(node)
        else:
            raise CnnmodError(f"unsupported operation {n.op} {n.target!r} in the traced model.")
    # Modules are keyed by qualified name; a stateless module called again (one ReLU used twice
    # in a block, as torchvision's ResNets do) gets "name:2", "name:3", ...
    rename, calls = {}, {}
    for n in fx_graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
            if calls[n.target] > 1 and any(True for _ in modules[n.target].parameters()):
                raise CnnmodError(f"module {n.target!r} has weights and is called {calls[n.target]} times; "
                                  "expected each layer with weights to be called once.")
            rename[n.name] = n.target if calls[n.target] == 1 else f"{n.target}:{calls[n.target]}"
    for fx_name, owner in owned.items():
        if owner in rename.values() or owner in list(owned.values())[:list(owned).index(fx_name)]:
            raise CnnmodError(f"the weights of module {owner!r} are used more than once; expected each layer "
                              "with weights to be called once.")
        rename[fx_name] = owner
    for node in nodes:
        node.name = rename.get(node.name, node.name)
        node.inputs = [rename.get(i, i) for i in node.inputs]
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise CnnmodError("expected distinct layer names, found a module named like a traced operation.")
    known = set(names)
    for node in nodes:
        if not set(node.inputs) <= known:
            raise CnnmodError(f"operation {node.name!r}: uses a shape query or constant that cnnmod "
                              "cannot represent.")
    return Graph(nodes, rename.get(output, output))


def _args(n: fx.Node) -> list[str]:
    return [a.name for a in n.all_input_nodes]


_BY_MODULE = {t: o.name for o in REGISTRY.values() for t in o.modules}
_BY_CALL = {c: o.name for o in REGISTRY.values() for c in o.calls}
# Shape queries (x.size(0) for a view), timm's shape assertions (torch._assert(x.ndim == 4)):
# they compute nothing the network's output depends on.
_SKIPPED = {"size", getattr, torch._assert, operator.eq, "dim", operator.floordiv}


def _split_or_shuffle(n: fx.Node, pending: dict):
    """Recognise a channel split (``x.chunk(k, 1)[i]``) and a channel shuffle (``x.view(B, g, C // g,
    H, W)``, ``transpose(1, 2)``, ``contiguous()``, ``view(B, C, H, W)``, torchvision's
    ``channel_shuffle``). Returns a Node when one is complete, True for a step of one (nothing to
    emit yet), None for anything else. ``pending`` holds the steps seen so far.
    """
    t, args = n.target, n.args
    source = args[0].name if args and isinstance(args[0], fx.Node) else None
    if t == "chunk" and len(args) >= 2 and (args[2] if len(args) > 2 else n.kwargs.get("dim", 0)) in (1, -3):
        pending[n.name] = ("chunk", source, int(args[1]))
        return True
    if t is operator.getitem and source in pending and pending[source][0] == "chunk":
        _, x, chunks = pending[source]
        return Node(n.name, "chunk", [x], dict(chunks=chunks, index=int(args[1])))
    if t is operator.getitem and isinstance(args[0], fx.Node) and args[0].target == "size":
        return True  # a dimension of x.size(): shape arithmetic for a view
    if t == "view" and len(args) == 6 and isinstance(args[2], int) and source not in pending:
        pending[n.name] = ("grouped", source, args[2])
        return True
    if t in (torch.transpose, "transpose") and source in pending and pending[source][0] == "grouped" \
            and tuple(args[1:3]) == (1, 2):
        pending[n.name] = ("transposed", *pending[source][1:])
        return True
    if t == "contiguous" and source in pending:
        pending[n.name] = pending[source]
        return True
    if t in ("view", "reshape") and source in pending and pending[source][0] == "transposed" and len(args) == 5:
        # back to (B, C, H, W): the only 4-D view of (B, C // g, g, H, W) that keeps B, H and W
        _, x, groups = pending[source]
        return Node(n.name, "shuffle", [x], dict(groups=groups))
    return None


def _module_node(n: fx.Node, m: nn.Module) -> Node:
    # The node keeps its fx name here; trace_graph renames it to the qualified name ``where``.
    name, where, inputs = n.name, n.target, _args(n)
    op = next((_BY_MODULE[t] for t in type(m).__mro__ if t in _BY_MODULE), None)
    if op == "conv":
        if m.padding_mode != "zeros":
            raise CnnmodError(f"module {where!r}: expected zero padding, found padding_mode={m.padding_mode!r}.")
        return Node(name, "conv", inputs, _conv_attrs(m.stride, m.padding, m.dilation, m.groups, m.bias is not None,
                                                      depthwise=m.groups == m.in_channels == m.out_channels > 1))
    if op == "bn":
        return Node(name, "bn", inputs, dict(eps=m.eps, affine=m.affine))
    if op == "linear":
        return Node(name, "linear", inputs, dict(bias=m.bias is not None))
    if op == "maxpool":
        return Node(name, "maxpool", inputs, _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                        dilation=m.dilation))
    if op == "avgpool":
        return Node(name, "avgpool", inputs, _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                        count_include_pad=m.count_include_pad))
    if op == "adaptive_avgpool":
        return Node(name, "adaptive_avgpool", inputs, dict(output_size=_pair(m.output_size)))
    if op == "flatten":
        return Node(name, "flatten", inputs, dict(start_dim=m.start_dim, end_dim=m.end_dim))
    if op == "layer_norm":
        return Node(name, "layer_norm", inputs, dict(normalized_shape=list(m.normalized_shape), eps=float(m.eps)))
    if op == "gelu":
        return Node(name, "gelu", inputs, dict(approximate=m.approximate))
    if op == "leaky_relu":
        return Node(name, "leaky_relu", inputs, dict(negative_slope=float(m.negative_slope)))
    if op is not None and op in ("identity",) or (op is not None and REGISTRY[op].activation):
        return Node(name, op, inputs)
    supported = sorted({t.__name__ for t in _BY_MODULE})
    raise CnnmodError(f"module {where!r}: unsupported layer type {type(m).__name__} (supported: "
                      f"{', '.join(supported)}).")


def _conv_attrs(stride, padding, dilation, groups, bias: bool, depthwise: bool = False) -> dict:
    attrs = dict(stride=_pair(stride), dilation=_pair(dilation), groups=int(groups),
                 padding=padding if isinstance(padding, str) else _pair(padding), bias=bias)
    if depthwise:  # each output channel reads its own input channel alone: channels flow through it
        attrs["depthwise"] = True
    return attrs


def _pair(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _pool_attrs(kernel, stride, padding, ceil_mode, **extra) -> dict:
    return dict(kernel_size=_pair(kernel), stride=_pair(stride if stride is not None else kernel),
                padding=_pair(padding), ceil_mode=bool(ceil_mode), **{k: (_pair(v) if k == "dilation" else v)
                                                                      for k, v in extra.items()})


def _parameter(model: nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _arg_name(n: fx.Node) -> str | None:
    return n.args[0].name if n.args and isinstance(n.args[0], fx.Node) else None


def _shape_args(n: fx.Node) -> list[int]:
    shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
    if not all(isinstance(d, int) for d in shape):
        raise CnnmodError(f"operation {n.name!r}: expected a parameter reshaped to a fixed shape, found {shape}.")
    return list(shape)


def _function_node(n: fx.Node, modules: dict, consts: dict) -> Node:
    t, inputs = n.target, _args(n)
    kwargs = dict(n.kwargs)
    if t in ("permute", torch.permute):
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
        dims = list(kwargs.get("dims", dims))
        if not dims or dims[0] != 0:
            raise CnnmodError(f"operation {n.name!r}: expected a permute that keeps the batch first, found {dims}.")
        return Node(n.name, "permute", inputs[:1], dict(dims=dims))
    op = _BY_CALL.get(t) if _hashable(t) else None
    if t is _stochastic_depth():  # torchvision's, wrapped by fx: in eval mode the identity
        if n.args[3] if len(n.args) > 3 else kwargs.get("training", True):
            raise CnnmodError(f"operation {n.name!r}: expected the model in eval mode, found stochastic depth "
                              "training (call model.eval()).")
        return Node(n.name, "identity", inputs[:1])
    if op in ("bn", "linear", "conv", "layer_norm"):
        return _weighted_call(n, op, modules)
    factors = [a for a in n.args if isinstance(a, fx.Node)]
    if op == "mul" and len(factors) == 2 and sum(a.name in consts for a in factors) == 1:
        data, param = factors if factors[1].name in consts else factors[::-1]
        key, shape = consts[param.name]
        return Node(n.name, "scale", [data.name], dict(param=key, shape=shape))
    if op in ("add", "mul"):
        if len(inputs) != 2 or len(n.args) != 2 or kwargs.get("alpha", 1) != 1:
            raise CnnmodError(f"operation {n.name!r}: expected the {'sum' if op == 'add' else 'product'} of two "
                              f"tensors, found {n.format_node()}.")
        return Node(n.name, op, inputs)
    if op == "gelu":
        return Node(n.name, "gelu", inputs[:1], dict(approximate=kwargs.get("approximate", "none")))
    if op == "leaky_relu":
        slope = n.args[1] if len(n.args) > 1 else kwargs.get("negative_slope", 0.01)
        return Node(n.name, "leaky_relu", inputs[:1], dict(negative_slope=float(slope)))
    if op is not None and (REGISTRY[op].activation or op == "identity"):
        return Node(n.name, op, inputs[:1])
    if t in (torch.cat, torch.concat):
        dim = n.args[1] if len(n.args) > 1 else kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise CnnmodError(f"operation {n.name!r}: expected a concat along channels (dim=1), found dim={dim}.")
        return Node(n.name, "cat", inputs, dict(dim=1))
    if op == "flatten":
        start = n.args[1] if len(n.args) > 1 else kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else kwargs.get("end_dim", -1)
        return Node(n.name, "flatten", inputs, dict(start_dim=start, end_dim=end))
    if t in ("view", "reshape") and len(n.args) == 3 and n.args[2] == -1:
        return Node(n.name, "flatten", inputs[:1], dict(start_dim=1, end_dim=-1))  # x.view(x.size(0), -1)
    if t == F.adaptive_avg_pool2d:
        return Node(n.name, "adaptive_avgpool", inputs, dict(output_size=_pair(n.args[1])))
    if t in (F.max_pool2d, F.avg_pool2d):
        a = list(n.args[1:]) + [None] * 4
        k = kwargs.get("kernel_size", a[0])
        attrs = _pool_attrs(k, kwargs.get("stride", a[1]), kwargs.get("padding", a[2] or 0),
                            kwargs.get("ceil_mode", False))
        if t == F.max_pool2d:
            attrs["dilation"] = _pair(kwargs.get("dilation", 1))
        else:
            attrs["count_include_pad"] = kwargs.get("count_include_pad", True)
        return Node(n.name, "maxpool" if t == F.max_pool2d else "avgpool", inputs, attrs)
    if t == "mean":
        dims = n.args[1] if len(n.args) > 1 else kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else kwargs.get("keepdim", False)
        if sorted(d % 4 for d in (dims if isinstance(dims, (list, tuple)) else [dims])) != [2, 3]:
            raise CnnmodError(f"operation {n.name!r}: expected a spatial mean over dims (2, 3), found {dims}.")
        return Node(n.name, "mean", inputs, dict(keepdim=bool(keep)))
    name = getattr(t, "__name__", str(t))
    raise CnnmodError(f"operation {n.name!r}: unsupported function {name!r} (supported: the activations, add, "
                      "mul, cat, flatten, view(B, -1), pooling, spatial mean, batch_norm, linear, conv2d).")


def _hashable(t) -> bool:
    try:
        hash(t)
    except TypeError:
        return False
    return True


def _stochastic_depth():
    """torchvision's stochastic_depth function, if torchvision is imported (never imported here)."""
    import sys

    ops = sys.modules.get("torchvision.ops.stochastic_depth")
    return getattr(ops, "stochastic_depth", None)


# The weights of a functional batch_norm / linear / conv2d call (timm's BatchNormAct2d), in the
# order of the function's arguments; the node is named after the module that holds them.
_WEIGHT_ARGS = {"bn": ("input", "running_mean", "running_var", "weight", "bias"),
                "linear": ("input", "weight", "bias"), "conv": ("input", "weight", "bias"),
                "layer_norm": ("input", "normalized_shape", "weight", "bias")}


def _weighted_call(n: fx.Node, op: str, modules: dict) -> Node:
    names = _WEIGHT_ARGS[op]
    args = dict(zip(names, n.args))
    args.update({k: v for k, v in n.kwargs.items() if k in names})
    data = args.get("input")
    owners = set()
    for p in names[1:]:
        a = args.get(p)
        if a is None or p == "normalized_shape":
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr" and a.target.rsplit(".", 1)[-1] == p):
            raise CnnmodError(f"operation {n.name!r}: expected {op}'s {p} to be a weight of a module, "
                              f"found {a!r}.")
        owners.add(a.target.rsplit(".", 1)[0] if "." in a.target else "")
    if not isinstance(data, fx.Node) or len(owners) != 1 or "" in owners:
        raise CnnmodError(f"operation {n.name!r}: expected a {op} call on one module's weights, "
                          f"found {n.format_node()}.")
    owner = owners.pop()
    if op == "bn":
        eps = n.args[7] if len(n.args) > 7 else n.kwargs.get("eps", 1e-5)
        training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
        if training:
            raise CnnmodError(f"operation {n.name!r}: expected the model in eval mode, found batch_norm "
                              "training (call model.eval()).")
        attrs = dict(eps=float(eps), affine=args.get("weight") is not None)
    elif op == "linear":
        attrs = dict(bias=args.get("bias") is not None)
    elif op == "layer_norm":
        eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
        attrs = dict(normalized_shape=list(args["normalized_shape"]), eps=float(eps))
    else:
        a = list(n.args[3:]) + [None] * 4
        groups = n.kwargs.get("groups", a[3] or 1)
        weight = getattr(modules[owner], "weight")  # (out, in / groups, kh, kw)
        attrs = _conv_attrs(n.kwargs.get("stride", a[0] or 1), n.kwargs.get("padding", a[1] or 0),
                            n.kwargs.get("dilation", a[2] or 1), groups, args.get("bias") is not None,
                            depthwise=groups == weight.shape[0] > 1 and weight.shape[1] == 1)
    return Node(f"@{owner}", op, [data.name], attrs)  # "@": renamed to the owner after tracing
