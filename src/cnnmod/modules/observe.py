"""Step 2 and 3 of the pipeline as one object: observe a model on data once, build modules of any kind.

``observe(model, data)`` traces the model, chooses the statistics sample and runs the one pass
(statistics/collect.py); the ``Observation`` holds everything a strategy needs (the parent's
graph and tensors, the statistics, a sample of prepared images for re-fits) and can be saved and
loaded (``save_observation``, ``load_observation``). ``build(observation, strategy, options)``
(decompose.py) turns it into modules without another pass, as often as wanted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import __version__
from ..concerns.channeling import append_logits_head
from ..data.inputspec import InputSpec
from ..data.sources import Dataset
from ..data.stream import ImageFiles
from ..distributed import check_resume_alone, rank_and_world, resolve_device
from ..errors import CnnmodError
from ..options import check, option
from ..statistics import Sample, collect_statistics, select_sample
from ..statistics.collect import ends_in_linear, head_layer
from ..statistics.progress import ProgressSaver
from ..trace import GraphNetwork, trace_graph, weights_of
from .distill import training_macs
from .shared import ParentTensors
from .strategies import Parent


@dataclass
class Observation:
    """One statistics pass over a model and its data: what every strategy builds modules from."""

    parent: Parent  # graph, tensors, statistics, shapes, head, sample images (strategies.py)
    spec: InputSpec  # how the modules will prepare raw images
    classes: list[str]
    shared: ParentTensors  # the tensors every module's network shares
    common: dict  # metadata every module records (sample options, parent, library version)
    labels: torch.Tensor  # (N,) each data image's class (model index)
    sample: Sample  # which images the pass observed
    timing: dict = field(default_factory=dict)  # statistics_seconds, images, ... (this run's; not saved)

    @property
    def focus(self) -> list[int]:
        """The classes modules are built for (``only``), in the model's order."""
        return self.parent.focus if self.parent.focus is not None else list(range(len(self.classes)))


@dataclass(frozen=True)
class ObserveOptions:
    """How the statistics pass observes: which images, in what batches, how they are read (the
    flags of ``decompose``; ``decompose``'s keyword arguments of these names come here)."""

    positives: int = option(1000, "images per class observed (the paper's number)", "count")
    negatives_per_class: int | None = option(None, "negatives of each other class (default: positives // "
                                                   "(classes - 1), 1:1)", "count0")
    seed: int = option(0, "fixes which images are observed", "integer")
    batch_size: int = option(256, "images per batch of the statistics pass", "count")
    sample_images: int = option(256, "channels strategy: images of the observed sample that channels are scored "
                                     "and layers re-fitted on (more: closer re-fits, slower)", "count")
    workers: int | None = option(None, "processes decoding an image folder's batches ahead of the statistics pass "
                                       "(default: up to 4; 0: decode in the main process)", "count0")
    precision: str = option("fp32", "bf16: autocast statistics pass (faster on GPUs; may change masks, see "
                                    "BENCHMARKS.md)", "choice", choices=("fp32", "bf16"))

    def __post_init__(self):
        check(self)

    @classmethod
    def of(cls, options: "ObserveOptions | None" = None, **given) -> "ObserveOptions":
        """``options``, or the dataclass of keyword options ``given`` (an unknown one refused)."""
        if options is not None:
            return dataclasses.replace(options, **given) if given else options
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CnnmodError(f"expected observation options among {', '.join(f.name for f in dataclasses.fields(cls))},"
                              f" found {', '.join(sorted(unknown))}.")
        return cls(**given)


def observe(model: nn.Module, dataset, *, options: ObserveOptions | None = None, classes: list[str] | None = None,
            input_spec: InputSpec | None = None, progress: bool = False, progress_file: str | None = None,
            resume: bool = False, device: str = "cpu", only: list[str] | None = None, sums: bool = True,
            **given) -> Observation:
    """Observe ``model`` on ``dataset`` once (see ``decompose`` for the arguments).

    ``options`` (``ObserveOptions``), or its fields as keyword arguments (``positives=100``): which
    images are observed, in what batches. ``sums``: also sum every observed value and keep
    ``sample_images`` prepared images of the sample, which the ``channels`` strategy needs (the
    ``paper`` strategy does not: without them the pass is cheaper). With ``only``, the other
    classes' images are their negatives alone: what the modules of ``only`` are built from.
    """
    o = ObserveOptions.of(options, **given)
    positives, negatives_per_class, seed, batch_size = o.positives, o.negatives_per_class, o.seed, o.batch_size
    sample_images, workers, precision = o.sample_images, o.workers, o.precision
    start = time.perf_counter()
    meta = getattr(model, "cnnmod_meta", {})
    spec = input_spec or getattr(model, "input_spec", None)
    input_shape = _input_shape(dataset, spec)
    graph = trace_graph(model, input_shape)
    captured = time.perf_counter() - start
    weights = {k: v.detach().cpu() for k, v in weights_of(model).items()}
    if not ends_in_linear(graph):  # SqueezeNet: conv, ReLU, pooling; its K logits get an identity Linear head
        shape = GraphNetwork(graph, weights).shapes(input_shape)[graph.output]
        if len(shape) != 1:
            raise CnnmodError(f"expected the model to output (batch, classes) logits, found shape {shape}.")
        graph, weights = append_logits_head(graph, weights, shape[0])
    head = head_layer(graph)
    num_classes = weights[f"{head}.weight"].shape[0]
    classes = list(classes or meta.get("classes") or [str(i) for i in range(num_classes)])
    if len(classes) != num_classes:
        raise CnnmodError(f"expected {num_classes} class names (the model's outputs), found {len(classes)}.")

    focus = _focus(only, classes)
    labels, fetch = _adapt(dataset, classes, spec)
    sample = select_sample(labels, num_classes, positives=positives, negatives_per_class=negatives_per_class,
                           seed=seed, required=focus, names=classes)
    if only is not None:  # the other classes' images: their negatives only (channel scores compare rates per class)
        sample = Sample(sample.negatives, sample.rest[torch.isin(labels[sample.rest], torch.tensor(focus))],
                        sample.positives, sample.negatives_per_class)
    batches = sample_batches(fetch, labels, sample, batch_size)
    shared = ParentTensors.of(weights)  # what every module's network shares (views, not copies)
    fingerprint = shared.checksum[:16]
    saver = None
    check_resume_alone(resume)
    if progress_file is not None and rank_and_world()[1] == 1:  # ranks would race for one file
        key = hashlib.sha256(f"{fingerprint}|{batch_size}|{num_classes}|{sums}|{only and focus}".encode()
                             + sample.negatives.numpy().tobytes() + sample.rest.numpy().tobytes()).hexdigest()
        saver = ProgressSaver(progress_file, key, resume=resume)
    if workers is None:  # decoding files is the slow part of a streamed pass; tensors in memory need no help
        workers = min(4, os.cpu_count() or 1) if isinstance(dataset, ImageFiles) else 0
    stats = collect_statistics(model, graph, batches, num_classes, progress=progress and rank_and_world()[0] == 0,
                               saver=saver, device=resolve_device(device), precision=precision, sums=sums,
                               weights=weights, classes_kept=None if only is None else focus, workers=workers)
    if saver is not None:
        saver.finish()

    example = fetch(sample.rest[:1] if len(sample.rest) else sample.negatives[:1])
    input_shape = tuple(example.shape[1:])
    pool = torch.cat([sample.negatives, sample.rest])  # the images the statistics saw, all classes
    if only is not None:
        pool = pool[torch.isin(labels[pool], torch.tensor(focus))]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:sample_images]].sort().values
    parent = Parent(graph, weights, stats, GraphNetwork(graph, weights).shapes(input_shape), head, input_shape,
                    sample=fetch(pick) if sums else None, sample_labels=labels[pick],
                    focus=None if only is None else focus)
    common = {
        "options": dict(positives=positives, seed=seed, negatives_per_class=sample.negatives_per_class,
                        **({"precision": precision} if precision != "fp32" else {}),
                        **({"sample_images": int(len(pick))} if sums else {})),
        "parent_fingerprint": fingerprint, "parent_architecture": meta.get("architecture"),
        "parent_classes": classes, "library_version": __version__,
        # What training the parent cost (MACs, from its checkpoint's recipe): what later repairs and
        # distillations report their cost against. Absent for a model that records no recipe.
        **({"parent_training_macs": trained} if (trained := training_macs(meta, parent.cost()["macs"])) else {}),
        **({"only": [classes[c] for c in focus]} if only is not None else {}),
    }
    present = torch.bincount(labels[sample.negatives], minlength=num_classes)
    images = len(sample.negatives) + len(sample.rest)
    timing = {"statistics_seconds": time.perf_counter() - start, "capture_seconds": captured, "images": images,
              "statistics_bytes": stats.nbytes(), "statistics_macs": parent.cost()["macs"] * images,  # forward only
              "negatives_from": {classes[c]: int(present[c]) for c in range(num_classes) if present[c]}}
    return Observation(parent, spec or InputSpec.of_prepared(example), classes, shared, common, labels, sample, timing)


def _focus(only: list[str] | None, classes: list[str]) -> list[int]:
    """The indices of the classes ``only`` names (all classes when None), in the model's order."""
    if only is None:
        return list(range(len(classes)))
    unknown = [n for n in only if n not in classes]
    if unknown or not only:
        raise CnnmodError(f"expected --only to name classes of the model ({', '.join(classes[:10])}), "
                          f"found {', '.join(unknown) or 'none'}.")
    twice = sorted({n for n in only if only.count(n) > 1})
    if twice:
        raise CnnmodError(f"expected --only to name each class once, found {', '.join(twice)} more than once.")
    return sorted({classes.index(n) for n in only})


def _input_shape(dataset, spec: InputSpec | None) -> tuple[int, ...]:
    """One prepared input's shape, without the batch."""
    if isinstance(dataset, (Dataset, ImageFiles)) and spec is not None:
        return (spec.channels, *spec.size)
    if hasattr(dataset, "tensors"):
        return tuple(dataset.tensors[0].shape[1:])
    try:
        return tuple(dataset[0][0].shape)
    except (TypeError, IndexError, AttributeError):
        raise CnnmodError("expected a dataset of (input_tensor, label) pairs or a cnnmod.Dataset.") from None


def _adapt(dataset, classes: list[str], spec: InputSpec | None):
    """Return (labels (N,), fetch(indices) -> prepared batch) for any supported dataset."""
    if isinstance(dataset, (Dataset, ImageFiles)):
        if spec is None:
            raise CnnmodError("expected the model's input specification to prepare raw images "
                              "(load the model with cnnmod.load_model, or pass input_spec=...).")
        from ..evaluate import match_classes

        labels = match_classes(dataset.classes, classes)[dataset.labels]
        if isinstance(dataset, ImageFiles):
            if (dataset.channels, tuple(dataset.size)) != (spec.channels, tuple(spec.size)):
                raise CnnmodError(f"expected images read as {spec.channels}x{spec.size[0]}x{spec.size[1]} (the "
                                  f"model's input), found a folder read as {dataset.channels}x{dataset.size[0]}x"
                                  f"{dataset.size[1]}.")
            return labels, lambda idx: spec.prepare(dataset.load(idx))
        return labels, lambda idx: spec.prepare(dataset.images[idx])
    if hasattr(dataset, "tensors") and len(dataset.tensors) == 2:  # torch TensorDataset
        x, y = dataset.tensors
        return y.long(), lambda idx: x[idx]
    try:
        pairs_labels = getattr(dataset, "targets", None)
        labels = torch.as_tensor(pairs_labels if pairs_labels is not None else [int(y) for _, y in dataset])
    except (TypeError, ValueError):
        raise CnnmodError("expected a dataset of (input_tensor, label) pairs or a cnnmod.Dataset.") from None
    return labels.long(), lambda idx: torch.stack([dataset[int(i)][0] for i in idx])


def sample_batches(fetch, labels: torch.Tensor, sample, batch_size: int) -> list:
    """("neg" | "rest", size, loader) for every batch of the sample, negatives first.

    Batches load only when called, so resuming skips counted batches for free.
    """
    return [(part, len(chunk), lambda chunk=chunk: (fetch(chunk), labels[chunk]))
            for part, index in (("neg", sample.negatives), ("rest", sample.rest))
            for chunk in index.split(batch_size) if len(chunk)]  # an empty index splits into one empty chunk
