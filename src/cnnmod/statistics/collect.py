"""Count, per class, how often each observed element is non-zero: all classes in one pass.

Observed elements (the paper's "nodes"): every element (channel x height x width, or unit of a
hidden dense layer) of every activation's output (ReLU, ReLU6, Hardswish, SiLU, ...: the
registry's ``activation`` ops). The paper observes convolution outputs assuming a ReLU follows;
with BatchNorm the value that decides is the one after BN and before the ReLU (ALGORITHM.md
2.1), and in a residual block the ReLU receives the sum of the branch and the shortcut. An
element that is exactly 0 on every observed input is masked: masking a zero changes nothing on
those inputs (tested), whatever the activation, whereas zeroing a negative value that is *not*
an activation's output (a pre-add BN output, a depthwise conv feeding a pointwise one) would
change the network. For ReLU, output != 0 iff input > 0 (the paper's rule).

The pass runs the traced graph (``GraphNetwork``, checked equal to the model on the first
batch) rather than hooks on the user's model: functional ReLUs and adds have no module to hook.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import CnnmodError
from ..trace.graph import Graph
from ..trace.network import GraphNetwork, weights_of
from ..trace.ops import REGISTRY
from ..distributed import all_reduce_sum_, rank_and_world
from .progress import ProgressSaver


def _check_equal(expected: torch.Tensor, got: torch.Tensor, tolerance: float = 1e-3) -> None:
    """The traced graph must compute what the model computes (a cheap oracle on one batch)."""
    diff = float((expected - got).abs().max())
    if not diff <= tolerance * (1.0 + float(expected.abs().max())):
        raise CnnmodError(f"expected the traced graph to reproduce the model's outputs, found a difference "
                          f"of {diff:.3g}: the model computes something cnnmod does not trace.")


def head_layer(graph: Graph) -> str:
    """Return the final Linear layer (the classifier head), which must produce the output.

    Identity and flatten layers after it (timm's classifier heads end in one) change nothing.
    """
    node = _logits_layer(graph)
    if node.op != "linear":
        raise CnnmodError(f"expected the model to end in a Linear layer, found {node.op} {node.name!r}.")
    return node.name


def ends_in_linear(graph: Graph) -> bool:
    """Whether the logits come from a Linear layer (identity and flatten after it aside)."""
    return _logits_layer(graph).op == "linear"


def _logits_layer(graph: Graph):
    """The layer that computes the logits: the output, or what identity and flatten layers after it
    (of (B, K) logits: both leave them as they are) pass on."""
    node = graph.by_name[graph.output]
    while node.op in ("identity", "flatten"):
        node = graph.by_name[node.inputs[0]]
    return node


def observed_layers(graph: Graph) -> list[str]:
    """Return the layers whose output elements are observed and masked (the activations), in order."""
    head_layer(graph)  # a model without a Linear head cannot be decomposed: say so first
    return [node.name for node in graph.nodes if REGISTRY[node.op].activation]


# Values are summed in fixed point (int64, 2**-16 resolution): integer sums do not depend on the
# order of addition, so a torchrun group's sums equal a single process's exactly.
SUM_SCALE = 2.0 ** 16


@dataclass
class ActivationStats:
    """Per-class counts of positive values, split into the negatives prefix and the rest."""

    layers: list[str]
    counts_neg: dict[str, torch.Tensor]  # layer -> (K, *shape) int16/int32, over Neg_j of each class j
    counts_rest: dict[str, torch.Tensor]  # layer -> (K, *shape) int16/int32, over P_j minus Neg_j
    seen_neg: torch.Tensor  # (K,) images of Neg_j
    seen_rest: torch.Tensor  # (K,)
    sums: dict[str, torch.Tensor] | None = None  # layer -> (*shape) int64, sum of values * 2**16, all images

    def mean(self, name: str) -> torch.Tensor:
        """The mean value of each element of ``name`` over every observed image (needs ``sums``)."""
        return self.sums[name].double() / SUM_SCALE / max(1, int(self.seen_neg.sum() + self.seen_rest.sum()))

    @property
    def num_classes(self) -> int:
        return int(self.seen_neg.numel())

    def observed(self, c: int) -> int:
        """Images module ``c`` observed: its positives plus the negatives of every other class."""
        return int(self.seen_rest[c] + self.seen_neg.sum())  # P_c = rest_c + Neg_c

    def positive_counts(self, c: int) -> dict[str, torch.Tensor]:
        """Return, per layer, how often each element was > 0 among the images module ``c`` observed."""
        # over P_c (rest_c + Neg_c) plus Neg_j for j != c: rest_c + all Neg_j
        return {name: self.counts_rest[name][c].to(torch.int32) + self.neg_total(name) for name in self.layers}

    def neg_total(self, name: str) -> torch.Tensor:
        if not hasattr(self, "_neg_total"):
            self._neg_total = {}
        if name not in self._neg_total:
            self._neg_total[name] = self.counts_neg[name].sum(0, dtype=torch.int32)
        return self._neg_total[name]


# (part "neg" | "rest", number of images, loader of (x (B, ...), y (B,))): loaded only when counted
Batch = tuple[str, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]]


@torch.inference_mode()
def collect_statistics(model: nn.Module, graph: Graph, batches: list[Batch], num_classes: int,
                       *, progress: bool = False, saver: "ProgressSaver | None" = None,
                       max_per_class: int = 32767, device: torch.device | str = "cpu",
                       precision: str = "fp32", sums: bool = False,
                       weights: dict[str, torch.Tensor] | None = None) -> ActivationStats:
    """Run ``model`` once over ``batches`` (in order) and count.

    ``weights``: the graph's tensors when they are not all the model's (a head cnnmod appended).

    One pass for all classes: each batch adds its positives per label (per run of one label,
    or with ``index_add_``), never one pass per class and never a loop over examples. With a
    ``saver``, the counts are saved every so often and a saved state is resumed from.

    Memory: one (K, *shape) table per observed layer and part, in int16 when no class has more
    than ``max_per_class`` <= 32767 images in the sample (the paper's budget is 1000), else int32:
    1,000 classes on a CIFAR ResNet-20 (188,416 observed elements) take 0.75 GB.
    In a torchrun group each rank counts every world-th batch and the counts are summed.
    With ``sums`` the values themselves are also summed per layer over all images (not per class).
    ``precision="bf16"`` runs the pass under bfloat16 autocast: faster on a GPU, but an element
    near 0 can change sign, so masks may differ from float32's (the GPU session measures how many).
    """
    if precision not in ("fp32", "bf16"):
        raise CnnmodError(f"expected precision fp32 or bf16, found {precision!r}.")
    device = torch.device(device)
    dtype = torch.int16 if max_per_class <= torch.iinfo(torch.int16).max else torch.int32
    rank, world = rank_and_world()
    layers = observed_layers(graph)
    was_training = model.training
    model.eval()
    network = GraphNetwork(graph, weights if weights is not None else weights_of(model)).to(device)
    counts = {"neg": {}, "rest": {}, **({"sum": {}} if sums else {})}
    seen = {"neg": torch.zeros(num_classes, dtype=torch.int64), "rest": torch.zeros(num_classes, dtype=torch.int64)}
    done = saver.load(counts, seen) if saver is not None else 0
    state = {"part": "neg", "y": None, "runs": None}

    wanted = set(layers)

    def count(name: str, out: torch.Tensor) -> None:
        if name not in wanted:
            return
        if sums:
            if name not in counts["sum"]:
                counts["sum"][name] = torch.zeros(out.shape[1:], dtype=torch.int64, device=out.device)
            counts["sum"][name] += torch.round(out.double() * SUM_SCALE).to(torch.int64).sum(0)
        table = counts[state["part"]]
        if name not in table:
            table[name] = torch.zeros((num_classes, *out.shape[1:]), dtype=dtype, device=out.device)
        pos = (out != 0).view(torch.uint8).flatten(1)  # (B, E) 0/1, no copy; ReLU: != 0 iff > 0
        flat = table[name].view(num_classes, -1)  # (K, E)
        labels, lengths = state["runs"]
        if len(labels) <= 8:
            # The sample is ordered by class, so a batch holds a few runs of one label: one
            # reduction per run is ~2x faster than index_add_ (measured on 2 CPU cores). Summing
            # straight into the table's type (a run is at most a batch) is 2x faster than via int32.
            for c, run in zip(labels.tolist(), pos.split(lengths.tolist())):
                flat[c] += run.sum(0, dtype=dtype if len(run) <= torch.iinfo(dtype).max else torch.int32).to(dtype)
        else:
            flat.index_add_(0, state["y"], pos.to(dtype))

    sizes = [size for _, size, _ in batches]
    bar = tqdm(total=sum(sizes[rank::world]), initial=sum(sizes[rank:done:world]),
               disable=not (progress and sys.stderr.isatty()),
               unit="img", unit_scale=True, desc="statistics pass")
    try:
        for i, (part, _, load) in enumerate(batches[done:], start=done):
            if i % world != rank:
                continue  # another rank's batch
            x, y = load()
            x, y = x.to(device), y.to(device)
            if not torch.isfinite(x).all():
                raise CnnmodError(f"expected finite inputs, found NaN or Inf in batch {i} of the data.")
            state["part"], state["y"] = part, y
            state["runs"] = torch.unique_consecutive(y, return_counts=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                out = network(x, after=count)
            if i - done < world:  # each rank's first batch (8 images); the user's model stays put
                model_device = next(model.parameters(), torch.empty(0)).device
                _check_equal(model(x[:8].to(model_device)).to(out.device).float(), out[:8].float(),
                             tolerance=1e-3 if precision == "fp32" else 5e-2)
            seen[part] += torch.bincount(y, minlength=num_classes).cpu()
            bar.update(len(y))
            if saver is not None:
                saver.maybe_save(counts, seen, i + 1)
    finally:
        bar.close()
        model.train(was_training)
    shapes = None
    for part in ("neg", "rest"):  # a part (or a rank's share) may be empty
        for name in layers:
            if name not in counts[part]:
                shapes = shapes or network.shapes(tuple(batches[0][2]()[0].shape[1:]))
                counts[part][name] = torch.zeros((num_classes, *shapes[name]), dtype=dtype)
            counts[part][name] = counts[part][name].cpu()
            all_reduce_sum_(counts[part][name])
        all_reduce_sum_(seen[part])
    if sums:
        for name in layers:
            if name not in counts["sum"]:
                shapes = shapes or network.shapes(tuple(batches[0][2]()[0].shape[1:]))
                counts["sum"][name] = torch.zeros(shapes[name], dtype=torch.int64)
            counts["sum"][name] = counts["sum"][name].cpu()
            all_reduce_sum_(counts["sum"][name])
    return ActivationStats(layers, counts["neg"], counts["rest"], seen["neg"], seen["rest"],
                           counts["sum"] if sums else None)
