"""Trace any PyTorch CNN with torch.fx into a plain, JSON-able graph of layers.

A ``Graph`` names which layer feeds which. Layers that are modules are keyed by their
qualified name (``blocks.0.branch.0``), functional operations by their fx node name
(``add_3``). Together with the model's ``state_dict`` the graph is enough to run the network
again (``GraphNetwork``) without the model's Python code, which is what lets module files
load anywhere.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CnnmodError

# Operations a graph may hold, and the tensors each keeps in the state dict.
PARAMS = {
    "conv": ("weight", "bias"), "bn": ("weight", "bias", "running_mean", "running_var"),
    "linear": ("weight", "bias"),
}
OPS = {"input", "conv", "bn", "relu", "add", "cat", "maxpool", "avgpool", "adaptive_avgpool", "mean",
       "flatten", "linear", "identity"}


@dataclass
class Node:
    name: str
    op: str  # input, conv, bn, relu, add, cat, maxpool, avgpool, adaptive_avgpool, mean, flatten, linear, identity
    inputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    nodes: list[Node]  # in execution (topological) order; nodes[0] is the input
    output: str

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.nodes}

    def to_dict(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes], "output": self.output}

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        """Rebuild a graph read from a file, refusing anything that is not a valid graph."""
        try:
            graph = cls([Node(**n) for n in d["nodes"]], d["output"])
        except (KeyError, TypeError) as e:
            raise CnnmodError(f"expected a layer graph (nodes, output), found a damaged one ({e}).") from None
        seen = set()
        for n in graph.nodes:
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
    tracer = _NamingTracer()
    try:
        fx_graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...) for dynamic code
        raise CnnmodError(f"cannot trace the model with torch.fx in module {tracer.failed_in or '<top level>'!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0]} (data-dependent control "
                          "flow is not traceable).") from None
    modules = dict(model.named_modules())
    nodes, output = [], None
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
        elif n.op in ("call_function", "call_method") and n.target in ("size", getattr):
            continue  # a shape query, as in x.view(x.size(0), -1): only the view uses it
        elif n.op in ("call_function", "call_method"):
            nodes.append(_function_node(n))
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


def _module_node(n: fx.Node, m: nn.Module) -> Node:
    # The node keeps its fx name here; trace_graph renames it to the qualified name ``where``.
    name, where, inputs = n.name, n.target, _args(n)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise CnnmodError(f"module {where!r}: expected zero padding, found padding_mode={m.padding_mode!r}.")
        return Node(name, "conv", inputs, dict(stride=list(m.stride), dilation=list(m.dilation), groups=m.groups,
                                               padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                                               bias=m.bias is not None))
    if isinstance(m, nn.BatchNorm2d):
        return Node(name, "bn", inputs, dict(eps=m.eps, affine=m.affine))
    if isinstance(m, nn.Linear):
        return Node(name, "linear", inputs, dict(bias=m.bias is not None))
    if isinstance(m, nn.ReLU):
        return Node(name, "relu", inputs)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return Node(name, "identity", inputs)
    if isinstance(m, nn.MaxPool2d):
        return Node(name, "maxpool", inputs, _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                        dilation=m.dilation))
    if isinstance(m, nn.AvgPool2d):
        return Node(name, "avgpool", inputs, _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                        count_include_pad=m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return Node(name, "adaptive_avgpool", inputs, dict(output_size=_pair(m.output_size)))
    if isinstance(m, nn.Flatten):
        return Node(name, "flatten", inputs, dict(start_dim=m.start_dim, end_dim=m.end_dim))
    raise CnnmodError(f"module {where!r}: unsupported layer type {type(m).__name__} (supported: Conv2d, "
                      "BatchNorm2d, ReLU, Linear, Max/Avg/AdaptiveAvgPool2d, Flatten, Identity, Dropout).")


def _pair(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _pool_attrs(kernel, stride, padding, ceil_mode, **extra) -> dict:
    return dict(kernel_size=_pair(kernel), stride=_pair(stride if stride is not None else kernel),
                padding=_pair(padding), ceil_mode=bool(ceil_mode), **{k: (_pair(v) if k == "dilation" else v)
                                                                      for k, v in extra.items()})


_RELU = {F.relu, torch.relu, "relu"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_FLATTEN = {torch.flatten, "flatten"}


def _function_node(n: fx.Node) -> Node:
    t, inputs = n.target, _args(n)
    kwargs = dict(n.kwargs)
    if t in _RELU:
        return Node(n.name, "relu", inputs[:1])
    if t in _ADD:
        if len(inputs) != 2 or kwargs.get("alpha", 1) != 1:
            raise CnnmodError(f"operation {n.name!r}: expected the sum of two tensors, found {n.format_node()}.")
        return Node(n.name, "add", inputs)
    if t in (torch.cat, torch.concat):
        dim = n.args[1] if len(n.args) > 1 else kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise CnnmodError(f"operation {n.name!r}: expected a concat along channels (dim=1), found dim={dim}.")
        return Node(n.name, "cat", inputs, dict(dim=1))
    if t in _FLATTEN:
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
    raise CnnmodError(f"operation {n.name!r}: unsupported function {name!r} (supported: relu, add, cat, "
                      "flatten, view(B, -1), pooling, spatial mean).")
