"""Run a ``Graph`` on a dictionary of weights: the network, rebuilt without the model's code.

``GraphNetwork`` is what module files hold. It runs the graph's layers and their overlays (what a
strategy adds to the parent: masks, fills, added constants; ops.py) and nothing else; it exports
to ONNX since it is plain torch ops.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .graph import Graph
from .ops import REGISTRY, weight_keys


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names may not contain dots


# The most elements one layer's output may hold for one image (1 GiB of float32), and all layers
# together (4 GiB; a ResNet-50 at 224 px: 0.03 GiB): a graph read from a file whose attributes ask
# for more (a padding or an upsampling of millions, many of them) is refused unrun.
MAX_LAYER_ELEMENTS = 2 ** 28
MAX_TOTAL_ELEMENTS = 2 ** 30


@torch.no_grad()
def run_on_blank(model: nn.Module, spec, failure: str) -> torch.Tensor:
    """Run ``model`` once, in eval mode, on one blank input shaped as ``spec`` says; return its output.

    Whatever fails (layers that do not fit together, an input the model does not take) is one
    sentence: ``failure``, then the error's first line. A graph is first run on shapes alone (the
    meta device), so one whose layers would be too large is refused before anything is allocated.
    """
    from ..errors import CnnmodError

    modes = {m: m.training for m in model.modules()}  # each restored as it was
    model.eval()
    try:
        if isinstance(model, GraphNetwork):
            _check_sizes(model, (spec.channels, *spec.size), failure)
        return model(torch.zeros(1, spec.channels, *spec.size))
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError, ArithmeticError) as e:
        raise CnnmodError(f"{failure} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    finally:
        for m, training in modes.items():
            m.training = training


def _check_sizes(net: "GraphNetwork", input_shape: tuple[int, ...], failure: str) -> None:
    from ..errors import CnnmodError

    shapes = GraphNetwork(net.graph, {k: v.to("meta") for k, v in net.weights().items()})
    total = [0]

    def check(name, out):  # raised inside the meta run: nothing larger is even shaped
        total[0] += out.numel()
        if out.numel() > MAX_LAYER_ELEMENTS:
            raise CnnmodError(f"{failure} (layer {name!r} would hold {out.numel():,} values per image; at most "
                              f"{MAX_LAYER_ELEMENTS:,}).")
        if total[0] > MAX_TOTAL_ELEMENTS:
            raise CnnmodError(f"{failure} (its layers up to {name!r} would hold {total[0]:,} values per image; at "
                              f"most {MAX_TOTAL_ELEMENTS:,} in all).")

    shapes.run_all(torch.zeros(1, *input_shape, device="meta"), keep=False, after=check)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors keyed like its state dict (a ``GraphNetwork`` stores them under other keys)."""
    return model.weights() if isinstance(model, GraphNetwork) else dict(model.state_dict())


class GraphNetwork(nn.Module):
    """Execute ``graph`` with ``weights`` (keyed like a state dict): the executor, and nothing else.

    What a strategy adds to the parent (masks, fills, added constants) is part of the graph (each
    node's overlays, ops.py) and of its tensors, so running a module is running a graph. The
    tensors are never written in place: ``set_weight`` rebinds a name to a new tensor, so networks
    built from one parent can share its tensors safely (a module holds views, not copies).
    """

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.graph = graph
        self._keys = {n.name: weight_keys(n) for n in graph.nodes}
        used = {k for keys in self._keys.values() for k in keys.values()}
        self.weight_names = sorted(k for k in weights if k in used)  # not num_batches_tracked, unused layers
        for k in self.weight_names:
            self.register_buffer(_key(k), weights[k].detach())
        self._readers = graph.readers()
        # After which node each value is no longer needed: freed then, so a forward pass holds
        # only the live activations (a ResNet-20 batch would otherwise keep all ~80 of them).
        self._free_after = graph.last_reads()

    def weight(self, name: str) -> torch.Tensor | None:
        return getattr(self, _key(name), None)

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Bind tensor ``name`` to ``value`` (a new tensor; the old one is left as it was)."""
        if name not in self.weight_names:
            raise KeyError(f"the network holds no tensor {name!r}")
        self._buffers[_key(name)] = value.detach()

    @contextmanager
    def bound(self, tensors: dict[str, torch.Tensor]):
        """Run on ``tensors`` (by name) instead of the network's own while the block lasts, autograd
        kept (distillation trains them); the network's own tensors are bound again afterwards."""
        unknown = sorted(set(tensors) - set(self.weight_names))
        if unknown:
            raise KeyError(f"the network holds no tensor {unknown[0]!r}")
        own = {k: self.weight(k) for k in tensors}
        self._buffers.update({_key(k): t for k, t in tensors.items()})
        try:
            yield self
        finally:
            self._buffers.update({_key(k): t for k, t in own.items()})

    def readers(self, name: str) -> set[str]:
        """The layers that read layer ``name``'s output."""
        return self._readers.get(name, set())

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: self.weight(k) for k in self.weight_names}

    @torch.no_grad()
    def shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Return each layer's output shape (without the batch) for inputs of ``input_shape``."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        values = self.run_all(torch.zeros(1, *input_shape, device=device))
        return {k: tuple(v.shape[1:]) for k, v in values.items()}

    def forward(self, x: torch.Tensor, after=None) -> torch.Tensor:
        return self.run_all(x, keep=False, after=after)[self.graph.output]

    def run_all(self, x: torch.Tensor, *, keep: bool = True, before=None, after=None, only: set[str] | None = None,
                given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph; return every layer's output by name (``keep=False``: only the output).

        ``before(node, inputs)``, if given, is called before each layer runs (it may rebind the
        layer's weights: the channels strategy re-fits layers one by one on their real inputs).
        ``after(name, output)`` is called with each layer's output (the statistics pass observes).
        ``only``: run just these layers (a shared trunk, or what follows it); with ``keep=False`` a
        trunk run returns the trunk's values that later layers read. ``given``: values of layers
        computed elsewhere (by that trunk run).
        """
        values = {}
        for i, node in enumerate(self.graph.nodes):
            if given is not None and node.name in given:
                values[node.name] = given[node.name]
            elif only is None or node.name in only:
                values[node.name] = self._step(node, x, values, before, after)
                for name in self._free_after.get(i, ()) if not keep else ():
                    if only is None or self._readers[name] <= only:  # else a layer outside this run reads it
                        values.pop(name, None)
        return values

    def _step(self, node, x: torch.Tensor, values: dict, before, after) -> torch.Tensor:
        if node.op == "input":
            out = x
        else:
            xs = [values[i] for i in node.inputs]
            if before is not None:
                before(node, xs)
            out = self._run(node, node.op, xs)
        for overlay in node.then:
            out = self._run(node, overlay, [out])
        if after is not None:
            after(node.name, out)
        return out

    def _run(self, node, op: str, xs: list[torch.Tensor]) -> torch.Tensor:
        keys = self._keys[node.name]
        return REGISTRY[op].run(node, xs, lambda role: self.weight(keys[role]))
