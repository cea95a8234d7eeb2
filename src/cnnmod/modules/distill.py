"""Distilled modules (opt-in): a small, bounded amount of training where the closed form stops.

The ``channels`` strategy chooses a module's channels and re-fits the layers that read removed
ones in closed form; at a quarter of the parent's MACs that loses tens of points (BENCHMARKS.md).
Distillation then fine-tunes the module's kept weights to reproduce what the parent itself says
on the decomposition images: module c's two logits should be the parent's channeled pair
(the mean of the other classes' logits, z_c), computed from the parent's K logits. No labels are
needed: the parent labels every image.

Modules of one parent that compute their first layers identically (a shared trunk,
``--trunk``) train that trunk once, together: its tensors are one set of parameters whose
gradient sums every module's loss, and every module gets the same trained tensors back, so the
trunk stays shared, bit for bit. Each module's own layers (its branch) train on its loss alone.

The steps, in order: the strategy's closed-form re-fit is the block-by-block part (each layer that
reads removed channels fitted, on its real inputs, to the parent's outputs); then end to end, the
logits' terms and, with ``features``, the parent's own features at the channels each module kept
(each block's output and the last feature map: where each kept channel should be), so that the
modules follow the parent inside as well as at the end.

Only the layers' weights and biases train (convolutions, linear layers, BatchNorm's affine pair);
BatchNorm's running statistics, masks, fills and added constants stay as the strategy chose them.
Deterministic: the seed fixes the order of the images (and which are mirrored or shifted, with
``flip`` and ``crop``); Adam, warm-up then a cosine schedule, through the one training loop
(``loop.py``). On ``device``, the modules run on device copies of their tensors, bound for the
run: their own tensors (shared with the parent's) stay where they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

# The shared trunk is found and run by the code that composes modules: distillation trains through
# exactly what a composition will run (a later stage's code, imported on purpose).
from ..compose.trunk import Group, run_group, shared_layers
from ..errors import CnnmodError
from ..files import tensors_checksum, write_file
from ..options import check, option
from ..statistics.progress import read_progress
from ..trace.network import GraphNetwork
from ..trace.ops import REGISTRY, weight_keys
from ..loop import Order, device_copies, run_steps, warmup_cosine
from ..training import augment_batch
from .extract import cost
from .module import Module

TRAINED_ROLES = ("weight", "bias")
CHECK_IMAGES = 2048  # the images the loss is checked on, before and after


@dataclass(frozen=True)
class DistillOptions:
    """``epochs``: passes over the decomposition images (the budget; 0.5 is half of them once).
    ``flip``: mirror a seeded half of each batch left to right (for photos; not for digits or text).
    ``composed``: weight of a term for the modules' composed answer (``_summed_loss``), its softmax
    taken at ``temperature``.
    ``features``: weight of a term for the parent's features (``_Features``): each block's output
    and the features before pooling, at the channels the module kept.
    ``crop``: shift each image by up to an eighth of its size (zero padding, seeded), as training does."""

    PREFIX = "distill-"  # its flags: --distill EPOCHS, --distill-lr, ... (options.py)
    epochs: float = option(1.0, "channels strategy: fine-tune the modules for EPOCHS passes over the observed "
                                "images to reproduce the parent's logits (no labels needed; no --distill: no "
                                "training)", "positive", high=1000, flag="--distill", metavar="EPOCHS", shown=False)
    batch_size: int = option(128, None, "count")
    lr: float = option(1e-3, "the distillation's learning rate (Adam)", "rate")
    seed: int = option(0, None, "integer")  # the command line's: --seed
    flip: bool = option(False, "distil on left-right mirrored images too (photos; not digits or text)", "switch")
    composed: float = option(0.0, "also distil the modules' composed answer: WEIGHT x the divergence of the softmax "
                                  "of their margins from the parent's", "nonnegative", metavar="WEIGHT")
    features: float = option(0.0, "also distil the parent's features: WEIGHT x the squared error of each block's "
                                  "output at the channels a module kept, over the parent's mean square there",
                             "nonnegative", metavar="WEIGHT")
    crop: bool = option(False, "distil on images shifted by up to an eighth of their size too (photos)", "switch")
    temperature: float = option(1.0, "the composed-answer term's softmax temperature", "positive", high=100,
                                metavar="T")

    def __post_init__(self):
        check(self)


def channeled_targets(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The parent's two logits for each class's module (M, B, 2): the mean of the other classes'
    logits and the class's own, as ``channel_head`` combines the parent's head."""
    k = logits.shape[1]
    total = logits.sum(1)
    return torch.stack([torch.stack([(total - logits[:, c]) / (k - 1), logits[:, c]], 1) for c in classes])


def trainable_weights(net: GraphNetwork, layers: set[str]) -> list[str]:
    """The names of the weights and biases of ``layers`` that train (floating tensors)."""
    names = []
    for node in net.graph.nodes:
        if node.name in layers and REGISTRY[node.op].params:
            for role, key in weight_keys(node, overlays=False).items():
                t = net.weight(key)
                if role in TRAINED_ROLES and t is not None and t.is_floating_point():
                    names.append(key)
    return names


@torch.no_grad()
def distill_(modules: list[Module], teacher: GraphNetwork, fetch: Callable[[torch.Tensor], torch.Tensor],
             index: torch.Tensor, options: DistillOptions = DistillOptions(), *, progress: bool = False,
             progress_file: str | Path | None = None, resume: bool = False, save_every: float = 30.0,
             device: str | torch.device = "cpu") -> dict:
    """Fine-tune ``modules`` (of one parent, in place: their networks get new tensors) to reproduce
    ``teacher``'s channeled logits on the images ``fetch(index[batch])`` (prepared, (B, C, H, W)).

    With ``progress_file`` the whole state (weights, Adam's moments, the step, the order of the
    images) is saved there at most every ``save_every`` seconds, and ``resume=True`` continues a
    saved state of the same run: the result is the uninterrupted run's, bit for bit (tested).

    The trained weights are kept only if they lower the loss on the first ``CHECK_IMAGES`` images
    (``kept``); else the modules stay as built. Returns what it cost: optimizer steps, images seen,
    multiply-accumulates (the teacher's forward pass over each image, and 3x, forward and backward,
    the trunk once and each branch, plus the check's forward passes), the loss over the first and
    the last tenth of the steps and on the check before and after, and the seconds taken. The same
    is recorded in each module's metadata under ``distillation``.
    """
    if not modules:
        raise CnnmodError("expected modules to distil, found none.")
    others = sorted({str(m.meta.get("strategy")) for m in modules} - {"channels"})
    if others:  # a paper module is the whole parent, exact on its images: nothing to distil
        raise CnnmodError(f"expected modules of the channels strategy to distil, found {others[0]} modules.")
    if len(index) == 0:
        raise CnnmodError("expected images to distil the modules on, found none.")
    if options.features and any(m.kept is None for m in modules):
        raise CnnmodError("expected modules built in this run for the feature term (they know which of the parent's "
                          "channels they kept), found modules read from files; distil without it.")
    if options.composed and len(modules) < 2:
        raise CnnmodError("expected two or more modules for the composed-answer term (it compares their answer "
                          f"with the parent's), found {len(modules)}.")
    start = time.perf_counter()
    device = torch.device(device)
    nets = [m.network for m in modules]
    trunk = shared_layers(nets) if len(nets) > 1 else set()
    group = Group(list(range(len(nets))), trunk, {n.name for n in nets[0].graph.nodes} - trunk)
    # One parameter per trunk tensor for all modules, one per branch tensor for each module, on the device.
    shared = {k: nets[0].weight(k).detach().to(device, copy=True).requires_grad_(True)
              for k in trainable_weights(nets[0], trunk)}
    own = [{k: net.weight(k).detach().to(device, copy=True).requires_grad_(True)
            for k in trainable_weights(net, group.branch)} for net in nets]
    params = list(shared.values()) + [p for mine in own for p in mine.values()]
    if not params:
        raise CnnmodError("expected modules with weights to train, found none.")
    # What each module runs on while it trains: its trained tensors, and the others on the device
    trained = [{**device_copies(net.weights(), device), **shared, **mine} for net, mine in zip(nets, own)]
    teacher_on = teacher if device.type == "cpu" else \
        GraphNetwork(teacher.graph, {k: t.to(device) for k, t in teacher.weights().items()})
    steps = max(1, math.ceil(options.epochs * math.ceil(len(index) / options.batch_size)))
    optimizer = torch.optim.Adam(params, lr=options.lr)
    gen = torch.Generator().manual_seed(options.seed)
    classes = [m.class_index for m in modules]
    images_on = (lambda batch: fetch(batch).to(device)) if device.type != "cpu" else fetch
    features = _Features(modules, teacher_on, images_on(index[: options.batch_size])) if options.features else None
    state = {"order": Order(), "images": 0, "losses": []}
    saver = None
    if progress_file is not None:
        key = hashlib.sha256(json.dumps([asdict(options), classes, sorted(trunk)]).encode()
                             + tensors_checksum({"index": index, **_named(shared, own, cpu=True)}).encode()).hexdigest()
        saver = _Saver(Path(progress_file), key, save_every, index)
        if resume:
            saver.load(state, shared, own, optimizer, gen)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        x = images_on(batch)
        if options.flip:  # the teacher sees the mirrored image too: its logits stay the target
            mirror = (torch.rand(len(x), generator=gen) < 0.5).to(device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        if options.crop:
            x = augment_batch(x, gen, "crop", pad=max(1, x.shape[-1] // 8))
        seen: dict = {}
        with torch.no_grad():
            z = teacher_on(x, after=features and features.grab(seen))
        mine: dict = {}
        outputs = _outputs(nets, group, x, trained, features and features.grab_own(mine))
        loss = _summed_loss(outputs, channeled_targets(z, classes), options.composed, options.temperature)
        if features is not None:
            loss = loss + options.features * features.loss(mine, seen, group)
        return loss / len(x)

    def after(order: Order, batch: torch.Tensor, loss: torch.Tensor) -> None:
        state["losses"].append(float(loss) / len(modules))
        state["images"] += len(batch)
        if saver is not None:
            saver.maybe_save(dict(state, order=order), shared, own, optimizer, gen)

    # A linear warm-up over the first 5% of the steps: Adam's first steps move every weight by the full
    # learning rate whatever its gradient, which undid much of the closed-form fit (measured on the
    # CIFAR-10 ResNet-20 without it: the first tenth of the steps averaged a loss of 20.6 at lr 1e-3,
    # 5.5 at 3e-4; with it, 4 epochs at 1e-3 beat 3e-4, 78.9% against 76.7% composed top-1).
    run_steps(optimizer, loss_of, index=index, batch_size=options.batch_size, steps=steps,
              rate=warmup_cosine(options.lr, steps, max(1, steps // 20)), gen=gen, order=state["order"],
              after=after, desc="distillation", progress=progress)
    losses, images = state["losses"], state["images"]
    if saver is not None:
        saver.path.unlink(missing_ok=True)  # a finished run leaves nothing to resume
    # The check: the loss on (up to) the first CHECK_IMAGES images, before and after. Weights that did
    # not lower it are not kept (few steps at a learning rate too high for a module already close).
    check = index[:CHECK_IMAGES]
    on_device = [device_copies(net.weights(), device) for net in nets]
    before = _loss(nets, group, teacher_on, images_on, check, classes, options, on_device)
    after_loss = _loss(nets, group, teacher_on, images_on, check, classes, options, trained)
    if after_loss < before:
        for net, mine in zip(nets, own):
            for k, p in {**shared, **mine}.items():  # the trunk's tensors: one CPU copy for every module
                net.set_weight(k, p.detach().cpu())
        if shared:  # the same object in every module, as a shared trunk is
            cpu = {k: nets[0].weight(k) for k in shared}
            for net in nets[1:]:
                for k, t in cpu.items():
                    net.set_weight(k, t)
    shape = tuple(fetch(index[:1]).shape[1:])
    student = sum(cost(net, shape, group.branch)["macs"] for net in nets) + (cost(nets[0], shape, trunk)["macs"]
                                                                             if trunk else 0)
    tenth = max(1, steps // 10)
    teacher_macs = cost(teacher, shape)["macs"]
    report = {"steps": steps, "images": images, "parent_macs_per_image": teacher_macs,
              "teacher_macs": teacher_macs * (images + len(check) + (features.images if features else 0)),
              "student_macs": student * (3 * images + 2 * len(check)), "loss_first": sum(losses[:tenth]) / tenth,
              "loss_last": sum(losses[-tenth:]) / tenth, "loss_before": before, "loss_after": after_loss,
              "kept": after_loss < before, "trunk_layers": len(trunk), "options": asdict(options),
              # the training loss over each tenth of the steps: what the curve says (flat, still falling)
              "loss_curve": [float(f"{float(part.mean()):.4g}") for part in
                             torch.tensor(losses, dtype=torch.float64).tensor_split(min(10, len(losses)))]}
    report["macs"] = report["teacher_macs"] + report["student_macs"]
    for m in modules:
        m.meta["distillation"] = dict(report)
    report["seconds"] = time.perf_counter() - start  # not in the files: timings would break identical output
    return report


def training_macs(checkpoint_meta: dict, macs_per_image: int) -> int | None:
    """What training the parent cost, in multiply-accumulates: forward and backward (3x a forward
    pass) over its training images for its epochs, from the recipe its checkpoint records (None
    where it records none: a model imported from elsewhere)."""
    recipe, images = checkpoint_meta.get("train_config"), checkpoint_meta.get("n_train")
    if not (isinstance(recipe, dict) and isinstance(recipe.get("epochs"), int) and isinstance(images, int)):
        return None
    return 3 * macs_per_image * images * recipe["epochs"]


def _loss(nets, group: Group, teacher: GraphNetwork, fetch, check: torch.Tensor, classes: list[int],
          options: DistillOptions, tensors: list[dict]) -> float:
    """The distillation loss over ``check`` (the logits' terms: the features are a means, the logits the
    end), averaged over the modules as the steps' losses are, with ``tensors`` bound (each network's)."""
    total = 0.0
    for batch in check.split(options.batch_size):
        x = fetch(batch)
        targets = channeled_targets(teacher(x), classes)
        outputs = _outputs(nets, group, x, tensors or [{}] * len(nets))
        total += float(_summed_loss(outputs, targets, options.composed, options.temperature))
    return total / len(check) / len(nets)


def _summed_loss(outputs: list[torch.Tensor], targets: torch.Tensor, composed: float,
                 temperature: float = 1.0) -> torch.Tensor:
    """The loss of a batch, summed over its images: each module's squared error to its two target
    logits (halved), plus ``composed`` x the divergence of the modules' answer from the parent's:
    KL(softmax of the parent's channeled margins || softmax of the modules' margins), both divided
    by ``temperature`` (and the divergence multiplied by its square, as Hinton et al. keep the
    gradient's scale), over the modules distilled together (a composition's vote is the argmax of
    those margins)."""
    loss = sum(torch.nn.functional.mse_loss(o, t, reduction="sum") for o, t in zip(outputs, targets)) / 2
    if composed and len(outputs) > 1:
        mine = torch.stack([o[:, 1] - o[:, 0] for o in outputs], 1) / temperature
        theirs = (targets[:, :, 1].T - targets[:, :, 0].T) / temperature
        loss = loss + composed * temperature ** 2 * torch.nn.functional.kl_div(
            mine.log_softmax(1), theirs.log_softmax(1), reduction="sum", log_target=True)
    return loss


def _outputs(nets: list[GraphNetwork], group: Group, x: torch.Tensor, tensors: list[dict],
             after=None) -> list[torch.Tensor]:
    """Each module's output on ``x``, the trunk run once (as a composition runs it), each network
    on its ``tensors`` (autograd kept) instead of its own; ``after`` as ``run_group`` takes it."""
    with ExitStack() as stack:
        for net, mine in zip(nets, tensors):
            stack.enter_context(net.bound(mine))
        return run_group(group, nets, x, after)


def feature_points(teacher: GraphNetwork, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The layers whose features a module is taught: each block's output (an addition, the end of a
    residual block; a max pooling, the end of a VGG stage) and the last feature map (the features
    before pooling), all of them (C, H, W) values."""
    maps = [n for n in teacher.graph.nodes if len(shapes[n.name]) == 3 and n.op != "input"]
    points = [n.name for n in maps if n.op in ("add", "maxpool")]
    return points + [maps[-1].name] if maps and maps[-1].name not in points else points


class _Features:
    """The feature term: at each of ``feature_points``, the module's features against the parent's at
    the channels the module kept, each point's squared error divided by the mean square of the
    parent's features there (on one fixed batch), averaged over the points."""

    def __init__(self, modules: list[Module], teacher: GraphNetwork, first: torch.Tensor):
        self.points = feature_points(teacher, teacher.shapes(tuple(first.shape[1:])))
        self.index = []  # per module: the parent's channels at each point (None: all of them)
        for m in modules:
            of, keep = m.kept
            self.index.append({p: _kept_index(keep.get(of[p])) for p in self.points})
        seen: dict = {}
        teacher(first, after=self.grab(seen))
        self.norms = {p: float(v.pow(2).mean().clamp_min(1e-12)) for p, v in seen.items()}
        self.images = len(first)

    def grab(self, seen: dict):
        """A ``run_all`` callback keeping the parent's values at the points."""
        names = set(self.points)
        return lambda name, out: seen.__setitem__(name, out) if name in names else None

    def grab_own(self, mine: dict):
        """A ``run_group`` callback keeping the modules' values at the points (member None: the trunk's)."""
        names = set(self.points)
        return lambda member, name, out: mine.__setitem__((member, name), out) if name in names else None

    def loss(self, mine: dict, seen: dict, group: Group) -> torch.Tensor:
        """Summed over the images and the modules (a trunk's point counts for each module it serves)."""
        total = 0.0
        for (member, name), s in mine.items():
            k = self.index[0 if member is None else member][name]
            t = seen[name] if k is None else seen[name][:, k]
            weight = len(group.members) if member is None else 1
            total = total + weight * (s - t).pow(2).flatten(1).mean(1).sum() / self.norms[name]
        return total / len(self.points)


def _kept_index(keep: torch.Tensor | None) -> torch.Tensor | None:
    return None if keep is None or bool(keep.all()) else keep.nonzero().flatten()


def _named(shared: dict, own: list[dict], cpu: bool = False) -> dict[str, torch.Tensor]:
    """The trained tensors by one name each: the trunk's once, each module's under its position
    (``cpu``: copies on the CPU, to be written or checksummed)."""
    named = {**{f"trunk/{k}": t for k, t in shared.items()},
             **{f"{i}/{k}": t for i, mine in enumerate(own) for k, t in mine.items()}}
    return {k: t.detach().cpu() for k, t in named.items()} if cpu else named


class _Saver:
    """The distillation's state in one cnnmod file (weights, Adam's moments, step, image order)."""

    FORMAT = "cnnmod.distill_progress"

    def __init__(self, path: Path, key: str, every: float, index: torch.Tensor):
        self.path, self.key, self.every, self.last = path, key, every, time.monotonic()
        self.index = index  # the images the saved order may name

    def maybe_save(self, state: dict, shared: dict, own: list[dict], optimizer, gen: torch.Generator) -> None:
        if time.monotonic() - self.last < self.every:
            return
        tensors = {f"w/{k}": t for k, t in _named(shared, own, cpu=True).items()}
        for j, moments in optimizer.state_dict()["state"].items():
            tensors.update({f"adam/{j}/{name}": t.cpu() for name, t in moments.items()})
        tensors.update({"order": state["order"].rest, "generator": gen.get_state()})
        write_file(self.path, tensors, {"format": self.FORMAT, "format_version": 1, "key": self.key,
                                        "step": state["order"].step, "images": state["images"],
                                        "losses": state["losses"]})
        self.last = time.monotonic()

    @torch.no_grad()
    def load(self, state: dict, shared: dict, own: list[dict], optimizer, gen: torch.Generator) -> None:
        """Put a saved state of this run back; anything that does not fit is refused before a tensor is
        touched."""
        if not self.path.exists():
            return
        tensors, meta = read_progress(self.path, self.FORMAT, 1, self.key, "a saved distillation",
                                      "modules, images or options")
        named = _named(shared, own)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        expected = {f"w/{k}": p for k, p in named.items()}
        step = meta.get("step")
        if isinstance(step, int) and step > 0:  # Adam's moments exist once it has stepped
            for j, p in enumerate(params):
                expected.update({f"adam/{j}/exp_avg": p, f"adam/{j}/exp_avg_sq": p,
                                 f"adam/{j}/step": torch.zeros((), dtype=torch.float32)})
        fits = set(tensors) == set(expected) | {"order", "generator"} and all(
            tensors[k].shape == t.shape and tensors[k].dtype == t.dtype for k, t in expected.items())
        fits = fits and tensors["order"].dtype == torch.int64 and tensors["order"].dim() == 1 \
            and bool(torch.isin(tensors["order"], self.index).all()) \
            and tensors["generator"].shape == gen.get_state().shape and isinstance(meta.get("images"), int) \
            and isinstance(meta.get("losses"), list) and len(meta["losses"]) == step
        if not fits:
            raise CnnmodError(f"{self.path}: expected the saved state of this distillation, found tensors or "
                              "fields that do not fit it (damaged file); delete it or rerun without --resume.")
        for k, p in named.items():
            p.copy_(tensors[f"w/{k}"])
        saved = optimizer.state_dict()
        saved["state"] = {}
        for key, t in tensors.items():
            if key.startswith("adam/"):
                _, j, name = key.split("/")
                saved["state"].setdefault(int(j), {})[name] = t
        optimizer.load_state_dict(saved)
        gen.set_state(tensors["generator"])
        state.update(order=Order(step, tensors["order"]), images=meta["images"],
                     losses=[float(v) for v in meta["losses"]])
