"""Repair after replace: adapt the modules a new module confuses, and leave every other one as it was.

A module swapped in from a healthier model wins images that its new neighbours never had to
defend: the weak model's modules learned "not mine" against a class the weak model hardly
answered (BENCHMARKS.md: replacing the weak ResNet-20's dog module repaired dog, 0.8 -> 78.2, and
cost cat 5.0 points). Given labelled images of the composed classes (the user's own data),
``repair_`` reads off the composition's confusion matrix which classes the new module confuses
(the share of a class's images it wins, or of its own images that class wins), and adapts only
those modules, or the new one, by one of four methods:

- ``head`` (the default): re-fit the new module's head (its last linear layer, whose two rows give
  its margin) on its own features of the images, so that the composition names each image's class
  (class-balanced cross-entropy, every other module's scores fixed, held gently to the head as
  it was; L-BFGS, no backward pass through any network). No calibration follows: the re-fit
  includes the new module's scale and offset, and re-calibrating the confused modules moved other
  classes' answers (measured: frog -2.0 points on the weak CIFAR-10 ResNet-20). The new module's
  parent knows the classes it confuses with its own (cat from dog) better than the neighbours'
  weak parent does; its head, fitted against the mean of its parent's other classes, did not use
  that against these neighbours;
- ``calibrate``: fit the two calibration scalars of the confused modules and of the new module
  jointly (compose/fit.py), every other module's held exactly;
- ``continuous``: the paper's continuous learning (modules/adapt.py: tangling identification of
  each confused module re-run with the new class's images), then ``calibrate``;
- ``train``: train the confused modules' weights for a few steps so that the composition names
  each image's class (class-balanced cross-entropy of the composed calibrated scores; every other
  module's scores are computed once and stay fixed), then ``calibrate``.

``head`` is the default: on the weak CIFAR-10 ResNet-20 it is the method that keeps the other
classes closest while dog recovers (BENCHMARKS.md, "Weak-class repair").

Every other module is not touched, so its file stays byte-identical (tested). The images are drawn
in two disjoint parts: the repair fits on the first, and each stage (the method's head, masks or
weights, then the calibration where one follows) is kept only if it lowers the composition's loss
on the second (``kept``); a stage that does not is undone.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import CnnmodError
from ..options import check, option
from ..modules.adapt import adapt_
from ..modules.calibration import calibrated_logit
from ..loop import device_copies, run_steps, warmup_cosine
from ..modules.distill import trainable_weights
from ..modules.extract import cost
from ..modules.module import Module
from ..statistics.collect import head_layer
from .fit import draw_per_class, fit_composition, minimise
from .trunk import group_modules

# The repair methods, registered once: each name and what it does (``replace --repair``'s help).
METHODS = {"head": "re-fit the new module's head against the classes it confuses",
           "calibrate": "fit their calibrations and the new one's",
           "continuous": "the paper's continuous learning, then that calibration",
           "train": "a few training steps of their modules, then that calibration"}
# The pull of a re-fitted head towards the new module's own, on standardised features. On the weak
# CIFAR-10 ResNet-20 (BENCHMARKS.md), the loss on the held-out images after the re-fit was 0.591 at
# 1e-3, 0.601 at 1e-2 and 0.612 at 1e-1 (0.622 before).
HEAD_HOLD = 1e-3


@dataclass(frozen=True)
class RepairOptions:
    """``per_class``/``check_per_class``: images of each class to fit on / to check on (disjoint).
    ``min_share``: a class is confused with the new one when at least this share of its images go to
    the new class, or of the new class's images to it. ``epochs``, ``lr``, ``batch_size``: the
    ``train`` method's budget (passes over the fitting images), Adam's learning rate, its batch."""

    PREFIX = "repair-"  # its flags: --repair METHOD, --repair-per-class, ... (options.py)
    method: str = option("head", "then adapt to the classes the new module confuses (read off --data's confusion "
                                 "matrix), every other module left as it is: " +
                         "; ".join(f"{name}: {what}" for name, what in METHODS.items()), "choice",
                         choices=tuple(METHODS), flag="--repair", shown=False)
    per_class: int = option(200, "images per class to fit on (100 more per class check the result; a class with "
                                 "fewer images than both is shared between them in proportion)", "count")
    check_per_class: int = option(100, None, "count")
    min_share: float = option(0.02, None, "rate")
    epochs: float = option(1.0, "--repair train: passes over the fitting images", "positive", high=100)
    lr: float = option(1e-4, "--repair train: Adam's learning rate", "rate")
    batch_size: int = option(64, None, "count")
    seed: int = option(0, None, "integer")

    def __post_init__(self):
        check(self)


def confused_classes(scores: torch.Tensor, labels: torch.Tensor, new: int, names: list[str],
                     min_share: float) -> dict[str, float]:
    """The classes confused with class ``new`` in the composition's ``scores`` (N, K) on images of
    ``labels`` (N,): for each class k, the larger of the share of k's images answered ``new`` and
    the share of ``new``'s images answered k; those of at least ``min_share``, largest first."""
    pred = scores.argmax(1)
    shares = {}
    for k, name in enumerate(names):
        if k == new:
            continue
        won = float((pred[labels == k] == new).float().mean()) if bool((labels == k).any()) else 0.0
        lost = float((pred[labels == new] == k).float().mean()) if bool((labels == new).any()) else 0.0
        if max(won, lost) >= min_share:
            shares[name] = max(won, lost)
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


@torch.no_grad()
def repair_(modules: list[Module], new_class: str, data, options: RepairOptions = RepairOptions(), *,
            progress: bool = False, device: str | torch.device = "cpu") -> dict:
    """Adapt, in place, the modules of ``modules`` that the module of ``new_class`` confuses, on
    labelled images ``data`` (a ``cnnmod.Dataset`` or ``Views`` holding every composed class).

    Returns a report: the confused classes and their shares before, the method, the loss of the
    composition on the checking images before and after (and its accuracy, every class alike),
    which stages were kept (the new module's head, or the confused modules' masks or weights, then
    the calibration where one follows: each only if it lowers that loss), and its cost
    (images, optimizer steps, multiply-accumulates, and the share of the confused modules' parent's
    training where its recipe is known). Touched modules record it under ``repair``.
    """
    start = time.perf_counter()
    names = [m.class_name for m in modules]
    if new_class not in names:
        raise CnnmodError(f"expected the replaced class among the modules' classes ({', '.join(names[:8])}), "
                          f"found {new_class!r}.")
    if len(modules) < 2:
        raise CnnmodError(f"expected at least two modules to repair a composition, found {len(modules)}.")
    new = names.index(new_class)
    (fit_index, fit_labels), (check_index, check_labels) = draw_per_class(
        data, names, (options.per_class, options.check_per_class), options.seed)
    batches = _Batches(modules, data, options.batch_size)
    fit_margins, check_margins = batches.margins(fit_index), batches.margins(check_index)
    fit_scores = _calibrated(modules, fit_margins)
    before = _loss(fit_scores, fit_labels)
    check_before = _loss(_calibrated(modules, check_margins), check_labels)
    confused = confused_classes(fit_scores, fit_labels, new, names, options.min_share)
    report = {"method": options.method, "new_class": new_class, "confused": confused, "images": int(len(fit_index)),
              "check_images": int(len(check_index)), "steps": 0, "loss_before": before,
              "check_loss_before": check_before,
              "check_accuracy_before": _balanced_accuracy(_calibrated(modules, check_margins), check_labels),
              "options": asdict(options)}
    if not confused:
        report.update(kept=[], macs=batches.macs, check_loss_after=check_before, loss_after=before,
                      check_accuracy_after=report["check_accuracy_before"], share_of_parent_training=None,
                      seconds=time.perf_counter() - start)
        return report
    touched = [names.index(c) for c in confused]
    if options.method == "continuous":  # before any module changes
        other = sorted({str(modules[k].meta.get("strategy")) for k in touched} - {"paper"})
        if other:
            raise CnnmodError(f"expected paper-strategy modules for continuous learning, found {other[0]} modules "
                              "among the confused ones (use --repair calibrate or train).")
    kept, check_loss, macs = [], check_before, 0  # macs: beyond the forward passes ``batches`` counts
    if options.method != "calibrate":  # first the confused modules' masks or weights, or the new one's head
        adapted = [new] if options.method == "head" else touched
        saved = _snapshot(modules, adapted), fit_margins.clone(), check_margins.clone()
        if options.method == "head":
            spent, report["head_fit_loss"] = _refit_head(modules, new, fit_index, fit_labels, fit_margins, batches)
            macs += spent
        elif options.method == "continuous":
            for k in touched:
                adapt_(modules[k], data.images_for(modules[k].input_spec)[fit_index[fit_labels == new]])
                macs += batches.macs_of(k, int((fit_labels == new).sum()))  # tangling identification's forward pass
        else:
            steps, spent = _train(modules, touched, fit_index, fit_labels, fit_margins, batches, options, progress,
                                  torch.device(device))
            report["steps"], macs = steps, macs + spent
        for k in adapted:
            fit_margins[:, k], check_margins[:, k] = batches.margins(fit_index, k), batches.margins(check_index, k)
        after = _loss(_calibrated(modules, check_margins), check_labels)
        if after < check_loss:
            kept, check_loss = [options.method], after
        else:  # worse on images it did not fit: the modules back as they were
            _restore(modules, saved[0])
            fit_margins, check_margins = saved[1], saved[2]
    if options.method != "head":  # the head's re-fit includes the new module's scale and offset
        kept, check_loss = _calibrate(modules, touched, new, fit_margins, fit_labels, check_margins, check_labels,
                                      kept, check_loss, f"repaired against {new_class!r} ({options.method})")
    parents = {modules[k].meta.get("parent_training_macs") for k in touched}  # one parent's training, if one
    parent = parents.pop() if len(parents) == 1 else None
    report.update(kept=kept, check_loss_after=check_loss, macs=macs + batches.macs,
                  loss_after=_loss(_calibrated(modules, fit_margins), fit_labels),
                  check_accuracy_after=_balanced_accuracy(_calibrated(modules, check_margins), check_labels))
    report["share_of_parent_training"] = report["macs"] / parent if isinstance(parent, int) and parent > 0 else None
    changed = (([new] if options.method == "head" else touched) if options.method in kept else []) \
        + (touched + [new] if "calibrate" in kept else [])
    for k in sorted(set(changed)):
        modules[k].meta["repair"] = {key: report[key] for key in ("method", "kept", "new_class", "confused", "images",
                                                                   "steps", "macs", "check_loss_before",
                                                                   "check_loss_after")}
    report["seconds"] = time.perf_counter() - start  # not in the files: timings would break identical output
    return report


def _calibrate(modules, touched, new, fit_margins, fit_labels, check_margins, check_labels, kept, check_loss,
               source) -> tuple[list[str], float]:
    """The calibrations of the ``touched`` modules and of the ``new`` one fitted jointly on the fitting
    images, every other module's held; kept only if they lower the loss on the checking images."""
    saved = _snapshot(modules, touched + [new])
    free = torch.zeros(len(modules), dtype=torch.bool)
    free[touched + [new]] = True
    own = [m.meta.get("calibration") or {"a": 1.0, "b": 0.0} for m in modules]
    a, b = fit_composition(fit_margins, fit_labels, torch.tensor([c["a"] for c in own], dtype=torch.float64),
                           torch.tensor([c["b"] for c in own], dtype=torch.float64), free=free)
    for k in touched + [new]:
        modules[k].meta["calibration"] = {"a": float(f"{a[k]:.6g}"), "b": float(f"{b[k]:.6g}"),
                                          "images": int(len(fit_labels)), "source": source}
    after = _loss(_calibrated(modules, check_margins), check_labels)
    if after < check_loss:
        return kept + ["calibrate"], after
    _restore(modules, saved)
    return kept, check_loss


def _refit_head(modules: list[Module], new: int, index: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
                batches: "_Batches") -> tuple[int, float]:
    """Re-fit module ``new``'s head so that its calibrated score, ``u . f + c`` on the head's input
    features f, makes the composition right as often as possible (the other columns: ``margins``
    as calibrated); store it in the head's second row and bias, the first row kept, the module's
    calibration kept. Returns the multiply-accumulates of the forward passes for the features and
    the fitting loss reached (the class-balanced cross-entropy, without the hold).

    The margin is (w1 - w0) . f plus an offset: the bias difference and any constant the strategy
    added to the head's outputs (the ``channels`` strategy's compensation of pruned inputs). The
    offset is measured on the images, not assumed; a head whose margin is not of that form (a
    masked output, say) is refused before anything changes."""
    module = modules[new]
    net = module.network
    head = head_layer(net.graph)
    weight, bias = net.weight(f"{head}.weight"), net.weight(f"{head}.bias")
    if bias is None or weight.dim() != 2 or weight.shape[0] != 2:
        raise CnnmodError(f"module {module.class_name!r}: expected a linear head of two rows with a bias, found "
                          f"weights of shape {tuple(weight.shape)}{'' if bias is not None else ' and no bias'}.")
    source = net.graph.by_name[head].inputs[0]
    features, outputs = [], []

    def grab(name, out):
        if name == source:
            features.append(out.flatten(1).double())

    for rows in index.split(batches.batch_size):
        z = net(batches.prepared(rows, new), after=grab).double()
        outputs.append(z[:, 1] - z[:, 0])
    f, margin = torch.cat(features), torch.cat(outputs)
    w, bb = weight.double(), bias.double()
    offsets = margin - f @ (w[1] - w[0])
    offset = float(offsets.mean())
    if float((offsets - offset).abs().max()) > 1e-3 * (1.0 + float(margin.abs().max())):
        raise CnnmodError(f"module {module.class_name!r}: expected a margin linear in its head's input features, "
                          "found one that is not (an overlay on its head); use --repair calibrate.")
    cal = module.meta.get("calibration") or {"a": 1.0, "b": 0.0}
    a, b = float(cal["a"]), float(cal["b"])
    if not a > 0:
        raise CnnmodError(f"module {module.class_name!r}: expected a positive calibration scale, found {a}.")
    u0, c0 = a * (w[1] - w[0]), a * offset + b  # its calibrated score, linear in f
    mu, sigma = f.mean(0), f.std(0).clamp_min(1e-6)
    z = (f - mu) / sigma  # standardised, so that the hold weighs every feature alike
    start = torch.cat([u0 * sigma, torch.tensor([c0 + float(u0 @ mu)], dtype=torch.float64)])
    fixed = _calibrated(modules, margins)
    class_weight = _class_weights(labels, len(modules), torch.float64)

    def fitting_loss(t: torch.Tensor) -> torch.Tensor:
        columns = list(fixed.unbind(1))
        columns[new] = z @ t[:-1] + t[-1]
        return _balanced_cross_entropy(torch.stack(columns, 1), labels, class_weight)

    v = minimise(lambda t: fitting_loss(t) + HEAD_HOLD * (t - start).pow(2).sum(), start)
    u = v[:-1] / sigma
    c = float(v[-1]) - float(u @ mu)
    # margin = (row - w[0]) . f + (bias1 - bias0) + (offset - (bb1 - bb0)), and a * margin + b = u . f + c
    row = w[0] + u / a
    net.set_weight(f"{head}.weight", torch.stack([w[0], row]).to(weight.dtype))
    added = offset - float(bb[1] - bb[0])  # what the strategy added to the head's outputs, as measured
    net.set_weight(f"{head}.bias", torch.stack([bb[0], bb[0] + (c - b) / a - added]).to(bias.dtype))
    return batches.macs_of(new, len(index)), float(fitting_loss(v))


def _snapshot(modules: list[Module], ks: list[int]) -> dict:
    """What ``_restore`` needs to put modules ``ks`` back: their tensors (never written in place) and metadata."""
    return {k: (dict(modules[k].network.weights()), copy.deepcopy(modules[k].meta)) for k in ks}


def _restore(modules: list[Module], saved: dict) -> None:
    for k, (weights, meta) in saved.items():
        for key, t in weights.items():
            modules[k].network.set_weight(key, t)
        modules[k].meta = meta


def _train(modules, touched, index, labels, margins, batches, options, progress, device) -> tuple[int, int]:
    """Train the weights of the ``touched`` modules (their own layers: a trunk shared with siblings
    stays as it is) against the composition's cross-entropy; the other columns stay ``margins``.
    Returns the optimizer steps and the multiply-accumulates they cost."""
    groups = group_modules(modules, [m.network for m in modules])
    trunk = {k: g.trunk for g in groups for k in g.members}
    nets = {k: modules[k].network for k in touched}
    params = {k: {key: nets[k].weight(key).detach().to(device, copy=True).requires_grad_(True)
                  for key in trainable_weights(nets[k], {n.name for n in nets[k].graph.nodes} - trunk[k])}
              for k in touched}
    everything = [p for mine in params.values() for p in mine.values()]
    if not everything:
        raise CnnmodError("expected confused modules with weights to train, found none (try --repair calibrate).")
    # each touched network runs on its trained tensors and its others on the device
    bound = {k: {**device_copies(nets[k].weights(), device), **params[k]} for k in touched}
    scale = torch.tensor([(m.meta.get("calibration") or {"a": 1.0})["a"] for m in modules]).to(device)
    shift = torch.tensor([(m.meta.get("calibration") or {"b": 0.0})["b"] for m in modules]).to(device)
    fixed = margins.float().to(device) * scale + shift
    targets = labels.to(device)
    weight = _class_weights(targets, len(modules), torch.float32)
    steps = max(1, math.ceil(options.epochs * math.ceil(len(index) / options.batch_size)))
    optimizer = torch.optim.Adam(everything, lr=options.lr)
    images = 0

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        nonlocal images
        images += len(rows)
        columns = list(fixed[rows].unbind(1))
        for k in touched:
            with nets[k].bound(bound[k]):
                z = nets[k](batches.prepared(index[rows], k).to(device))
            columns[k] = (z[:, 1] - z[:, 0]) * scale[k] + shift[k]
        return _balanced_cross_entropy(torch.stack(columns, 1), targets[rows], weight)

    # cosine, from the full rate to none (no warm-up: the repair starts from weights that already work)
    run_steps(optimizer, loss_of, index=torch.arange(len(index)), batch_size=options.batch_size, steps=steps,
              rate=warmup_cosine(options.lr, steps, 0), gen=torch.Generator().manual_seed(options.seed),
              desc="repair", progress=progress)
    for k in touched:
        for key, p in params[k].items():
            nets[k].set_weight(key, p.detach().cpu())
    return steps, sum(3 * batches.macs_of(k, 1) for k in touched) * images


class _Batches:
    """The images of ``data`` prepared for each module, and the modules' margins on them (float32,
    as a composition computes them), with the multiply-accumulates spent."""

    def __init__(self, modules: list[Module], data, batch_size: int):
        self.modules, self.data, self.batch_size, self.macs = modules, data, batch_size, 0
        self._macs: dict[int, int] = {}

    def prepared(self, index: torch.Tensor, k: int) -> torch.Tensor:
        spec = self.modules[k].input_spec
        return spec.prepare(self.data.images_for(spec)[index])

    def shape(self, k: int) -> tuple[int, ...]:
        spec = self.modules[k].input_spec
        return (spec.channels, *spec.size)

    def macs_of(self, k: int, images: int) -> int:
        if k not in self._macs:
            self._macs[k] = cost(self.modules[k].network, self.shape(k))["macs"]
        return self._macs[k] * images

    def margins(self, index: torch.Tensor, only: int | None = None) -> torch.Tensor:
        """(N, K) margins of every module on ``index``, or (N,) module ``only``'s."""
        ks = range(len(self.modules)) if only is None else [only]
        columns = [torch.cat([self.modules[k].margin(self.prepared(rows, k)) for rows in index.split(self.batch_size)])
                   for k in ks]
        self.macs += sum(self.macs_of(k, len(index)) for k in ks)
        return torch.stack(columns, 1) if only is None else columns[0]


def _calibrated(modules: list[Module], margins: torch.Tensor) -> torch.Tensor:
    return torch.stack([calibrated_logit(m, margins[:, k].double()) for k, m in enumerate(modules)], 1)


def _balanced_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The composition's accuracy, every class weighing alike (the mean of the per-class accuracies)."""
    hits = (scores.argmax(1) == labels).double()
    present = torch.unique(labels)
    return float(torch.stack([hits[labels == k].mean() for k in present]).mean())


def _loss(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The class-balanced cross-entropy of the composition's scores: every class weighs alike."""
    return float(_balanced_cross_entropy(scores.double(), labels,
                                         _class_weights(labels, scores.shape[1], torch.float64)))


def _class_weights(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """One over each class's count of images in ``labels`` (K,): every class weighs alike."""
    return 1.0 / torch.bincount(labels, minlength=k).clamp_min(1).to(dtype)


def _balanced_cross_entropy(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of ``scores`` (N, K), each image weighted by its class's ``weight``."""
    w = weight[labels]
    return (w * torch.nn.functional.cross_entropy(scores, labels, reduction="none")).sum() / w.sum()
