"""Modularity metrics of the field, for modules of one parent (``cnnmod inspect DIR --metrics``).

Modular-training papers (MwT, Qi et al. 2023; MODA) describe modules by the kernels they keep:

- kernel retention: the share of the parent's kernels (convolution output channels) a module
  keeps. A channels module keeps whole kernels (its file records which, ``kept_kernels``); a paper
  module keeps every weight and masks feature elements, so a kernel counts as kept where any of
  its layer's masked elements stays.
- overlap: the Jaccard index of two modules' kept kernels (|A and B| / |A or B|).
- cohesion and coupling (from images): each image goes through the module of its class, and its
  active kernels are the kept kernels whose output is positive somewhere on it. Cohesion is the
  mean Jaccard index of the active sets of two images of one class, coupling that of two images
  of different classes. High cohesion and low coupling: each class has its own part of the network.
"""

from __future__ import annotations

import math

import torch

from ..bits import pack, unpack
from ..errors import CnnmodError
from .module import Module

MASKS = ("bitmask", "mask")  # the overlays a paper module's masks are stored as


def record_kernels(keep: dict[str, torch.Tensor]) -> dict[str, str]:
    """``kept_kernels`` as module files store it: per pruned convolution, its kept output channels
    as packed bits in hex, and how many the parent has (``"64:ff0f..."``)."""
    return {name: f"{len(k)}:{pack(k).numpy().tobytes().hex()}" for name, k in sorted(keep.items())}


def kernels(module: Module) -> dict[str, torch.Tensor]:
    """Which of the parent's kernels the module keeps: per layer, a bool per parent channel."""
    net, kept = module.network, {}
    if module.meta.get("strategy") == "channels":
        recorded = module.meta.get("kept_kernels")
        if not isinstance(recorded, dict):
            raise CnnmodError(f"module {module.class_name!r}: expected the kernels it kept in its file "
                              "(modules of cnnmod 0.9 and later record them), found none; decompose again.")
        for node in net.graph.nodes:
            if node.op != "conv":
                continue
            if node.name in recorded:
                n, bits = recorded[node.name].split(":")
                kept[node.name] = unpack(torch.frombuffer(bytearray.fromhex(bits), dtype=torch.uint8), int(n))
            else:
                kept[node.name] = torch.ones(net.weight(f"{node.name}.weight").shape[0], dtype=torch.bool)
        return kept
    for node in net.graph.nodes:
        for overlay in node.then:
            if overlay in MASKS:
                mask = net.weight(f"{node.name}.{'bits' if overlay == 'bitmask' else 'mask'}")
                shape = tuple(int(s) for s in net.weight(f"{node.name}.shape").tolist()) \
                    if overlay == "bitmask" else tuple(mask.shape)
                full = unpack(mask, math.prod(shape)).view(shape) if overlay == "bitmask" else mask.bool()
                kept[node.name] = full.flatten(1).any(1) if full.dim() > 1 else full
    return kept


def retention(module: Module) -> float:
    """The share of the parent's kernels the module keeps."""
    kept = kernels(module)
    return sum(int(k.sum()) for k in kept.values()) / max(1, sum(len(k) for k in kept.values()))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Jaccard index of the rows of two bool matrices (N, E) and (M, E): (N, M); 1 where both are empty."""
    a, b = a.float(), b.float()
    both = a @ b.T
    either = a.sum(1, keepdim=True) + b.sum(1) - both
    return torch.where(either > 0, both / either.clamp_min(1), torch.ones_like(both))


def overlap(modules: list[Module]) -> torch.Tensor:
    """(M, M): the Jaccard index of each two modules' kept kernels."""
    flat = _flat(modules, [kernels(m) for m in modules])
    return jaccard(flat, flat)


@torch.no_grad()
def cohesion_coupling(modules: list[Module], images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256) -> dict:
    """Cohesion and coupling of ``modules`` on prepared ``images`` whose ``labels`` index ``modules``
    (each image goes through its class's module; see the top of this file)."""
    kept = [kernels(m) for m in modules]
    active = torch.zeros(len(images), sum(len(k) for k in kept[0].values()), dtype=torch.bool)
    for c, m in enumerate(modules):
        rows = torch.nonzero(labels == c).flatten()
        for part in rows.split(batch_size):
            active[part] = _active(m, kept[c], images[part])
    pairs = jaccard(active, active)
    upper = torch.triu(torch.ones_like(pairs, dtype=torch.bool), diagonal=1)
    same = pairs[upper & (labels[:, None] == labels[None, :])]
    other = pairs[upper & (labels[:, None] != labels[None, :])]
    return {"cohesion": float(same.mean()) if len(same) else float("nan"),
            "coupling": float(other.mean()) if len(other) else float("nan"), "images": len(images),
            "active_share": float(active.float().mean())}


def _active(module: Module, kept: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, parent kernels): the module's kept kernels whose output is positive somewhere on each image
    (a channels module's convolutions hold their BatchNorm; a paper module's masked layers are its
    activations)."""
    values: dict = {}
    module.network(x, after=lambda name, out: values.__setitem__(name, out) if name in kept else None)
    parts = []
    for name, k in kept.items():
        full = torch.zeros(len(x), len(k), dtype=torch.bool)
        mine = values[name].flatten(2).amax(2) > 0 if values[name].dim() > 2 else values[name] > 0
        full[:, k.nonzero().flatten() if mine.shape[1] < len(k) else torch.arange(len(k))] = mine
        parts.append(full & k)
    return torch.cat(parts, 1)


def _flat(modules: list[Module], kept: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Each module's kept kernels as one row (M, parent kernels); the modules must share a parent."""
    layers = {tuple((n, len(k)) for n, k in each.items()) for each in kept}
    if len(layers) > 1 or len({m.meta.get("parent_fingerprint") for m in modules}) > 1:
        raise CnnmodError("expected modules of one parent and strategy for modularity metrics, found modules of "
                          "several (compare each parent's folder on its own).")
    return torch.stack([torch.cat(list(each.values())) for each in kept])
