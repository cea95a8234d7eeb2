"""Decomposition strategies: how a module is built from the parent and the statistics.

A strategy takes the ``Parent`` (graph, weights, statistics, shapes) and a class index and
returns the module's network and a summary. ``paper`` is Pan & Rajan's CI + TI + MC-BLN,
faithfully: masks over the whole network. ``channels`` keeps whole channels per class and
extracts a physically smaller network (ours; see ``channels_strategy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from ..bits import count, pack, unpack
from ..concerns import active_masks, backtrack_removed, channel_head, channel_scores, head_totals, mc_bln_features
from ..concerns.channeling import LOGITS_HEAD
from ..errors import CnnmodError
from ..options import check, option
from ..statistics import ActivationStats
from ..trace.channels import Spaces, channel_spaces, index_map
from ..trace.graph import Graph
from ..trace.network import GraphNetwork
from ..trace.ops import REGISTRY
from ..trace.overlays import overlaid
from .extract import cost, extract, fold_batchnorm, layer_macs
from .metrics import record_kernels
from .reconstruct import reconstruct_


@dataclass
class Parent:
    graph: Graph
    weights: dict[str, torch.Tensor]
    stats: ActivationStats
    shapes: dict[str, tuple[int, ...]]  # layer -> output shape without batch
    head: str  # the final Linear layer
    input_shape: tuple[int, ...] = ()  # one prepared input, without the batch
    sample: torch.Tensor | None = None  # a few hundred prepared images of the statistics sample
    spaces: Spaces | None = None  # channel spaces, traced once for all modules
    sample_labels: torch.Tensor | None = None  # (len(sample),) parent class of each sample image
    focus: list[int] | None = None  # the classes modules are built for (None: all); the trunk serves them
    _outputs: dict | None = None
    _common_scores: dict = field(default_factory=dict)
    _energy: tuple | None = None
    _cost: dict | None = None
    _refits: dict = field(default_factory=dict)  # re-fitted layers every module shares (``channels_strategy``)
    _head_totals: tuple | None = None

    def channel_head(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class c's 2-logit head (``concerns.channel_head``), the head's totals computed once."""
        w, b = self.weights[f"{self.head}.weight"], self.weights.get(f"{self.head}.bias")
        if self._head_totals is None:
            self._head_totals = head_totals(w, b)
        return channel_head(w, b, c, self._head_totals)

    def channel_spaces(self) -> Spaces:
        if self.spaces is None:
            self.spaces = channel_spaces(self.graph)
        return self.spaces

    def trunk_spaces(self, share: float) -> set[int]:
        """The prunable spaces whose first layer starts within the first ``share`` of the MACs."""
        spaces = self.channel_spaces()
        macs = {n.name: layer_macs(n, self.shapes[n.name], self.weights[f"{n.name}.weight"])
                for n in self.graph.nodes if REGISTRY[n.op].macs is not None}
        total, before, start = sum(macs.values()), 0, {}
        for node in self.graph.nodes:
            start.setdefault(spaces.of[node.name], before / total)
            before += macs.get(node.name, 0)
        return {s for s in spaces.prunable if start[s] < share}

    def scores(self, c: int | None, score: str) -> dict[int, torch.Tensor]:
        """Channel scores for class c (``None``: for every class alike, the trunk's), per prunable space.

        ``rate``: how differently a channel fires on c than on the others (``channel_scores``;
        for all classes, averaged over the ``focus`` classes). ``energy``: ``energy_scores`` (the
        sample holds only the focus classes' images).
        """
        if c is not None:
            return channel_scores(self.stats, self.channel_spaces(), c) if score == "rate" else self.energy_scores(c)
        if score not in self._common_scores:
            if score == "energy":
                self._common_scores[score] = self.energy_scores(None)
            else:
                focus = self.focus if self.focus is not None else range(self.stats.num_classes)
                per_class = [channel_scores(self.stats, self.channel_spaces(), k) for k in focus]
                self._common_scores[score] = {s: sum(p[s] for p in per_class) / len(per_class) for s in per_class[0]}
        return self._common_scores[score]

    @torch.no_grad()
    def energy_scores(self, c: int | None) -> dict[int, torch.Tensor]:
        """Per prunable space, what replacing each channel by its mean costs the layers reading it.

        Channel i's score is E[(x_i - mean_i)^2] (its values at the space's ReLUs, on the sample)
        times the squared norm of the weights that read it (all readers of the space): the
        expected squared error its removal puts into the next layers' inputs, ignoring
        correlations (the closed-form re-fit then absorbs what it can). For a class c the
        expectation weighs class c's images one half and the others one half; ``None``: all alike.
        """
        deviation, norm = self._energy_parts()
        if c is None:
            weigh = torch.full((len(self.sample),), 1.0 / len(self.sample))
        else:
            mine = self.sample_labels == c
            weigh = torch.where(mine, 0.5 / mine.sum().clamp_min(1), 0.5 / (~mine).sum().clamp_min(1))
        return {s: (deviation[s].T @ weigh) * norm[s] for s in deviation}

    @torch.no_grad()
    def _energy_parts(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per prunable space: each sample image's mean squared deviation per channel (N, C), summed
        over the space's ReLUs, and the squared norm of the weights reading each channel (C,).
        Computed once; only the weighting of the images differs between classes."""
        if self._energy is None:
            spaces = self.channel_spaces()
            values = self.outputs({r for s in spaces.prunable for r in spaces.relus[s]})
            norm: dict[int, torch.Tensor] = {}
            first: dict[int, str] = {}  # a space's first layer: its shape's first dimension counts the channels
            for node in self.graph.nodes:
                first.setdefault(spaces.of[node.name], node.name)
                s = spaces.of[node.inputs[0]] if node.inputs else None
                if REGISTRY[node.op].flow(node) == "new" and s != spaces.of[node.name] \
                        and (s in spaces.prunable or s in spaces.derived):  # not a grouped conv's space
                    w, c = self.weights[f"{node.name}.weight"], self.shapes[first[s]][0]
                    norm[s] = norm.get(s, 0) + w.pow(2).reshape(w.shape[0], c, -1).sum((0, 2))
            for s, node in reversed(spaces.derived.items()):  # who reads a concat or split reads its sources
                counts = [self.shapes[i][0] for i in node.inputs]
                which, channel = index_map(node, counts)
                for k, i in enumerate(node.inputs):
                    src = spaces.of[i]
                    norm[src] = norm.get(src, torch.zeros(counts[k])).index_add(
                        0, channel[which == k], norm.get(s, torch.zeros(len(which)))[which == k])
            deviation = {s: sum(((values[r] - self.stats.mean(r).float()) ** 2).flatten(2).mean(2)
                                for r in spaces.relus[s]) for s in spaces.prunable}
            self._energy = (deviation, {s: norm.get(s, torch.zeros(deviation[s].shape[1])) for s in spaces.prunable})
        return self._energy

    def cost(self) -> dict[str, int]:
        """The parent's own parameters and multiply-accumulates (computed once, for all modules)."""
        if self._cost is None:
            self._cost = cost(GraphNetwork(self.graph, self.weights), self.input_shape)
        return self._cost

    @torch.no_grad()
    def outputs(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The parent's outputs of layers ``names`` on ``sample`` (computed once, for all modules)."""
        if self._outputs is None or not names <= self._outputs.keys():
            wanted = names | (self._outputs or {}).keys()
            self._outputs = {}
            net = GraphNetwork(self.graph, self.weights)
            net(self.sample, after=lambda name, out: self._outputs.__setitem__(name, out) if name in wanted else None)
        return self._outputs


def paper_strategy(parent: Parent, c: int, *, delta: float = 0.5) -> tuple[GraphNetwork, dict]:
    """CI + TI (inactive elements), channeled head, MC-BLN backtracking (delta).

    The masks stay packed as bits from the statistics to the module (``active_bits``): only the
    few layers MC-BLN reaches are unpacked (a ResNet-50 at 224 px observes 9.6M elements)."""
    keep = active_masks(parent.stats, c)
    w2, b2 = parent.channel_head(c)
    # MC-BLN applies where the head is the model's Linear layer, not over the logits of another classifier
    removed = mc_bln_features(w2, delta) if parent.head != LOGITS_HEAD else torch.zeros(w2.shape[1], dtype=torch.bool)
    head_input = parent.graph.by_name[parent.head].inputs[0]
    stopped: dict[str, str] = {}
    for layer, gone in backtrack_removed(parent.graph, head_input, removed, set(keep), parent.shapes,
                                         stopped).items():
        keep[layer] = pack(unpack(keep[layer], gone.numel()) & ~gone.flatten())
    weights = dict(parent.weights, **{f"{parent.head}.weight": w2, f"{parent.head}.bias": b2})
    kept = sum(count(bits) for bits in keep.values())
    total = sum(math.prod(parent.stats.shapes[layer]) for layer in keep)
    summary = {"elements_kept": kept, "elements_total": total, "share_kept": kept / total,
               "mc_bln_features_removed": int(removed.sum())}
    if stopped:  # removed features MC-BLN could not follow to an observed layer: kept there
        summary["mc_bln_stopped"] = sorted(stopped.values())
    bitmasks = {layer: (bits, parent.stats.shapes[layer]) for layer, bits in keep.items()}
    return overlaid(parent.graph, weights, bitmasks=bitmasks), summary


def channels_strategy(parent: Parent, c: int, *, keep: float = 0.5, refit: bool = True, streams: bool = True,
                      trunk: float = 0.0, trunk_keep: float | None = None,
                      score: str = "rate", retain: float | None = None, multiple: int = 1,
                      max_loss: float | None = None) -> tuple[GraphNetwork, dict]:
    """Keep the ``keep`` share of each prunable channel space that best tells class c apart.

    A channel's score is how differently it fires on class c than on the other classes, from the
    one-pass counts (``channel_scores``). A removed channel is not zeroed but replaced by its mean
    value over the observed images (zeroing shifts every later layer: measured in issue #5, it
    makes every module claim every input); the head is channeled as in the paper. The masked
    network is then extracted into a physically smaller one that computes the same logits, and
    (``refit``) the layers that read removed channels are re-fitted in closed form to reproduce
    the parent's outputs on a sample (``reconstruct_``).

    ``streams=False`` keeps residual streams whole and prunes only the channels inside blocks (as
    He et al. 2017 prune ResNets): a stream channel feeds every later block through the shortcuts.
    ``trunk``: the spaces that start in the first ``trunk`` share of the parent's multiply-
    accumulates are pruned alike for every class (the ``trunk_keep`` share, default ``keep``, of
    the channels with the best score averaged over the classes), so every module of this parent
    holds the same trunk, bit for bit, and ``compose`` runs it once for all of them.
    ``retain`` (instead of a fixed share per space): each space keeps the fewest best channels
    whose scores add up to this share of the space's total, so the budget follows each layer
    (the trunk's spaces too, unless ``trunk_keep`` is given).
    ``multiple``: each space's count of kept channels is rounded to the nearest multiple of this
    (at least one multiple, at most the whole space). Convolution kernels compute channels in
    blocks (oneDNN on AVX2: 8; measured in BENCHMARKS.md, 9 to 16 channels cost what 16 do), so a
    count between two multiples saves MACs but no time.
    Finally each BatchNorm that follows a convolution is folded into it (``fold_batchnorm``).
    """
    ChannelsOptions(keep, refit, streams, trunk, trunk_keep, score, retain, multiple, max_loss)  # validates them
    if max_loss is not None:
        raise CnnmodError("expected max_loss only with decompose (it chooses --retain on images held back from the "
                          "statistics), found it with build; give build keep or retain.")
    trunk_retain = retain if trunk_keep is None else None  # --trunk-keep, when given, rules the trunk
    trunk_keep = keep if trunk_keep is None else trunk_keep
    spaces = parent.channel_spaces()
    w2, b2 = parent.channel_head(c)
    weights = dict(parent.weights, **{f"{parent.head}.weight": w2, f"{parent.head}.bias": b2})
    shared = parent.trunk_spaces(trunk)
    keep_channels = {}
    masks, fills = {}, {}
    own, common = parent.scores(c, score), (parent.scores(None, score) if shared else {})
    for space in sorted(spaces.prunable):
        if space in spaces.streams and not streams:
            continue
        share, ranked, held = (trunk_keep, common[space], trunk_retain) if space in shared else \
            (keep, own[space], retain)
        order = torch.sort(ranked, descending=True, stable=True)
        k = max(1, round(share * ranked.numel()))
        if held is not None:
            total = order.values.double().cumsum(0)
            k = max(1, int((total < held * total[-1]).sum()) + 1)
        if multiple > 1:
            k = min(ranked.numel(), multiple * max(1, int(k / multiple + 0.5)))
        chosen = torch.zeros(ranked.numel(), dtype=torch.bool)
        chosen[order.indices[:k]] = True
        keep_channels[space] = chosen
        for relu in spaces.relus[space]:
            shape = parent.shapes[relu]
            masks[relu] = chosen.view(-1, *([1] * (len(shape) - 1))).expand(shape)
            fills[relu] = parent.stats.mean(relu).float()
    masked = overlaid(parent.graph, weights, masks=masks, fills=fills)
    network = extract(masked, spaces, keep_channels, parent.input_shape)
    if refit and parent.sample is not None:
        # derived spaces (after a concat, split, shuffle) too; constant channels (padding) lose nothing
        keep_all = spaces.expand(keep_channels, parent.shapes, constants=True)
        readers = {n.name for n in parent.graph.nodes if REGISTRY[n.op].flow(n) == "new" and n.inputs
                   and spaces.of[n.inputs[0]] in keep_all and spaces.of[n.inputs[0]] != spaces.of[n.name]}
        outputs = parent.outputs(readers | {parent.head})
        pruned = {n for n in readers if not bool(keep_all[spaces.of[parent.graph.by_name[n].inputs[0]]].all())}
        targets = {n: outputs[n] for n in pruned if n != parent.head}
        if parent.head in pruned:  # the module's head: the parent's logits, channeled
            z = outputs[parent.head]
            others = torch.arange(z.shape[1]) != c
            targets[parent.head] = torch.stack([z[:, others].mean(1), z[:, c]], 1)
        out_index = {n: _kept_index(keep_channels.get(spaces.of[n])) for n in targets if n != parent.head}
        own_spaces = set(keep_channels) - shared  # the spaces whose channels are this class's own choice
        key = tuple((s, keep_channels[s].numpy().tobytes()) for s in sorted(set(keep_channels) - own_spaces))
        reconstruct_(network, targets, out_index, parent.sample,
                     cache=parent._refits.setdefault(key, {}), cacheable=_common_layers(parent, own_spaces))
    network = fold_batchnorm(network)
    kept_all = spaces.expand(keep_channels, parent.shapes)  # every layer's kept channels, derived spaces' too
    mine, full = cost(network, parent.input_shape), parent.cost()
    kept = sum(int(k.sum()) for k in keep_channels.values())
    total = sum(k.numel() for k in keep_channels.values())
    reasons: dict[str, int] = {}
    for reason in spaces.whole.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    summary = {"channels_kept": kept, "channels_prunable": total, "share_kept": kept / max(1, total),
               "params_fraction": mine["params"] / full["params"], "macs_fraction": mine["macs"] / full["macs"],
               "spaces_kept_whole": dict(sorted(reasons.items())),
               "parent_channels": (spaces.of, kept_all)}  # in memory only: build() takes it out
    summary["kept_kernels"] = record_kernels({n.name: kept_all[spaces.of[n.name]] for n in parent.graph.nodes
                                              if n.op == "conv" and spaces.of[n.name] in kept_all
                                              and not bool(kept_all[spaces.of[n.name]].all())})
    return network, summary


def _common_layers(parent: Parent, own_spaces: set[int]) -> set[str]:
    """The layers that are the same in every module of this parent, re-fits included: no channel
    of them or of any layer before them is a class's own choice, and they are not the head.
    Their re-fits are computed once and reused (with ``--trunk 1.0``, all but the head's)."""
    spaces, common = parent.channel_spaces(), set()
    for node in parent.graph.nodes:
        mine = spaces.of[node.name] in own_spaces
        if node.name != parent.head and not mine and all(i in common for i in node.inputs):
            common.add(node.name)
    return common


def _kept_index(k: torch.Tensor | None) -> torch.Tensor | None:
    return None if k is None or bool(k.all()) else k.nonzero().flatten()


# Each strategy's options: a validated dataclass whose fields make the command line's flags (options.py).
@dataclass(frozen=True)
class PaperOptions:
    delta: float = option(0.5, "MC-BLN threshold: a head feature is removed when its weight to "
                               "not-this-class is >= delta and to this class below delta in size", "positive")

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class ChannelsOptions:
    keep: float = option(0.5, "share of each channel space a module keeps", "share")
    refit: bool = option(True, None, "switch")  # Python only: the ablation without re-fits
    streams: bool = option(True, "keep residual streams whole, prune only inside blocks", "switch",
                           flag="--keep-streams", const=False)
    trunk: float = option(0.0, "share of the parent's MACs, from the input, pruned alike for every class, so "
                               "that composed modules run it once (0: none)", "share0")
    trunk_keep: float | None = option(None, "share of each trunk channel space kept (default: --keep, or "
                                            "--retain)", "share")
    score: str = option("rate", "rank channels by firing rate per class or by the error removing them causes",
                        "choice", choices=("rate", "energy"))
    retain: float | None = option(None, "instead of --keep, keep per space the best channels holding this share "
                                        "of the space's total score", "share")
    multiple: int = option(1, "round each space's kept channels to a multiple of this (8: the block size of CPU "
                              "convolution kernels, so that every removed channel saves time)", "count")
    max_loss: float | None = option(None, "instead of --keep or --retain: the smallest modules (the least --retain) "
                                          "whose composition loses at most this many points of top-1 against the "
                                          "model on images held back from the statistics (default when neither is "
                                          "given: 1.0)", "points")

    def __post_init__(self):
        check(self)


def _paper_kept(meta: dict) -> str:
    return f"keeps {meta['share_kept']:.4f} of {meta['elements_total']:,} observed elements"


def _channels_kept(meta: dict) -> str:
    if meta["channels_prunable"] == 0:
        return "keeps every channel: no channel space can be pruned (cnnmod inspect says why)"
    return f"keeps {meta['channels_kept']:,} of {meta['channels_prunable']:,} prunable channels"


@dataclass(frozen=True)
class Strategy:
    """A strategy, as the library and the command line see it: registered once, in ``STRATEGIES``."""

    build: Callable[..., tuple[GraphNetwork, dict]]  # (parent, class index, **options) -> (network, summary)
    options: type  # its options dataclass (its fields are the flags of ``decompose --strategy NAME``)
    needs_sums: bool  # the statistics pass must also sum values and keep a sample of images
    description: str  # what it does, for ``--strategy``'s help and for refusals ("which ...")
    kept: Callable[[dict], str]  # what one module keeps, from its meta ("keeps ... of ..."): decompose, inspect

    def check(self, options) -> object:
        """``options`` (a dict of keyword options, or the dataclass itself) as the validated dataclass."""
        if isinstance(options, self.options):
            return options
        unknown = set(options) - {f.name for f in fields(self.options)}
        if unknown:
            raise CnnmodError(f"expected options of this strategy ({', '.join(f.name for f in fields(self.options))}), "
                              f"found {', '.join(sorted(unknown))}.")
        return self.options(**options)


STRATEGIES: dict[str, Strategy] = {
    "paper": Strategy(paper_strategy, PaperOptions, needs_sums=False, kept=_paper_kept,
                      description="Pan & Rajan's masks on the whole model: keeps whole layers and masks elements"),
    "channels": Strategy(channels_strategy, ChannelsOptions, needs_sums=True, kept=_channels_kept,
                         description="whole channels removed: physically smaller modules"),
}
