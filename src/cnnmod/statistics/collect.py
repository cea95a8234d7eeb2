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

import math
import multiprocessing
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import CnnmodError
from ..loop import Progress
from ..trace.graph import Graph
from ..trace.network import GraphNetwork, weights_of
from ..trace.ops import REGISTRY
from ..distributed import all_reduce_or_, all_reduce_sum_, rank_and_world
from ..bits import pack, unpack
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
    """The layer that computes the logits: the output, or what identity, flatten and log_softmax
    layers after it pass on (of (B, K) logits, the first two leave them as they are and the last
    shifts them all alike, so every difference of two logits, a module's margin, is unchanged)."""
    node = graph.by_name[graph.output]
    while node.op in ("identity", "flatten", "log_softmax"):
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
    """What the strategies need from the one pass, in memory that does not grow with classes x
    elements at full width (issue #16: 1,000 classes of a ResNet-50 at 224 px would take 36 GB as
    per-class int16 counts; as bits, 1.2 GB).

    The paper's rule asks whether an element was ever non-zero on the images a module observed:
    class c's own images (its "rest") and the negatives of every class, shared by all modules. So
    one bit per class and element for the rest, and one bit per element for all negatives. The
    channels strategy scores whole channels: per class, how many of a channel's elements were
    non-zero (over all its images and positions), and the values' sums for the channels' means.
    """

    layers: list[str]
    shapes: dict[str, tuple[int, ...]]  # layer -> element shape (C, H, W) or (F,)
    active_rest: dict[str, torch.Tensor]  # layer -> (R, ceil(E/8)) uint8: non-zero on a rest image of class rows[r]
    active_neg: dict[str, torch.Tensor]  # layer -> (ceil(E/8),) uint8: non-zero on a negatives image (any class)
    channel_counts: dict[str, torch.Tensor] | None  # layer -> (K, C) int64: non-zero elements per class and
    # channel (with ``sums``: the channels strategy's alone)
    seen_neg: torch.Tensor  # (K,) images of Neg_j
    seen_rest: torch.Tensor  # (K,)
    rows: torch.Tensor  # (K,) int64: each class's row of ``active_rest``; -1 for a class left out (``--only``)
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

    def active(self, c: int) -> dict[str, torch.Tensor]:
        """Per layer, which elements were non-zero on some image module ``c`` observed (bool, layer-shaped)."""
        return {name: unpack(bits, math.prod(self.shapes[name])).view(self.shapes[name])
                for name, bits in self.active_bits(c).items()}

    def active_bits(self, c: int) -> dict[str, torch.Tensor]:
        """``active(c)`` packed as bits (``bits.pack`` of the flattened layer): no unpacking needed.

        Where no negative image lit an element of a layer (no negatives: 2 images per class of 1,000
        classes), the bits are a view of the table's row, not a copy: the modules and the
        statistics then hold them once (1.2 GB less for a 1,000-class ResNet-50)."""
        row = int(self.rows[c])
        if row < 0:
            raise CnnmodError(f"expected statistics of class {c}, found them left out (--only).")
        rest, neg = self.active_rest, self.active_neg
        return {name: rest[name][row] | neg[name] if neg[name].any() else rest[name][row] for name in self.layers}

    def nbytes(self) -> int:
        """Bytes the tables take (the measure of issue #16's memory target)."""
        tables = [self.active_rest, self.active_neg, self.channel_counts or {}, self.sums or {}]
        return sum(t.numel() * t.element_size() for table in tables for t in table.values())


@torch.no_grad()
def _or_runs(table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, y: torch.Tensor) -> None:
    """OR into ``table`` the elements each label of the batch lit (a row per class kept; -1: none).
    The batch is sorted by label (``collect_statistics`` sorts it): one run per label.

    Each image's elements are packed to bits first (8x less to move), then each run folded in half
    until one row is left: a (runs, longest run) table of the images' rows, where a shorter run
    repeats its last image (OR-ing a row twice changes nothing), ORs its second half into its first.
    A run of 256 images takes 8 steps, not 255 (which cost the small CNN of the demo a third of its
    statistics pass: 7.5 ms against 1.2 ms per layer and batch of 256; a batch of 32 on a ResNet-50 layer,
    802,816 elements: 8 to 16 ms for 1 to 32 labels as before; measured in issue #25). A
    batch whose runs are so uneven that the table would hold more than twice its images is split
    in two at a run's end: the table's memory stays within twice the batch's bits.
    """
    labels, lengths = torch.unique_consecutive(y, return_counts=True)
    width = int(lengths.max())
    if len(labels) * width > 2 * len(y):
        middle = int(lengths[: len(labels) // 2].sum())
        _or_runs(table, rows, pos[:middle], y[:middle])
        _or_runs(table, rows, pos[middle:], y[middle:])
        return
    starts = lengths.cumsum(0) - lengths
    steps = torch.arange(width, device=y.device)
    lit = pack(pos)[starts[:, None] + torch.minimum(steps[None, :], (lengths - 1)[:, None])]  # (runs, width, bytes)
    while width > 1:
        half = (width + 1) // 2
        lit[:, :width - half] |= lit[:, half:width]
        width = half
    kept = rows.to(labels.device)[labels]
    mine = kept >= 0
    table[kept[mine]] |= lit[mine, 0]


# (part "neg" | "rest", number of images, loader of (x (B, ...), y (B,))): loaded only when counted
Batch = tuple[str, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]]


class _Loads(torch.utils.data.Dataset):
    """Batches ``mine`` of ``batches``, loaded in a worker; a ``CnnmodError`` is handed back, not
    raised there (the DataLoader would bury its one sentence in a worker traceback)."""

    def __init__(self, batches: list[Batch], mine: list[int]):
        self.batches, self.mine = batches, mine

    def __len__(self) -> int:
        return len(self.mine)

    def __getitem__(self, k: int):
        try:
            return self.batches[self.mine[k]][2]()
        except CnnmodError as e:
            return e


def _loaded(batches: list[Batch], mine: list[int], workers: int):
    """The loaded batches ``mine``, in order: here, or ``workers`` processes ahead (one batch each)."""
    # The loaders are closures over the data: workers must be forked (Linux, macOS), not spawned.
    if workers <= 0 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (batches[i][2]() for i in mine)
        return
    loader = torch.utils.data.DataLoader(_Loads(batches, mine), batch_size=None, num_workers=workers,
                                         prefetch_factor=1, multiprocessing_context="fork")
    for item in loader:
        if isinstance(item, CnnmodError):
            raise item
        yield item


@torch.inference_mode()
def collect_statistics(model: nn.Module, graph: Graph, batches: list[Batch], num_classes: int,
                       *, progress: bool = False, saver: "ProgressSaver | None" = None,
                       device: torch.device | str = "cpu", precision: str = "fp32", sums: bool = False,
                       weights: dict[str, torch.Tensor] | None = None,
                       classes_kept: list[int] | None = None, workers: int = 0) -> ActivationStats:
    """Run ``model`` once over ``batches`` (in order) and record what ``ActivationStats`` holds.

    ``weights``: the graph's tensors when they are not all the model's (a head cnnmod appended).
    ``classes_kept``: the classes whose per-element bits are kept (``--only``; None: all).
    ``workers``: processes that load batches ahead (torch's ``DataLoader``; 0: load in this one).

    One pass for all classes: each batch ORs its non-zero elements per run of one label (the
    sample is ordered by class), never one pass per class and never a loop over examples. With a
    ``saver``, the tables are saved every so often and a saved state is resumed from.

    Memory: one bit per element for each kept class and one for the negatives (with ``sums``, (K, C)
    channel counts and the sums too): 1,000 classes on a CIFAR ResNet-20 (188,416 observed elements)
    take 24 MB (the int16 counts before issue #16 took 754 MB; measured with ``ActivationStats.nbytes``).
    In a torchrun group each rank counts every world-th batch; bits are OR-ed, counts summed.
    With ``sums`` (what the channels strategy needs) the values themselves are also summed per layer
    over all images (not per class), and the non-zero elements counted per class and channel.
    ``precision="bf16"`` runs the pass under bfloat16 autocast: faster on a GPU, but an element
    near 0 can change sign, so masks may differ from float32's (the GPU session measures how many).
    """
    if precision not in ("fp32", "bf16"):
        raise CnnmodError(f"expected precision fp32 or bf16, found {precision!r}.")
    device = torch.device(device)
    rank, world = rank_and_world()
    layers = observed_layers(graph)
    kept = list(range(num_classes)) if classes_kept is None else sorted(set(classes_kept))
    rows = torch.full((num_classes,), -1, dtype=torch.int64)
    rows[kept] = torch.arange(len(kept))
    was_training = model.training
    model.eval()
    network = GraphNetwork(graph, weights if weights is not None else weights_of(model)).to(device)
    tables = {"neg": {}, "rest": {}, **({"channels": {}, "sum": {}} if sums else {})}
    seen = {"neg": torch.zeros(num_classes, dtype=torch.int64), "rest": torch.zeros(num_classes, dtype=torch.int64)}
    done = saver.load(tables, seen) if saver is not None else 0
    state = {"part": "neg", "y": None}
    shapes: dict[str, tuple[int, ...]] = {}

    def empty(name: str, out_device) -> None:
        """Zero tables for layer ``name`` (those a resumed state holds are kept)."""
        shape = shapes[name]
        e = math.prod(shape)
        tables["neg"].setdefault(name, torch.zeros((e + 7) // 8, dtype=torch.uint8, device=out_device))
        tables["rest"].setdefault(name, torch.zeros(len(kept), (e + 7) // 8, dtype=torch.uint8, device=out_device))
        if sums:
            tables["channels"].setdefault(name, torch.zeros(num_classes, shape[0], dtype=torch.int64,
                                                            device=out_device))
            tables["sum"].setdefault(name, torch.zeros(shape, dtype=torch.int64, device=out_device))

    wanted = set(layers)

    def count(name: str, out: torch.Tensor) -> None:
        if name not in wanted:
            return
        if name not in shapes:
            shapes[name] = tuple(out.shape[1:])
            empty(name, out.device)
        if sums:
            tables["sum"][name] += torch.round(out.double() * SUM_SCALE).to(torch.int64).sum(0)
        pos = (out != 0).flatten(1)  # (B, E); ReLU: != 0 iff > 0
        if state["part"] == "neg":
            tables["neg"][name] |= pack(pos.any(0))
        else:
            _or_runs(tables["rest"][name], rows, pos, state["y"])
        if sums:
            per_channel = pos.view(len(pos), shapes[name][0], -1).sum(2)  # (B, C)
            tables["channels"][name].index_add_(0, state["y"], per_channel)

    sizes = [size for _, size, _ in batches]
    bar = Progress(sum(sizes[rank::world]), "statistics pass", progress, done=sum(sizes[rank:done:world]), unit="img")
    mine = [i for i in range(done, len(batches)) if i % world == rank]  # each rank counts every world-th batch
    try:
        for i, (x, y) in zip(mine, _loaded(batches, mine, workers)):
            part = batches[i][0]
            if bool((y[1:] < y[:-1]).any()):  # one run per label (``_or_runs``); the order changes no table
                order = torch.sort(y, stable=True).indices
                x, y = x[order], y[order]
            x, y = x.to(device), y.to(device)
            if not torch.isfinite(x).all():
                raise CnnmodError(f"expected finite inputs, found NaN or Inf in batch {i} of the data.")
            state["part"], state["y"] = part, y
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                out = network(x, after=count)
            if i - done < world:  # each rank's first batch (8 images); the user's model stays put
                model_device = next(model.parameters(), torch.empty(0)).device
                _check_equal(model(x[:8].to(model_device)).to(out.device).float(), out[:8].float(),
                             tolerance=1e-3 if precision == "fp32" else 5e-2)
            seen[part] += torch.bincount(y, minlength=num_classes).cpu()
            bar.update(len(y))
            if saver is not None:
                saver.maybe_save(tables, seen, i + 1)
    finally:
        bar.close()
        model.train(was_training)
    if len(shapes) < len(layers):  # a rank with no batch, or a resumed run: shapes from one blank image
        found = network.shapes(tuple(batches[0][2]()[0].shape[1:]))
        for name in layers:
            shapes[name] = shapes.get(name) or found[name]
            empty(name, "cpu")
    for part, table in tables.items():
        for name in layers:
            table[name] = table[name].cpu()
            (all_reduce_or_ if part in ("neg", "rest") else all_reduce_sum_)(table[name])
    for part in seen.values():
        all_reduce_sum_(part)
    return ActivationStats(layers, shapes, tables["rest"], tables["neg"], tables.get("channels"), seen["neg"],
                           seen["rest"], rows, tables["sum"] if sums else None)
