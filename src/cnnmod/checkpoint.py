"""Model checkpoints: weights plus everything needed to rebuild and feed the model.

Two kinds, one format:
- a *registered* architecture (``resnet20``, ``smallcnn``, ...): its name and arguments, rebuilt
  with ``create_model`` (format version 1);
- *any other* model cnnmod can trace (a torchvision or timm network, your own): its layer graph,
  stored as data as module files store theirs, and the weights the graph uses (format version 2).
  Loading never runs the model's code: the graph runs on cnnmod's executor (``GraphNetwork``).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import __version__
from .data.inputspec import InputSpec
from .errors import CnnmodError
from .files import read_file, write_file
from .models import create_model, list_models
from .trace.network import run_on_blank

FORMAT = "cnnmod.checkpoint"
FORMAT_VERSION = 2  # 2 added graph checkpoints (any traceable model); version 1 files still load


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, classes: list[str], input_spec: InputSpec,
                    architecture: str | None = None, arch_args: dict | None = None, **provenance) -> None:
    """Write ``model``'s weights and metadata (classes, input, provenance) to ``path``.

    A registered ``architecture`` (with its ``arch_args``) is rebuilt by name on loading; any other
    model is traced and stored as its layer graph (``architecture`` then only describes it,
    for example ``"torchvision:resnet50"``).

    >>> save_checkpoint(torchvision.models.resnet18(num_classes=10).eval(), "r18.safetensors",
    ...                 classes=[str(i) for i in range(10)], input_spec=InputSpec(3, (32, 32), MEAN, STD))
    """
    meta = {"format": FORMAT, "library_version": __version__, "classes": list(classes),
            "input": input_spec.to_dict(), **provenance}
    failure = (f"expected the model to take inputs of {input_spec.channels} x {input_spec.size[0]} x "
               f"{input_spec.size[1]} (its input specification), found that it does not")
    out = run_on_blank(model, input_spec, failure)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        found = tuple(out.shape)[1:] if isinstance(out, torch.Tensor) else type(out).__name__
        raise CnnmodError(f"expected a model returning one tensor of logits (batch, classes), found {found}.")
    outputs = out.shape[1]
    if outputs != len(classes):
        raise CnnmodError(f"expected {outputs} class names (the model's outputs), found {len(classes)}.")
    if architecture in list_models():
        tensors = dict(model.state_dict())
        meta.update(format_version=1, architecture=architecture, arch_args=arch_args or {})
    else:
        from .trace import trace_graph, weights_of
        from .trace.ops import weight_keys

        graph = trace_graph(model, (input_spec.channels, *input_spec.size))
        everything = weights_of(model)
        tensors = {k: everything[k] for n in graph.nodes for k in weight_keys(n).values() if k in everything}
        meta.update(format_version=2, architecture=architecture or type(model).__name__, arch_args={},
                    graph=graph.to_dict())
    write_file(path, tensors, meta)


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model stored in ``path``, in eval mode; its metadata is ``model.cnnmod_meta``.

    >>> model = load_model("benchmarks/checkpoints/cifar10_resnet20.safetensors")
    >>> model.cnnmod_meta["classes"][:2]
    ['airplane', 'automobile']
    """
    tensors, meta = read_file(path, expect=FORMAT)
    if meta["format_version"] not in (1, FORMAT_VERSION):
        raise CnnmodError(f"{path}: expected checkpoint format version 1 or {FORMAT_VERSION}, "
                          f"found {meta['format_version']!r} (written by a newer cnnmod?).")
    if "graph" in meta:
        model = _graph_model(path, tensors, meta)
    else:
        try:
            model = create_model(meta["architecture"], **meta["arch_args"])
            model.load_state_dict(tensors)
        except (KeyError, RuntimeError) as e:
            raise CnnmodError(f"{path}: the weights do not fit architecture "
                              f"{meta.get('architecture')!r} ({str(e).splitlines()[0]}).") from None
    model.eval()
    model.cnnmod_meta = meta
    model.input_spec = InputSpec.from_dict(meta["input"])
    return model


def _graph_model(path, tensors: dict, meta: dict) -> nn.Module:
    """A graph checkpoint's network, run once on a blank input so that layers that do not fit are refused now."""
    from .trace import Graph, GraphNetwork

    net = GraphNetwork(Graph.from_dict(meta["graph"]), tensors)
    out = run_on_blank(net, InputSpec.from_dict(meta["input"]),
                       f"{path}: the checkpoint's layers do not fit together")
    if tuple(out.shape) != (1, len(meta["classes"])):
        raise CnnmodError(f"{path}: expected {len(meta['classes'])} outputs (its classes), "
                          f"found {tuple(out.shape)[1:]}.")
    return net
