"""``decompose(model, dataset)``: trace, one statistics pass, then one module per class."""

from __future__ import annotations

import hashlib
import os
import time

import torch
import torch.nn as nn

from .. import __version__
from ..concerns.channeling import append_logits_head
from ..data.inputspec import InputSpec
from ..data.sources import Dataset
from ..data.stream import ImageFiles
from ..distributed import check_resume_alone, rank_and_world, resolve_device
from ..errors import CnnmodError
from ..statistics import collect_statistics, select_sample
from ..statistics.collect import ends_in_linear, head_layer
from ..statistics.progress import ProgressSaver
from ..trace import GraphNetwork, trace_graph, weights_of
from .calibration import calibrate_
from .module import Module
from .shared import ParentTensors
from .strategies import STRATEGIES, Parent


def decompose(model: nn.Module, dataset, *, strategy: str = "paper", positives: int = 1000,
              negatives_per_class: int | None = None, seed: int = 0, batch_size: int = 256,
              classes: list[str] | None = None, input_spec: InputSpec | None = None,
              progress: bool = False, progress_file: str | None = None, resume: bool = False,
              calibration: int = 50, device: str = "cpu", precision: str = "fp32", only: list[str] | None = None,
              sample_images: int = 256, workers: int | None = None, **options) -> list[Module]:
    """Decompose ``model`` into one module per class (``only``: per class named), in the model's class order.

    ``dataset`` is a ``cnnmod.Dataset`` (raw images, prepared by the model's input
    specification; classes matched by name), an image folder read lazily (``load_data(...,
    stream=True)``: its batches are decoded by ``workers`` processes, default up to 4) or any
    sequence of ``(input_tensor, label)`` pairs already prepared for the model. ``input_spec`` says
    how raw uint8 images are prepared (default: the model's, as ``load_model`` sets it); the
    modules record it and prepare raw images themselves. Prepared pairs with no specification give
    modules that take prepared tensors only and refuse raw images (cnnmod cannot guess how they
    were prepared). ``options`` go to the strategy (``paper``: ``delta``).
    With ``progress_file`` the statistics are saved there as they are collected, and with
    ``resume=True`` a saved state of the same run is continued. ``calibration`` images per
    class, held out from the statistics sample where the data has them, fit each module's
    score calibration (0: none). ``precision="bf16"`` runs the statistics pass under bfloat16
    autocast (see ``collect_statistics``); it is recorded in each module's options.
    ``only``: build the modules of these classes alone (for a reuse of a few classes); the channels
    strategy then scores channels, chooses its trunk and re-fits layers on their images alone.
    ``sample_images``: how many images of the statistics sample the channels strategy scores
    channels and re-fits layers on (more: closer re-fits, a longer decomposition).

    >>> modules = decompose(load_model("m.safetensors"), load_data("mnist5k", "train"))
    >>> modules[3].class_name, modules[3].network(x).shape
    ('3', torch.Size([B, 2]))
    """
    if strategy not in STRATEGIES:
        raise CnnmodError(f"expected a strategy among {', '.join(STRATEGIES)}, found {strategy!r}.")
    if hasattr(STRATEGIES[strategy], "check_options"):
        STRATEGIES[strategy].check_options(**options)  # bad options fail now, not after the long pass
    start = time.perf_counter()
    meta = getattr(model, "cnnmod_meta", {})
    spec = input_spec or getattr(model, "input_spec", None)
    graph = trace_graph(model)
    weights = {k: v.detach().cpu() for k, v in weights_of(model).items()}
    if not ends_in_linear(graph):  # SqueezeNet: conv, ReLU, pooling; its K logits get an identity Linear head
        shape = GraphNetwork(graph, weights).shapes(_input_shape(dataset, spec))[graph.output]
        if len(shape) != 1:
            raise CnnmodError(f"expected the model to output (batch, classes) logits, found shape {shape}.")
        graph, weights = append_logits_head(graph, weights, shape[0])
    head = head_layer(graph)
    num_classes = weights[f"{head}.weight"].shape[0]
    classes = list(classes or meta.get("classes") or [str(i) for i in range(num_classes)])
    if len(classes) != num_classes:
        raise CnnmodError(f"expected {num_classes} class names (the model's outputs), found {len(classes)}.")

    focus = _focus(only, classes)
    for option, value in (("sample_images", sample_images), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise CnnmodError(f"expected {option} to be a whole number >= 1, found {value}.")
    labels, fetch = _adapt(dataset, classes, spec)
    sample = select_sample(labels, num_classes, positives=positives, negatives_per_class=negatives_per_class,
                           seed=seed, required=focus, names=classes)
    batches = sample_batches(fetch, labels, sample, batch_size)
    shared = ParentTensors.of(weights)  # what every module's network shares (views, not copies)
    fingerprint = shared.checksum[:16]
    saver = None
    needs_sums = getattr(STRATEGIES[strategy], "needs_sums", False)
    check_resume_alone(resume)
    if progress_file is not None and rank_and_world()[1] == 1:  # ranks would race for one file
        key = hashlib.sha256(f"{fingerprint}|{batch_size}|{num_classes}|{needs_sums}|{only and focus}".encode()
                             + sample.negatives.numpy().tobytes() + sample.rest.numpy().tobytes()).hexdigest()
        saver = ProgressSaver(progress_file, key, resume=resume)
    if workers is None:  # decoding files is the slow part of a streamed pass; tensors in memory need no help
        workers = min(4, os.cpu_count() or 1) if isinstance(dataset, ImageFiles) else 0
    stats = collect_statistics(model, graph, batches, num_classes, progress=progress and rank_and_world()[0] == 0,
                               saver=saver, device=resolve_device(device), precision=precision, sums=needs_sums,
                               weights=weights, classes_kept=None if only is None else focus, workers=workers)
    stats_seconds = time.perf_counter() - start

    example = fetch(sample.rest[:1] if len(sample.rest) else sample.negatives[:1])
    input_shape = tuple(example.shape[1:])
    pool = torch.cat([sample.negatives, sample.rest])  # the images the statistics saw, all classes
    if only is not None:
        pool = pool[torch.isin(labels[pool], torch.tensor(focus))]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:sample_images]].sort().values
    parent = Parent(graph, weights, stats, GraphNetwork(graph, weights).shapes(input_shape), head, input_shape,
                    sample=fetch(pick) if needs_sums else None, sample_labels=labels[pick],
                    focus=None if only is None else focus)
    spec = spec or InputSpec.of_prepared(example)  # pairs prepared by the user, who did not say how
    common = {
        "strategy": strategy, "options": dict(options, positives=positives, seed=seed,
                                              negatives_per_class=sample.negatives_per_class,
                                              **({"precision": precision} if precision != "fp32" else {})),
        "parent_fingerprint": fingerprint, "parent_architecture": meta.get("architecture"),
        "parent_classes": classes, "library_version": __version__,
    }
    if only is not None:
        common["only"] = [classes[c] for c in focus]
    if needs_sums:
        common["options"]["sample_images"] = int(len(pick))
    modules = []
    for c in focus:
        name = classes[c]
        network, summary = STRATEGIES[strategy](parent, c, **options)
        m_meta = dict(common, class_index=c, class_name=name, observed_images=stats.observed(c),
                      positives_observed=int(stats.seen_neg[c] + stats.seen_rest[c]), **summary)
        modules.append(Module(c, name, network, spec, m_meta, parent=shared))
    if saver is not None:
        saver.finish()
    built = time.perf_counter()
    if calibration > 0:
        index, source = _calibration_index(labels, sample, calibration, seed)
        calibrate_(modules, [(fetch(i), labels[i]) for i in index.split(batch_size)], source=source)
    calibration_seconds = time.perf_counter() - built
    total = built - start
    present = torch.bincount(labels[sample.negatives], minlength=num_classes)
    negatives_from = {classes[c]: int(present[c]) for c in range(num_classes) if present[c]}
    for m in modules:  # timings stay out of files (they would break byte-identical output)
        m.timing = {"statistics_seconds": stats_seconds, "total_seconds": total,
                    "calibration_seconds": calibration_seconds, "images": len(sample.negatives) + len(sample.rest),
                    "statistics_bytes": stats.nbytes(),
                    "negatives_from": negatives_from}
    return modules


def _focus(only: list[str] | None, classes: list[str]) -> list[int]:
    """The indices of the classes ``only`` names (all classes when None), in the model's order."""
    if only is None:
        return list(range(len(classes)))
    unknown = [n for n in only if n not in classes]
    if unknown or not only:
        raise CnnmodError(f"expected --only to name classes of the model ({', '.join(classes[:10])}), "
                          f"found {', '.join(unknown) or 'none'}.")
    return sorted({classes.index(n) for n in only})


def _calibration_index(labels: torch.Tensor, sample, per_class: int, seed: int) -> tuple[torch.Tensor, str]:
    """Up to ``per_class`` images per class that the statistics pass did not see, else seen ones."""
    used = torch.zeros(len(labels), dtype=torch.bool)
    used[sample.negatives] = True
    used[sample.rest] = True
    gen = torch.Generator().manual_seed(seed + 1)
    held_out = all(int(((labels == c) & ~used).sum()) >= per_class for c in torch.unique(labels).tolist())
    chosen = []
    for c in torch.unique(labels).tolist():
        pool = torch.nonzero((labels == c) & (~used if held_out else torch.ones_like(used))).flatten()
        chosen.append(pool[torch.randperm(len(pool), generator=gen)[:per_class]])
    source = "held out from the statistics sample" if held_out else "statistics sample (no held-out images left)"
    return torch.cat(chosen), source


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
