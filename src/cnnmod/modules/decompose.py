"""Step 4 of the pipeline: modules from an observation (``build``), and the one-call ``decompose``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import fields

import torch
import torch.nn as nn

from ..data.inputspec import InputSpec
from ..distributed import rank_and_world, resolve_device
from ..errors import CnnmodError
from ..trace.network import GraphNetwork
from .calibration import calibrate_
from .distill import DistillOptions, distill_
from .extract import cost
from .module import Module
from .observe import Observation, ObserveOptions, _adapt, observe
from .shared import share_equal_tensors
from .strategies import STRATEGIES

OBSERVED = {f.name for f in fields(ObserveOptions)}  # decompose's keyword options that go to ``observe``


def decompose(model: nn.Module, dataset, *, strategy: str = "paper", classes: list[str] | None = None,
              input_spec: InputSpec | None = None, progress: bool = False, progress_file: str | None = None,
              resume: bool = False, calibration: int = 50, device: str = "cpu", only: list[str] | None = None,
              distill: "DistillOptions | dict | None" = None, distill_progress_file: str | None = None,
              **options) -> list[Module]:
    """Decompose ``model`` into one module per class (``only``: per class named), in the model's class order.

    ``dataset`` is a ``cnnmod.Dataset`` (raw images, prepared by the model's input
    specification; classes matched by name), an image folder read lazily (``load_data(...,
    stream=True)``: its batches are decoded by ``workers`` processes, default up to 4) or any
    sequence of ``(input_tensor, label)`` pairs already prepared for the model. ``input_spec`` says
    how raw uint8 images are prepared (default: the model's, as ``load_model`` sets it); the
    modules record it and prepare raw images themselves. Prepared pairs with no specification give
    modules that take prepared tensors only and refuse raw images (cnnmod cannot guess how they
    were prepared). ``options``: the observation's (``ObserveOptions``: ``positives``, ``seed``,
    ``batch_size``, ...; observe.py) and the strategy's (``paper``: ``delta``; ``channels``: its options,
    and ``max_loss``, the default when neither ``keep`` nor ``retain`` is given: see ``smallest_within``).
    With ``progress_file`` the statistics are saved there as they are collected, and with
    ``resume=True`` a saved state of the same run is continued. ``calibration`` images per
    class, held out from the statistics sample where the data has them, fit each module's
    score calibration (0: none). ``precision="bf16"`` runs the statistics pass under bfloat16
    autocast (see ``collect_statistics``); it is recorded in each module's options.
    ``only``: build the modules of these classes alone (for a reuse of a few classes); the channels
    strategy then scores channels, chooses its trunk and re-fits layers on their images alone.
    ``sample_images``: how many images of the statistics sample the channels strategy scores
    channels and re-fits layers on (more: closer re-fits, a longer decomposition).
    ``distill``: fine-tune the channels strategy's modules to reproduce the parent's logits on the
    images of the statistics sample (``DistillOptions``, or a dict of them: ``{"epochs": 2}``;
    distill.py), before calibration. Off by default: decomposition stays training-free. With
    ``distill_progress_file`` its state is saved there as it trains, and ``resume=True`` continues it.

    >>> modules = decompose(load_model("m.safetensors"), load_data("mnist5k", "train"))
    >>> modules[3].class_name, modules[3].network(x).shape
    ('3', torch.Size([B, 2]))
    """
    chosen = _strategy(strategy)
    unknown = set(options) - OBSERVED - {f.name for f in fields(chosen.options)}
    if unknown:  # a misspelt name: say every name it could have been
        raise CnnmodError(f"expected options of the observation ({', '.join(sorted(OBSERVED))}) or of the {strategy} "
                          f"strategy ({', '.join(f.name for f in fields(chosen.options))}), found "
                          f"{', '.join(sorted(unknown))}.")
    seen = ObserveOptions.of(**{k: options.pop(k) for k in list(options) if k in OBSERVED})
    seed, batch_size = seen.seed, seen.batch_size
    chosen.check(options)  # bad options fail now, not after the long pass
    max_loss = None
    if strategy == "channels":  # the smallest modules within a loss, unless told how many channels to keep
        if options.get("max_loss") is not None and {"keep", "retain"} & set(options):
            raise CnnmodError("expected --max-loss or --keep/--retain, found both (--max-loss chooses --retain).")
        max_loss = options.pop("max_loss", None)
        if max_loss is None and not {"keep", "retain"} & set(options):
            max_loss = DEFAULT_MAX_LOSS
    if isinstance(distill, dict):
        try:
            distill = DistillOptions(**{"seed": seed, **distill})  # the run's seed unless told otherwise
        except TypeError as e:
            raise CnnmodError(f"expected distillation options among "
                              f"{', '.join(f.name for f in fields(DistillOptions))} ({e}).") from None
    if not (distill is None or isinstance(distill, DistillOptions)):
        raise CnnmodError(f"expected distill to be DistillOptions or a dict of them, found {distill!r}.")
    if distill is not None and strategy != "channels":
        raise CnnmodError(f"expected the channels strategy to distil its modules, found {strategy!r} (a paper "
                          "module is the whole parent, exact on its images: nothing to distil).")
    obs = observe(model, dataset, options=seen, classes=classes, input_spec=input_spec, progress=progress,
                  progress_file=progress_file, resume=resume, device=device, only=only, sums=chosen.needs_sums)
    if distill is not None or calibration > 0 or max_loss is not None:  # they read images of the data again
        labels, fetch = _adapt(dataset, obs.classes, input_spec or getattr(model, "input_spec", None))
    if max_loss is None:
        modules = build(obs, strategy, options)  # recorded as given
    else:
        index, source = _calibration_index(labels, obs.sample, calibration or 50, seed)
        modules = smallest_within(obs, options, max_loss, fetch, index, labels[index], batch_size)
        for m in modules:
            m.meta["max_loss"]["source"] = source
    if distill is not None:  # on the statistics pass's device; every rank alike
        teacher = GraphNetwork(obs.parent.graph, obs.parent.weights)
        alone = rank_and_world()[1] == 1  # the ranks of a torchrun group would race for one progress file
        distill_(modules, teacher, fetch, distill_index(obs, labels), distill, progress=progress,
                 progress_file=distill_progress_file if alone else None, resume=resume,
                 device=resolve_device(device))
    built, macs, held_back = time.perf_counter(), 0, None
    if calibration > 0:
        index, source = _calibration_index(labels, obs.sample, calibration, seed)
        parent = GraphNetwork(obs.parent.graph, obs.parent.weights)
        margins, seen, logits = calibrate_(modules, ((fetch(i), labels[i]) for i in index.split(batch_size)),
                                           source=source, parent=parent)
        held_back = _held_back(modules, logits, seen, margins, source)
        macs = len(index) * obs.parent.cost()["macs"]  # forward only: the parent's pass, the modules' whole runs
        macs += sum(m.timing["calibration_module_images"] * cost(m.network, obs.parent.input_shape)["macs"]
                    for m in modules)  # (a paper module's own pooling and head, on the other images: not counted)
    for m in modules:  # timings stay out of files (they would break byte-identical output)
        m.timing.update(calibration_seconds=time.perf_counter() - built, calibration_macs=macs, held_back=held_back)
    return modules


def build(observation: Observation, strategy: str = "paper", options=None, **more) -> list[Module]:
    """Build the modules of ``observation``'s classes with ``strategy``; no statistics pass.

    ``options``: the strategy's options dataclass (``ChannelsOptions(keep=0.25)``) or a dict of
    them; keyword arguments work too (``build(obs, "channels", keep=0.25)``). Modules record the
    options given (a dataclass: those that differ from their defaults).

    >>> obs = observe(load_model("m.safetensors"), load_data("mnist5k", "train"))
    >>> small = build(obs, "channels", keep=0.25); faithful = build(obs, "paper")
    """
    start = time.perf_counter()
    chosen = _strategy(strategy)
    if dataclasses.is_dataclass(options) and not isinstance(options, chosen.options):
        raise CnnmodError(f"expected {chosen.options.__name__} for the {strategy} strategy, found "
                          f"{type(options).__name__}.")
    if isinstance(options, chosen.options):
        given = dataclasses.replace(options, **more) if more else options
    else:
        given = dict(options or {}, **more)
    opts = chosen.check(given)
    if isinstance(given, chosen.options):  # what differs from the defaults, as a dict of keyword options
        given = {f.name: getattr(opts, f.name) for f in fields(opts) if getattr(opts, f.name) != f.default}
    parent = observation.parent
    if chosen.needs_sums and (parent.stats.sums is None or parent.sample is None):
        raise CnnmodError(f"expected an observation made with sums=True (the {strategy} strategy needs value sums "
                          "and sample images), found one without; observe(..., sums=True).")
    common = dict(observation.common, strategy=strategy, options=dict(given, **observation.common["options"]))
    if not chosen.needs_sums:
        common["options"].pop("sample_images", None)
    stats = parent.stats
    modules = []
    for c in observation.focus:
        network, summary = chosen.build(parent, c, **{f.name: getattr(opts, f.name) for f in fields(opts)})
        kept = summary.pop("parent_channels", None)  # in memory only: the distillation's feature targets
        meta = dict(common, class_index=c, class_name=observation.classes[c], observed_images=stats.observed(c),
                    positives_observed=int(stats.seen_neg[c] + stats.seen_rest[c]), **summary)
        module = Module(c, observation.classes[c], network, observation.spec, meta, parent=observation.shared,
                        kept=kept)
        module.timing = dict(observation.timing, total_seconds=observation.timing.get("statistics_seconds", 0.0)
                             + time.perf_counter() - start)
        modules.append(module)
    share_equal_tensors([m.network for m in modules])  # a shared trunk: one tensor per layer, not one per module
    return modules


def distill_index(obs: Observation, labels: torch.Tensor) -> torch.Tensor:
    """The images a distillation trains on: the statistics sample's negatives and its own images of
    the classes modules are built for (``only``: a pair's, not every class's the channels scores saw)."""
    rest = obs.sample.rest[torch.isin(labels[obs.sample.rest], torch.tensor(obs.focus))]
    return torch.cat([obs.sample.negatives, rest])


DEFAULT_MAX_LOSS = 1.0  # points of top-1: the channels strategy's default
RETAINS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)  # --retain, fewest channels first


@torch.no_grad()
def smallest_within(obs: Observation, options: dict, max_loss: float, fetch, index: torch.Tensor,
                    labels: torch.Tensor, batch_size: int = 256) -> list[Module]:
    """The channels modules with the least ``retain`` (of ``RETAINS``, then every channel) whose vote
    on the held-back images ``fetch(index)`` loses at most ``max_loss`` points of top-1 against the
    model restricted to their classes. A bisection, on the assumption that keeping more channels does
    not lose more (a larger retain keeps more of every space); about four builds from the one
    observation. Records the search in each module's ``max_loss``, with the chosen loss's standard
    error on these images: with 50 images per class of 10 classes it is about a point (measured on
    the zoo, BENCHMARKS.md), so a 1-point budget is kept on average, not on every run."""
    classes = torch.tensor(obs.focus)
    mine = torch.isin(labels, classes)
    if not bool(mine.any()):
        raise CnnmodError("expected held-back images of the modules' classes to choose --retain on, found none.")
    truth = torch.searchsorted(classes, labels[mine])
    batches = [fetch(i) for i in index[mine].split(batch_size)]
    parent = GraphNetwork(obs.parent.graph, obs.parent.weights)
    right = torch.cat([parent(x)[:, classes] for x in batches]).argmax(1) == truth  # the model, image by image
    model = float(right.double().mean())
    tried: dict[float, float] = {}
    noise: dict[float, float] = {}  # the standard error of each loss: a paired difference on these images
    built: dict[float, list[Module]] = {}  # only the smallest within the loss so far (memory for one set)

    def lost(retain: float) -> float:
        given = dict(options, retain=retain) if retain < 1 else dict(options, keep=1.0)
        modules = build(obs, "channels", given)
        margins = torch.cat([torch.stack([m.margin(x) for m in modules], 1) for x in batches])
        d = right.double() - (margins.argmax(1) == truth).double()  # +1: only the model right; -1: only the modules
        tried[retain] = 100 * float(d.mean())
        noise[retain] = 100 * float(d.std(correction=0) / len(d) ** 0.5)
        if tried[retain] <= max_loss:
            built.clear()
            built[retain] = modules
        return tried[retain]

    candidates = list(RETAINS) + [1.0]
    low, high = 0, len(candidates) - 1  # every channel kept: the model itself, nothing lost
    while low < high:
        middle = (low + high) // 2
        if lost(candidates[middle]) <= max_loss:
            high = middle
        else:
            low = middle + 1
    best = candidates[low]
    if best not in built:  # every channel kept, never measured: within any loss
        lost(best)
    for m in built[best]:
        m.meta["max_loss"] = {"points": max_loss, "retain": best, "lost": round(tried[best], 4),
                              "standard_error": round(noise[best], 4), "images": int(mine.sum()),
                              "model_top1": round(model, 6),
                              "tried": {str(r): round(v, 4) for r, v in sorted(tried.items())}}
    return built[best]


def _held_back(modules: list[Module], logits: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
               source: str) -> dict:
    """What the decomposition cost in accuracy, on the calibration images (held out from the
    statistics sample where the data has them): the modules composed (their vote, the argmax of the
    margins) against the model restricted to the same classes (its ``logits`` of them), on those classes' images."""
    classes = torch.tensor([m.class_index for m in modules])
    mine = torch.isin(labels, classes)
    truth = torch.searchsorted(classes, labels[mine])  # each image's position among the modules' classes
    return {"images": int(mine.sum()), "source": source,
            "model_top1": float((logits[mine].argmax(1) == truth).double().mean()),
            "composed_top1": float((margins[mine].argmax(1) == truth).double().mean())}


def _strategy(name: str):
    if name not in STRATEGIES:
        raise CnnmodError(f"expected a strategy among {', '.join(STRATEGIES)}, found {name!r}.")
    return STRATEGIES[name]


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


