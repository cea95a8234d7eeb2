"""Run a ``Graph`` on a dictionary of weights: the network, rebuilt without the model's code.

``GraphNetwork`` is what module files hold. It can zero elements of chosen layers (``masks``),
replace the final layer by a module's head, and it exports to ONNX since it is plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .graph import Graph
from .ops import REGISTRY, weight_keys


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names may not contain dots


def conv2d(node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A ``conv`` node's convolution, with the given weights."""
    return REGISTRY["conv"].run(node, [x], {"weight": weight, "bias": bias}.get)


@torch.no_grad()
def run_on_blank(model: nn.Module, spec, failure: str) -> torch.Tensor:
    """Run ``model`` once, in eval mode, on one blank input shaped as ``spec`` says; return its output.

    Whatever fails (layers that do not fit together, an input the model does not take) is one
    sentence: ``failure``, then the error's first line.
    """
    was = model.training
    model.eval()
    try:
        return model(torch.zeros(1, spec.channels, *spec.size))
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        from ..errors import CnnmodError

        raise CnnmodError(f"{failure} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    finally:
        model.train(was)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors keyed like its state dict (a ``GraphNetwork`` stores them under other keys)."""
    return model.weights() if isinstance(model, GraphNetwork) else dict(model.state_dict())


class GraphNetwork(nn.Module):
    """Execute ``graph`` with ``weights`` (keyed like a state dict), masking ``masks``' layers."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor] | None = None, fills: dict[str, torch.Tensor] | None = None,
                 addmaps: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.graph = graph
        self._keys = {n.name: weight_keys(n) for n in graph.nodes}
        used = {k for keys in self._keys.values() for k in keys.values()}
        self.weight_names = sorted(k for k in weights if k in used)  # not num_batches_tracked, unused layers
        for k in self.weight_names:
            self.register_buffer(_key(k), weights[k].detach())  # shared, never modified in place
        self.mask_names = sorted(masks or {})
        self.observer = None  # callable(name, value) while statistics are collected
        # After which node each value is no longer needed: freed then, so a forward pass holds
        # only the live activations (a ResNet-20 batch would otherwise keep all ~80 of them).
        self._readers: dict[str, set[str]] = {}
        for node in graph.nodes:
            for i in node.inputs:
                self._readers.setdefault(i, set()).add(node.name)
        last = {n.name: i for i, node in enumerate(graph.nodes) for n in graph.nodes if n.name in node.inputs}
        self._free_after: dict[int, list[str]] = {}
        for name, i in last.items():
            if name != graph.output:
                self._free_after.setdefault(i, []).append(name)
        for k in self.mask_names:
            self.register_buffer("mask__" + _key(k), masks[k].bool())  # (C, H, W) or (F,) keep mask
        # Removed elements take a constant instead of 0 where ``fills`` says (the channels strategy).
        self.fill_names = sorted(fills or {})
        for k in self.fill_names:
            self.register_buffer("fill__" + _key(k), fills[k].float())
        # A physically extracted network adds what its removed inputs contributed (a constant).
        self.addmap_names = sorted(addmaps or {})
        for k in self.addmap_names:
            self.register_buffer("addmap__" + _key(k), addmaps[k].float())

    def weight(self, name: str) -> torch.Tensor | None:
        return getattr(self, _key(name), None)

    def mask(self, name: str) -> torch.Tensor | None:
        return getattr(self, "mask__" + _key(name), None)

    def fill(self, name: str) -> torch.Tensor | None:
        return getattr(self, "fill__" + _key(name), None)

    def addmap(self, name: str) -> torch.Tensor | None:
        return getattr(self, "addmap__" + _key(name), None)

    def readers(self, name: str) -> set[str]:
        """The layers that read layer ``name``'s output."""
        return self._readers.get(name, set())

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: self.weight(k) for k in self.weight_names}

    def masks(self) -> dict[str, torch.Tensor]:
        return {k: self.mask(k) for k in self.mask_names}

    def fills(self) -> dict[str, torch.Tensor]:
        return {k: self.fill(k) for k in self.fill_names}

    def addmaps(self) -> dict[str, torch.Tensor]:
        return {k: self.addmap(k) for k in self.addmap_names}

    @torch.no_grad()
    def shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Return each layer's output shape (without the batch) for inputs of ``input_shape``."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        values = self.run_all(torch.zeros(1, *input_shape, device=device))
        return {k: tuple(v.shape[1:]) for k, v in values.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_all(x, keep=False)[self.graph.output]

    def run_all(self, x: torch.Tensor, *, keep: bool = True, before=None, only: set[str] | None = None,
                given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph; return every layer's output by name (``keep=False``: only the output).

        ``before(node, inputs)``, if given, is called before each layer runs (it may change the
        layer's weights: the channels strategy re-fits layers one by one on their real inputs).
        ``only``: run just these layers (a shared trunk, or what follows it); with ``keep=False`` a
        trunk run returns the trunk's values that later layers read. ``given``: values of layers
        computed elsewhere (by that trunk run).
        """
        values = {}
        for i, node in enumerate(self.graph.nodes):
            if given is not None and node.name in given:
                values[node.name] = given[node.name]
            elif only is None or node.name in only:
                values[node.name] = self._step(node, x, values, before)
                for name in self._free_after.get(i, ()) if not keep else ():
                    if only is None or self._readers[name] <= only:  # else a layer outside this run reads it
                        values.pop(name, None)
        return values

    def _step(self, node, x: torch.Tensor, values: dict, before) -> torch.Tensor:
        if node.op == "input":
            out = x
        else:
            xs = [values[i] for i in node.inputs]
            if before is not None:
                before(node, xs)
            out = self._run(node, xs)
        if node.name in self.addmap_names:
            out = out + self.addmap(node.name)
        if node.name in self.fill_names:
            out = torch.where(self.mask(node.name), out, self.fill(node.name))
        elif node.name in self.mask_names:
            out = out * self.mask(node.name)  # zero this module's inactive elements
        if self.observer is not None:
            self.observer(node.name, out)
        return out

    def _run(self, node, xs: list[torch.Tensor]) -> torch.Tensor:
        keys = self._keys[node.name]
        return REGISTRY[node.op].run(node, xs, lambda role: self.weight(keys[role]))
