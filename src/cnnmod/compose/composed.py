"""Modules composed into one classifier by the paper's voting rule.

The paper runs every module; if exactly one votes for its class (argmax of its two outputs)
that class wins, otherwise the class with the highest concern probability wins (among the
voters, or among all when none voted). With a 2-logit head the concern probability is
sigmoid(z_c - z_nc), increasing in the margin z_c - z_nc, and a module votes iff its margin
is > 0. So the argmax of the margins *is* the voting decision in all three cases (one voter: the
only positive margin; several: the largest positive one; none: the largest of all), and
ranking by margin never ties where float32 probabilities saturate at 1.0. The ``vote`` rule
therefore returns margins as its scores: argmax = vote, top-5 = the 5 largest.

Margins of modules from different parents are on different scales. The ``calibrated`` rule
(see modules/calibration.py) scores by calibrated log-odds a * margin + b instead, and
``unknown_below`` (a probability) answers "unknown" when no module's calibrated probability
reaches it. ``auto`` takes the paper's vote when all modules come from one parent (their
margins are already comparable, and the vote reproduces the parent's decision) and the
calibrated rule otherwise, or whenever an unknown threshold is asked for.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CnnmodError
from ..modules.module import Module


class ComposedClassifier(nn.Module):
    """Scores (B, K): column k is module k's margin z_concern - z_not_concern."""

    def __init__(self, modules: list[Module], *, rule: str = "auto", unknown_below: float | None = None):
        super().__init__()
        if not modules:
            raise CnnmodError("expected at least one module to compose, found none.")
        names = [m.class_name for m in modules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CnnmodError(f"expected modules of distinct classes, found class {dupes[0]!r} more than once "
                              "(use replace to swap a module).")
        self.modules_ = list(modules)
        self.networks = nn.ModuleList([m.network for m in modules])
        self.classes = names
        calibrated = all("calibration" in m.meta for m in modules)
        one_parent = len({m.meta.get("parent_fingerprint") for m in modules}) == 1
        if rule == "auto":
            rule = "calibrated" if calibrated and (unknown_below is not None or not one_parent) else "vote"
        if rule not in ("vote", "calibrated"):
            raise CnnmodError(f"expected the rule vote or calibrated, found {rule!r}.")
        if rule == "calibrated" and not calibrated:
            raise CnnmodError("expected calibrated modules for the calibrated rule, found modules without a "
                              "calibration (decompose with calibration, or use the vote rule).")
        if unknown_below is not None and not (rule == "calibrated" and 0.0 < unknown_below < 1.0):
            raise CnnmodError(f"expected an unknown threshold in (0, 1) with the calibrated rule, "
                              f"found {unknown_below} with the {rule} rule.")
        self.rule, self.unknown_below = rule, unknown_below
        if rule == "calibrated":
            self.register_buffer("scale", torch.tensor([m.meta["calibration"]["a"] for m in modules]))
            self.register_buffer("shift", torch.tensor([m.meta["calibration"]["b"] for m in modules]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score a batch already prepared for the modules (they must share one input specification)."""
        specs = {m.input_spec for m in self.modules_}
        if len(specs) > 1:
            raise CnnmodError("these modules expect different inputs; score raw images with score_images().")
        return self._scores(torch.stack([_margin(net(x)) for net in self.networks], dim=1))

    @torch.no_grad()
    def score_images(self, images: torch.Tensor) -> torch.Tensor:
        """Score raw uint8 images (B, C, H, W): each module gets its own input preparation."""
        prepared: dict = {}
        columns = []
        for m, net in zip(self.modules_, self.networks):
            if m.input_spec not in prepared:
                prepared[m.input_spec] = m.input_spec.prepare(images)
            columns.append(_margin(net(prepared[m.input_spec])))
        return self._scores(torch.stack(columns, dim=1))

    def _scores(self, margins: torch.Tensor) -> torch.Tensor:
        return margins * self.scale + self.shift if self.rule == "calibrated" else margins

    def reject_below(self) -> float | None:
        """The score under which the answer is "unknown" (log-odds of ``unknown_below``), if any."""
        if self.unknown_below is None:
            return None
        return float(torch.logit(torch.tensor(self.unknown_below, dtype=torch.float64)))


def _margin(z: torch.Tensor) -> torch.Tensor:
    return z[:, 1] - z[:, 0]  # (B, 2) -> (B,)


def compose(modules: list[Module], *, rule: str = "auto", unknown_below: float | None = None) -> ComposedClassifier:
    """Compose modules into a classifier (rule ``vote``: the paper's; ``calibrated``: comparable scores).

    >>> clf = compose([load_module("m/cat.safetensors"), load_module("m/dog.safetensors")])
    >>> clf.score_images(images).argmax(1)  # 0: cat, 1: dog
    """
    return ComposedClassifier(modules, rule=rule, unknown_below=unknown_below).eval()


def replace(modules: list[Module], new: Module) -> list[Module]:
    """Return ``modules`` with the module of ``new``'s class swapped for ``new``."""
    names = [m.class_name for m in modules]
    if new.class_name not in names:
        raise CnnmodError(f"expected a module for one of the classes {', '.join(names)}, "
                          f"found one for class {new.class_name!r}.")
    return [new if m.class_name == new.class_name else m for m in modules]
