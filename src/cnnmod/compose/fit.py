"""Fit a composition's calibration jointly, on labelled images of its classes (no network training).

Each module's own calibration (modules/calibration.py) is fitted alone, on its parent's data: it
says how sure the module is, not how it fares against modules it never met. A module swapped in
from a healthy model wins images that the weak model's modules had no rival for, and modules of
two parents may lean on each other's classes. Given labelled images of the composed classes, we
fit the two scalars of every module together (2K numbers for K modules), so that the class with
the largest a_k * m_k + b_k is the image's class as often as possible: multinomial logistic
regression on the modules' margins, every class weighing alike, in float64 (L-BFGS), starting
from and gently held to the modules' own calibrations. No weight of any network changes; the
result is stored where each module keeps its calibration, so composed files carry it.
"""

from __future__ import annotations

import torch

from ..errors import CnnmodError
from ..modules.calibration import margins64


def fit_composition(margins: torch.Tensor, labels: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor,
                    hold: float = 1e-3, free: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (a, b), each (K,), minimising the class-balanced cross-entropy of softmax(a * m + b).

    ``margins`` (N, K): each module's margin on each image; ``labels`` (N,): the module index of
    each image's class. ``hold`` weighs a squared pull towards (a0, b0), on margins standardised
    per module, so that a class with few images cannot drive its scalars anywhere. ``free`` (K,)
    bool: the modules whose scalars are fitted (default all); the others keep (a0, b0) exactly.
    """
    m = margins.double()
    mu, sigma = m.mean(0), m.std(0).clamp_min(1e-6)
    z = (m - mu) / sigma
    count = torch.bincount(labels, minlength=m.shape[1]).double()
    w = (1.0 / (count.clamp_min(1) * int((count > 0).sum())))[labels]  # every present class weighs alike
    start = torch.cat([a0.double() * sigma, b0.double() + a0.double() * mu])  # (alpha, beta) of z
    k = m.shape[1]
    fitted = torch.ones(2 * k, dtype=torch.bool) if free is None else torch.cat([free, free])

    def loss(theta):
        t = torch.where(fitted, theta, start)  # held scalars get no gradient
        logits = z * t[:k] + t[k:]
        value = (w * (torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0])).sum()
        return value + 0.5 * hold * (theta - start).pow(2).sum()

    t = torch.where(fitted, minimise(loss, start), start)
    alpha, beta = t[:k], t[k:]
    a, b = alpha / sigma, beta - alpha * mu / sigma
    if free is not None:  # exactly the held values, not a round trip through the standardisation
        a, b = torch.where(free, a, a0.double()), torch.where(free, b, b0.double())
    return a, b


def minimise(objective, start: torch.Tensor) -> torch.Tensor:
    """The parameters minimising ``objective(theta)`` (a scalar tensor), from ``start``: L-BFGS with
    a strong-Wolfe line search, run to tight tolerances (a few dozen parameters at most)."""
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    return theta.detach()


def draw_per_class(data, names: list[str], sizes: tuple[int, ...],
                   seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint seeded draws of up to ``sizes[j]`` images of each class ``names`` lists, from ``data``
    (classes matched by name; every one must have images there). A class with fewer images than all
    the draws ask for is shared among them in proportion (one with as many images as draws reaches
    every draw).
    Returns, per draw, the images' indices into ``data`` and their labels as indices into ``names``."""
    present = {data.classes[c] for c in torch.unique(data.labels).tolist()}
    missing = [n for n in names if n not in present]
    if missing:
        raise CnnmodError(f"expected images of every composed class in the fitting data, found none of "
                          f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''} (the data holds "
                          f"{', '.join(sorted(present)[:8])}{', ...' if len(present) > 8 else ''}).")
    found = [c for c in data.classes if c in names]  # in the data's order, as the draws always were
    gen = torch.Generator().manual_seed(seed)
    draws = [([], []) for _ in sizes]
    for name in found:
        pool = torch.nonzero(data.labels == data.classes.index(name)).flatten()
        order, taken = torch.randperm(len(pool), generator=gen), 0
        for (chosen, labels), size in zip(draws, _shares(len(pool), sizes)):
            pick = pool[order[taken:taken + size]].sort().values
            taken += size
            chosen.append(pick)
            labels.append(torch.full((len(pick),), names.index(name)))
    return [(torch.cat(chosen), torch.cat(labels)) for chosen, labels in draws]


def _shares(available: int, sizes: tuple[int, ...]) -> list[int]:
    """How many of ``available`` images each draw takes: ``sizes`` where they fit, else in proportion
    (the first draw takes what rounding leaves), each draw at least one while there are enough."""
    if available >= sum(sizes):
        return list(sizes)
    rest = [available * s // sum(sizes) for s in sizes[1:]]
    if available >= len(sizes):
        rest = [max(1, r) for r in rest]
    return [available - sum(rest)] + rest


@torch.no_grad()
def fit_composed_(modules: list, data, *, per_class: int = 100, seed: int = 0, batch_size: int = 256) -> int:
    """Fit the calibration of ``modules`` jointly on up to ``per_class`` images of each of their
    classes in ``data`` (a ``cnnmod.Dataset`` or ``Views``, classes matched by name; every composed class
    must have images there); store it in each module's
    ``meta["calibration"]``. Returns how many images were used."""
    if len(modules) < 2:
        raise CnnmodError(f"expected at least two modules to fit their composition, found {len(modules)}.")
    names = [m.class_name for m in modules]
    ((index, labels),) = draw_per_class(data, names, (per_class,), seed)
    columns = [margins64(m, (m.input_spec.prepare(data.images_for(m.input_spec)[i]) for i in index.split(batch_size)))
               for m in modules]
    own = [m.meta.get("calibration") or {"a": 1.0, "b": 0.0} for m in modules]
    a, b = fit_composition(torch.stack(columns, 1), labels, torch.tensor([c["a"] for c in own]),
                           torch.tensor([c["b"] for c in own]))
    for m, ak, bk in zip(modules, a.tolist(), b.tolist()):
        m.meta["calibration"] = {"a": float(f"{ak:.6g}"), "b": float(f"{bk:.6g}"), "images": int(len(index)),
                                 "source": f"fitted jointly with the {len(modules)} composed modules"}
    return int(len(index))
