"""Observation files: one statistics pass saved, to build modules from later (``cnnmod.observe``).

A data-only safetensors file, like every cnnmod file: the parent's tensors, the statistics tables
(bits, channel counts, value sums), the sample images for re-fits, the sample's indices and the
labels; the layer graph, the input specification and the class names in its metadata. Loading runs
nothing and checks the checksum; ``build`` then needs neither the model nor the data.
"""

from __future__ import annotations

import os


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
            "classes": obs.classes, "common": obs.common, "timing": obs.timing, "focus": p.focus,
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
        shapes = GraphNetwork(graph, weights).shapes(input_shape)
        parent = Parent(graph, weights, stats, shapes, str(meta["head"]), input_shape, sample=tensors.get("sample"),
                        sample_labels=tensors.get("sample_labels"), focus=meta["focus"])
        sample = Sample(tensors["sample_negatives"], tensors["sample_rest"], int(meta["positives"]),
                        int(meta["negatives_per_class"]))
        return Observation(parent, InputSpec.from_dict(meta["input"]), list(meta["classes"]),
                           ParentTensors.of(weights), dict(meta["common"]), tensors["labels"], sample,
                           dict(meta["timing"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CnnmodError(f"{path}: expected a complete observation, found a damaged or partial one "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
