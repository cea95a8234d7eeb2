"""Model checkpoints: weights plus everything needed to rebuild and feed the model."""

from __future__ import annotations

import os

import torch.nn as nn

from . import __version__
from .data.inputspec import InputSpec
from .errors import CnnmodError
from .files import read_file, write_file
from .models import create_model

FORMAT = "cnnmod.checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, architecture: str, arch_args: dict,
                    classes: list[str], input_spec: InputSpec, **provenance) -> None:
    """Write ``model``'s weights and metadata (architecture, classes, input, provenance) to ``path``."""
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "architecture": architecture, "arch_args": arch_args, "classes": list(classes),
        "input": input_spec.to_dict(), **provenance,
    }
    write_file(path, dict(model.state_dict()), meta)


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model stored in ``path``, in eval mode; its metadata is ``model.cnnmod_meta``.

    >>> model = load_model("benchmarks/checkpoints/cifar10_resnet20.safetensors")
    >>> model.cnnmod_meta["classes"][:2]
    ['airplane', 'automobile']
    """
    tensors, meta = read_file(path, expect=FORMAT)
    if meta["format_version"] != FORMAT_VERSION:
        raise CnnmodError(f"{path}: expected checkpoint format version {FORMAT_VERSION}, "
                          f"found {meta['format_version']!r} (written by a newer cnnmod?).")
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
