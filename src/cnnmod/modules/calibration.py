"""Training-free score calibration, so that modules of different models compose.

A module's margin m = z_c - z_nc is on its parent's own scale. At decomposition time we fit
two scalars per module on held-out images of the parent (Platt scaling, class-balanced):
P(class c | x) ~ sigmoid(a * m(x) + b). No network weight is trained; the fit is a
2-parameter Newton iteration. Calibrated log-odds a * m + b are comparable across parents,
and a threshold on them gives an "unknown" answer for inputs no module claims.
"""

from __future__ import annotations

import torch

from ..bits import pack
from ..trace.network import GraphNetwork
from .module import Module
from .shared import identity


def fit_platt(margins: torch.Tensor, positive: torch.Tensor, iterations: int = 100) -> tuple[float, float]:
    """Fit (a, b) minimising the class-balanced logistic loss of sigmoid(a * m + b).

    Newton's method with step halving (float64) on standardised margins; Platt's targets,
    slightly inside (0, 1), keep the fit finite when the module separates the data perfectly.
    """
    scale = float(margins.double().std().clamp_min(1e-6))
    shift = float(margins.double().mean())
    m = (margins.double() - shift) / scale
    n_pos = positive.sum().clamp_min(1).double()
    n_neg = (~positive).sum().clamp_min(1).double()
    w = torch.where(positive, 0.5 / n_pos, 0.5 / n_neg)  # each side weighs one half
    t = torch.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = torch.stack([m, torch.ones_like(m)], dim=1)  # (N, 2)

    def loss(theta):
        z = x @ theta
        return float((w * (torch.nn.functional.softplus(z) - t * z)).sum())

    theta = torch.zeros(2, dtype=torch.float64)
    current = loss(theta)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (w * (p - t))
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        for _ in range(30):  # halve until the loss does not grow
            candidate = theta - step
            if loss(candidate) <= current:
                break
            step = step / 2
        theta, previous, current = candidate, current, loss(candidate)
        if previous - current < 1e-12:
            break
    a, b = float(theta[0]) / scale, float(theta[1]) - float(theta[0]) * shift / scale
    return a, b


@torch.no_grad()
def calibrate_(modules: list[Module], batches, *, source: str, parent: GraphNetwork | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fit each module's calibration on prepared (x, parent label) batches; store it in ``meta``.

    Module files must not depend on where they were built: float32 margins differ in their last
    bits with the device and the number of threads (seen between CPU, CUDA and torchrun runs), so
    the margins are computed in float64 and (a, b) are stored to 6 significant digits. ``batches``
    may be a generator: each batch is loaded once and every module scores it, so memory holds one
    batch (and one float64 copy of the tensors the modules share), not every calibration image.
    ``parent``: the modules' parent network, also run on the images (its logits are returned);
    modules that mask their parent's elements (the paper strategy's) are then scored from its one
    run where that is exact (``_masked_margins``), not each by a run of its own.
    Returns the margins (images, modules; float64), the images' labels and the parent's logits of the
    modules' classes (images, modules; None without ``parent``); each
    module's ``timing`` says on how many images it ran whole (``calibration_module_images``).
    """
    wide, parent64 = _float64(modules, parent) if parent is not None else (_float64(modules), None)
    margins, labels, logits, whole = [], [], [], torch.zeros(len(modules), dtype=torch.int64)
    classes = [m.class_index for m in modules]  # the parent's logits kept: those of the modules' classes
    split = _split(wide, parent64) if parent64 is not None else None  # decided once, not per batch
    for x, y in batches:
        labels.append(y)
        if split is not None:
            found, z, ran = _masked_margins(wide, parent64, x.double(), split)
        else:
            found = torch.stack([_margin(net(x.double())) for net in wide], 1)
            z, ran = parent64(x.double()) if parent64 is not None else None, len(x)
        margins.append(found)
        logits.append(z[:, classes] if z is not None else None)
        whole += ran
    for m, images in zip(modules, whole.tolist()):  # the images each module ran whole on (MACs; not saved)
        m.timing["calibration_module_images"] = images
    labels, margins = torch.cat(labels), torch.cat(margins)
    for k, m in enumerate(modules):
        a, b = fit_platt(margins[:, k], labels == m.class_index)
        threshold = best_threshold(margins[:, k], labels == m.class_index)
        m.meta["calibration"] = {"a": float(f"{a:.6g}"), "b": float(f"{b:.6g}"), "images": int(len(labels)),
                                 "source": source, "threshold": float(f"{threshold:.6g}")}
    return margins, labels, torch.cat(logits) if parent64 is not None else None


def _margin(z: torch.Tensor) -> torch.Tensor:
    return z[:, 1] - z[:, 0]


def _split(wide: list[GraphNetwork], parent: GraphNetwork) -> int | None:
    """Where the modules' tails start (``_masked_margins``: the parent's last masked layer), when every
    module is its parent with elements masked (bitmasks only: the paper strategy's); None otherwise."""
    names, overlays = [n.name for n in parent.graph.nodes], [n.then for n in wide[0].graph.nodes]
    if any(n.then for n in parent.graph.nodes) or any(then not in ([], ["bitmask"]) for then in overlays) \
            or any([n.name for n in net.graph.nodes] != names or [n.then for n in net.graph.nodes] != overlays
                   for net in wide):
        return None
    masked = [i for i, then in enumerate(overlays) if then]
    return max(masked) if masked else None


def _masked_margins(wide: list[GraphNetwork], parent: GraphNetwork, x: torch.Tensor, split: int):
    """The margins of modules that are their parent with elements masked (the paper strategy's), and
    the parent's logits, from one run of the parent, and on how many images each module ran whole.

    Each module runs only the layers from the parent's last masked layer on (``split``: its pooling
    and head), from the parent's values there, which are the module's own wherever the image lit no
    element the module masks in an earlier layer (checked per image, on bits: masking a zero changes
    nothing). The images that lit one are run through the whole module. So the answers are the
    modules' own (tested against a run of each module: equal to float64 rounding, as the few images
    run whole form a batch of their own, which rounds in its own order); on the images a module
    observed no element it masks is lit, so most images need the one run (issue #25: calibrating
    ten paper modules of the demo's CNN ran ten passes)."""
    nodes = wide[0].graph.nodes
    tail = {n.name for n in nodes[split:]}
    masked = {n.name for n in nodes[:split] if n.then}
    lit = {}

    def record(name: str, out: torch.Tensor) -> None:
        if name in masked:
            lit[name] = pack((out != 0).flatten(1))

    given = parent.run_all(x, keep=False, only={n.name for n in nodes[:split]}, after=record)  # what the tail reads
    margins, whole = [], []
    for net in wide:
        mine = torch.ones(len(x), dtype=torch.bool)
        for name, bits in lit.items():
            mine &= ((bits & ~net.weight(f"{name}.bits")) == 0).all(1)
        found = _margin(net.run_all(x, keep=False, only=tail, given=given)[net.graph.output])
        if not bool(mine.all()):
            found[~mine] = _margin(net(x[~mine]))
        margins.append(found)
        whole.append(int((~mine).sum()))
    logits = parent.run_all(x, keep=False, only=tail, given=given)[parent.graph.output]
    return torch.stack(margins, 1), logits, torch.tensor(whole)


def best_threshold(margins: torch.Tensor, positive: torch.Tensor) -> float:
    """The margin above which the module, alone, says "its class" with the best F1 on these images
    (halfway between two margins). A composition votes by comparing margins, so its modules need no
    threshold; a module deployed alone as a detector does: margin > 0 says yes to most images of
    classes that resemble its own (a paper module keeps the whole parent). The calibration images
    hold every class alike, as a test set of the parent's classes does."""
    order = margins.double().argsort(descending=True)
    m, p = margins.double()[order], positive[order]
    tp = p.long().cumsum(0)
    f1 = 2 * tp / (torch.arange(1, len(m) + 1) + int(p.sum()))  # 2TP / (2TP + FP + FN): TP + FP = i + 1
    i = int(f1.argmax())
    return float((m[i] + m[i + 1]) / 2) if i + 1 < len(m) else float(m[i]) - 1.0


@torch.no_grad()
def margins64(module: Module, inputs) -> torch.Tensor:
    """The module's margins on prepared batches, computed in float64 (the same numbers on any
    device and thread count) by a float64 copy of its network: the module's own tensors, which it
    may share with its parent and sibling modules, are left as they are."""
    wide = _float64([module])[0]
    margins = []
    for x in inputs:
        z = wide(x.double())
        margins.append(z[:, 1] - z[:, 0])
    return torch.cat(margins)


def _float64(modules: list[Module], parent: GraphNetwork | None = None):
    """float64 copies of the modules' networks (and of ``parent``, when given: then a pair is returned);
    a tensor several of them share is converted once."""
    done: dict[tuple, torch.Tensor] = {}

    def wide(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        key = identity(t)
        if key not in done:
            done[key] = t.double()
        return done[key]

    nets = [GraphNetwork(m.network.graph, {k: wide(v) for k, v in m.network.weights().items()}) for m in modules]
    if parent is None:
        return nets
    return nets, GraphNetwork(parent.graph, {k: wide(v) for k, v in parent.weights().items()})


def calibrated_logit(module: Module, margin: torch.Tensor) -> torch.Tensor:
    """a * margin + b; a module without a calibration keeps its raw margin (a = 1, b = 0)."""
    cal = module.meta.get("calibration") or {"a": 1.0, "b": 0.0}
    return cal["a"] * margin + cal["b"]
