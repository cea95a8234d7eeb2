"""Name -> model constructor, as in timm."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import CnnmodError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes``, ``in_channels`` and its own options."""
    if name not in _MODELS:
        raise CnnmodError(f"expected a model name among {', '.join(list_models())}, found {name!r}.")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        raise CnnmodError(f"model {name!r} does not accept these arguments {kwargs}: {e}.") from None
