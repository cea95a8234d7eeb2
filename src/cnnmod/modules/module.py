"""The module: a binary classifier (this class / not this class) carved out of a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..data.inputspec import InputSpec
from ..trace.network import GraphNetwork

if TYPE_CHECKING:
    from .shared import ParentTensors


@dataclass
class Module:
    """One class's module.

    ``network`` maps a prepared batch (B, C, H, W) to two logits (B, 2): column 0 is
    "not this class", column 1 is "this class". ``input_spec`` says how to prepare raw images.
    """

    class_index: int
    class_name: str
    network: GraphNetwork
    input_spec: InputSpec
    meta: dict = field(default_factory=dict)
    # The parent tensors its network shares (set by decompose and by loading a module of a
    # decomposition folder): what lets a folder store the parent once (shared.py).
    parent: "ParentTensors | None" = field(default=None, repr=False, compare=False)
    # Which of the parent's channels each layer of a channels module kept (set by ``build``, in
    # memory only): the channel space of each layer and a bool per channel of each space. The
    # distillation compares the module's features with the parent's at these channels.
    kept: "tuple[dict[str, int], dict[int, torch.Tensor]] | None" = field(default=None, repr=False, compare=False)

    @torch.no_grad()
    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """Return z_concern - z_not_concern (B,): > 0 means the module votes for its class."""
        z = self.network(x)  # (B, 2)
        return z[:, 1] - z[:, 0]
