"""Observation files: one statistics pass saved, to build modules from later (``cnnmod.observe``).

A data-only safetensors file, like every cnnmod file: the parent's tensors, the statistics tables
(bits, channel counts, value sums), the sample images for re-fits, the sample's indices and the
labels; the layer graph, the input specification and the class names in its metadata. Loading runs
nothing and checks the checksum; ``build`` then needs neither the model nor the data.
"""

from __future__ import annotations

import math
import os

import torch

from ..data.inputspec import InputSpec
from ..errors import CnnmodError
from ..files import read_file, write_file
from ..statistics import ActivationStats, Sample
from ..trace import Graph, GraphNetwork
from .observe import Observation
from .shared import ParentTensors
from .strategies import Parent

FORMAT = "cnnmod.observation"
TABLES = ("active_rest", "active_neg", "channel_counts", "sums")


def save_observation(obs: Observation, path: str | os.PathLike) -> None:
    """Write ``obs`` to ``path`` (atomically; the same observation always gives the same bytes)."""
    p, stats = obs.parent, obs.parent.stats
    tensors = {f"w.{k}": v for k, v in p.weights.items()}
    for table in TABLES:
        tensors.update({f"{table}.{k}": v for k, v in (getattr(stats, table) or {}).items()})
    tensors.update(seen_neg=stats.seen_neg, seen_rest=stats.seen_rest, rows=stats.rows, labels=obs.labels,
                   sample_negatives=obs.sample.negatives, sample_rest=obs.sample.rest)
    if p.sample is not None:
        tensors.update(sample=p.sample, sample_labels=p.sample_labels)
    meta = {"format": FORMAT, "format_version": 1, "graph": p.graph.to_dict(), "head": p.head,
            "input_shape": list(p.input_shape), "layers": stats.layers,
            "layer_shapes": {k: list(v) for k, v in stats.shapes.items()}, "input": obs.spec.to_dict(),
            "classes": obs.classes, "common": obs.common, "focus": p.focus,  # no timings: same pass, same bytes
            "positives": obs.sample.positives, "negatives_per_class": obs.sample.negatives_per_class}
    write_file(path, tensors, meta)


def load_observation(path: str | os.PathLike) -> Observation:
    """Read an observation file; nothing is executed, damaged files are refused."""
    tensors, meta = read_file(path, expect=FORMAT)
    try:
        graph = Graph.from_dict(meta["graph"])
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        tables = {t: {k[len(t) + 1:]: v for k, v in tensors.items() if k.startswith(t + ".")} for t in TABLES}
        layers = [str(n) for n in meta["layers"]]
        stats = ActivationStats(layers, {k: tuple(v) for k, v in meta["layer_shapes"].items()}, tables["active_rest"],
                                tables["active_neg"], tables["channel_counts"] or None, tensors["seen_neg"],
                                tensors["seen_rest"], tensors["rows"], tables["sums"] or None)
        if not all(name in t for name in layers for t in (tables["active_rest"], tables["active_neg"])):
            raise KeyError("statistics of an observed layer")
        input_shape = tuple(int(d) for d in meta["input_shape"])
        spec = InputSpec.from_dict(meta["input"])
        if input_shape != (spec.channels, *spec.size) or not 1 <= spec.size[0] * spec.size[1] <= 4096 * 4096:
            raise ValueError(f"input shape {input_shape} does not fit the input specification")
        shapes = GraphNetwork(graph, weights).shapes(input_shape)
        _check_tables(stats, shapes, weights[f"{meta['head']}.weight"].shape[0], meta["focus"], len(meta["classes"]))
        parent = Parent(graph, weights, stats, shapes, str(meta["head"]), input_shape, sample=tensors.get("sample"),
                        sample_labels=tensors.get("sample_labels"), focus=meta["focus"])
        sample = Sample(tensors["sample_negatives"], tensors["sample_rest"], int(meta["positives"]),
                        int(meta["negatives_per_class"]))
        return Observation(parent, spec, list(meta["classes"]), ParentTensors.of(weights), dict(meta["common"]),
                           tensors["labels"], sample)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CnnmodError(f"{path}: expected a complete observation, found a damaged or partial one "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None


def _check_tables(stats: ActivationStats, shapes: dict, k: int, focus, n_classes: int) -> None:
    """Every table shaped as the graph and the classes say; ValueError says what is not."""
    r = len(next(iter(stats.active_rest.values()))) if stats.active_rest else 0
    if n_classes != k or stats.rows.shape != (k,) or stats.seen_neg.shape != (k,) or stats.seen_rest.shape != (k,):
        raise ValueError(f"tables for {k} classes expected")
    if stats.rows.dtype != torch.int64 or not bool(((stats.rows >= -1) & (stats.rows < r)).all()):
        raise ValueError("class rows out of range")
    for name in stats.layers:
        shape = shapes.get(name)
        e = (math.prod(shape) + 7) // 8 if shape else -1
        if tuple(stats.shapes.get(name, ())) != shape or stats.active_rest[name].shape != (r, e) \
                or stats.active_neg[name].shape != (e,) or stats.active_rest[name].dtype != torch.uint8 \
                or stats.active_neg[name].dtype != torch.uint8:
            raise ValueError(f"the bits of layer {name} do not fit its shape {shape}")
        if stats.channel_counts is not None and stats.channel_counts[name].shape != (k, shape[0]):
            raise ValueError(f"the channel counts of layer {name} do not fit its shape {shape}")
        if stats.sums is not None and tuple(stats.sums[name].shape) != shape:
            raise ValueError(f"the sums of layer {name} do not fit its shape {shape}")
    if focus is not None and not all(isinstance(c, int) and 0 <= c < k and stats.rows[c] >= 0 for c in focus):
        raise ValueError("classes to build without statistics")
