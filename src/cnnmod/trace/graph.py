"""A plain, JSON-able graph of layers, and ``trace_graph``, which captures a model into one.

A ``Graph`` names which layer feeds which. Layers with weights are keyed by their module's
qualified name (``blocks.0.branch.0``), those of a stateless module by its name too (``relu``,
``relu:2`` for its second call), functional operations by the capture's name (``add_3``).
Together with the model's ``state_dict`` the graph is enough to run the network again
(``GraphNetwork``) without the model's Python code, which is what lets module files load anywhere.
How a model is captured (by running it on an example input) is capture.py's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

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
        if not isinstance(graph.output, str) or not all(
                isinstance(n.name, str) and isinstance(n.op, str) and isinstance(n.inputs, list)
                and all(isinstance(i, str) for i in n.inputs) for n in graph.nodes):
            raise CnnmodError("expected a layer graph whose names, operations and inputs are text, found other "
                              "values (a damaged graph).")
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


def trace_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Capture ``model`` into a ``Graph`` by running it on inputs of ``input_shape`` (channels,
    height, width; by default its ``input_spec``'s); what cannot be captured is a clear ``CnnmodError``.

    >>> graph = trace_graph(create_model("resnet20"), (3, 32, 32))
    >>> graph.by_name["blocks.0.branch.0"].op
    'conv'
    """
    from .capture import capture
    from .network import GraphNetwork

    if isinstance(model, GraphNetwork):  # a model loaded from a graph checkpoint: already a graph
        return model.graph
    if input_shape is None:
        spec = getattr(model, "input_spec", None)
        if spec is None:
            raise CnnmodError("expected the input's shape (channels, height, width) to capture the model by "
                              "running it, found none: pass input_shape or an input specification.")
        input_shape = (spec.channels, *spec.size)
    return capture(model, tuple(int(d) for d in input_shape))
