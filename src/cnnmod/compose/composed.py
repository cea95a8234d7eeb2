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

Modules of one parent that hold identical first layers (the ``channels`` strategy's ``--trunk``)
share them: those layers run once per batch for all of them (see trunk.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CnnmodError
from ..modules.module import Module
from .trunk import group_modules, run_group


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
        self.groups = group_modules(self.modules_, list(self.networks))
        if rule == "calibrated":
            self.register_buffer("scale", torch.tensor([m.meta["calibration"]["a"] for m in modules]))
            self.register_buffer("shift", torch.tensor([m.meta["calibration"]["b"] for m in modules]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score a batch already prepared for the modules (they must share one input specification)."""
        if len({m.input_spec for m in self.modules_}) > 1:
            raise CnnmodError("these modules expect different inputs; score raw images with score_images().")
        return self._scores(self._margins(lambda spec: x))

    @torch.no_grad()
    def score_images(self, images: torch.Tensor | dict) -> torch.Tensor:
        """Score raw uint8 images (B, C, H, W): each module gets its own input preparation.

        ``images`` may also map (channels, (height, width)) to the same images decoded for each
        module's input (``Views.batch``: a folder of mixed sizes).
        """
        prepared: dict = {}

        def prepare(spec):
            if spec not in prepared:
                raw = images[(spec.channels, tuple(spec.size))] if isinstance(images, dict) else images
                prepared[spec] = spec.prepare(raw)
            return prepared[spec]
        return self._scores(self._margins(prepare))

    def _margins(self, prepare) -> torch.Tensor:
        columns: list = [None] * len(self.modules_)
        for group in self.groups:
            outputs = run_group(group, list(self.networks), prepare(self.modules_[group.members[0]].input_spec))
            for k, z in zip(group.members, outputs):
                columns[k] = _margin(z)
        return torch.stack(columns, dim=1)

    def trunk_layers(self) -> list[set[str]]:
        """The shared trunk of each group of modules (layer names; empty: none shared)."""
        return [g.trunk for g in self.groups]

    def cost(self) -> dict:
        """Parameters and multiply-accumulates per image of the whole composition, each trunk counted
        once, and what the modules would cost run one by one."""
        from ..modules.extract import cost

        total = {"params": 0, "macs": 0, "trunk_params": 0, "trunk_macs": 0, "separate_params": 0, "separate_macs": 0}
        for g in self.groups:
            spec = self.modules_[g.members[0]].input_spec  # one input preparation per group
            shape = (spec.channels, *spec.size)
            for k in g.members:
                alone = cost(self.networks[k], shape)
                branch = cost(self.networks[k], shape, g.branch) if g.trunk else alone
                total["separate_params"] += alone["params"]
                total["separate_macs"] += alone["macs"]
                total["params"] += branch["params"]
                total["macs"] += branch["macs"]
            if g.trunk:
                trunk = cost(self.networks[g.members[0]], shape, g.trunk)
                for key in ("params", "macs"):
                    total[key] += trunk[key]
                    total[f"trunk_{key}"] += trunk[key]
        return total

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
