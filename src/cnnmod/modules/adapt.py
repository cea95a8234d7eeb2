"""Continuous learning (paper section 3.5): re-run tangling identification with foreign images.

When a module is composed with modules of another data set, the classes of that data set are
negatives it never saw. Re-running TI with their images keeps the elements they activate, so
the module learns to say "not mine" to them. MC-BLN removals stay removed. No weight changes.
"""

from __future__ import annotations

import torch

from ..concerns import backtrack_removed, mc_bln_features
from ..errors import CnnmodError
from ..statistics.collect import head_layer
from ..trace import GraphNetwork, overlay_maps, plain
from ..trace.overlays import set_mask
from .module import Module


@torch.no_grad()
def adapt_(module: Module, images: torch.Tensor, *, batch_size: int = 256) -> int:
    """Keep every element that raw uint8 ``images`` activate; return how many were added back."""
    if module.meta.get("strategy") != "paper":
        raise CnnmodError(f"module {module.class_name!r}: continuous learning is defined for the paper strategy, "
                          f"found {module.meta.get('strategy')!r}.")
    net = module.network
    keep = overlay_maps(net, "mask")
    parent = GraphNetwork(*plain(net))  # unmasked: TI observes the parent's values
    active = {name: torch.zeros_like(k) for name, k in keep.items()}

    def observe(name, out):
        if name in active:
            active[name] |= (out > 0).any(0)

    for chunk in images.split(batch_size):
        parent(module.input_spec.prepare(chunk), after=observe)
    head = head_layer(net.graph)
    removed = mc_bln_features(net.weight(f"{head}.weight"), module.meta["options"].get("delta", 0.5))
    shapes = parent.shapes((module.input_spec.channels, *module.input_spec.size))
    gone = backtrack_removed(net.graph, net.graph.by_name[head].inputs[0], removed, set(keep), shapes)
    added = 0
    for name, k in keep.items():
        new = k | (active[name] & ~gone.get(name, torch.zeros_like(k)))
        added += int((new & ~k).sum())
        set_mask(net, name, new)
    kept = sum(int(m.sum()) for m in overlay_maps(net, "mask").values())
    module.meta["share_kept"] = kept / module.meta["elements_total"]
    module.meta["elements_kept"] = kept
    module.meta["adapted_with_images"] = module.meta.get("adapted_with_images", 0) + len(images)
    return added
