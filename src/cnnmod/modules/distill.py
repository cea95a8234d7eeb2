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

Only the layers' weights and biases train (convolutions, linear layers, BatchNorm's affine pair);
BatchNorm's running statistics, masks, fills and added constants stay as the strategy chose them.
Deterministic: the seed fixes the order of the images (and which are mirrored, with ``flip``);
Adam, warm-up then a cosine schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

# The shared trunk is found and run by the code that composes modules: distillation trains through
# exactly what a composition will run (a later stage's code, imported on purpose).
from ..compose.trunk import Group, run_group, shared_layers
from ..errors import CnnmodError
from ..files import tensors_checksum, write_file
from ..statistics.progress import read_progress
from ..trace.network import GraphNetwork
from ..trace.ops import REGISTRY, weight_keys
from .extract import cost
from .module import Module

TRAINED_ROLES = ("weight", "bias")
CHECK_IMAGES = 2048  # the images the loss is checked on, before and after


@dataclass(frozen=True)
class DistillOptions:
    """``epochs``: passes over the decomposition images (the budget; 0.5 is half of them once).
    ``flip``: mirror a seeded half of each batch left to right (for photos; not for digits or text).
    ``composed``: weight of a term for the modules' composed answer (``_summed_loss``)."""

    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    flip: bool = False
    composed: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.epochs, (int, float)) and 0 < self.epochs <= 1000 and math.isfinite(self.epochs)):
            raise CnnmodError(f"expected distillation epochs between 0 and 1000 (0 excluded), found {self.epochs!r}.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise CnnmodError(f"expected a distillation batch size >= 1, found {self.batch_size!r}.")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise CnnmodError(f"expected a whole number as the distillation seed, found {self.seed!r}.")
        if not isinstance(self.flip, bool):
            raise CnnmodError(f"expected flip to be true or false, found {self.flip!r}.")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise CnnmodError(f"expected a distillation learning rate in (0, 1), found {self.lr!r}.")
        if not (isinstance(self.composed, (int, float)) and 0 <= self.composed and math.isfinite(self.composed)):
            raise CnnmodError(f"expected a composed-answer weight >= 0, found {self.composed!r}.")


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
             progress_file: str | Path | None = None, resume: bool = False, save_every: float = 30.0) -> dict:
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
    if options.composed and len(modules) < 2:
        raise CnnmodError("expected two or more modules for the composed-answer term (it compares their answer "
                          f"with the parent's), found {len(modules)}.")
    start = time.perf_counter()
    nets = [m.network for m in modules]
    trunk = shared_layers(nets) if len(nets) > 1 else set()
    group = Group(list(range(len(nets))), trunk, {n.name for n in nets[0].graph.nodes} - trunk)
    # One parameter per trunk tensor for all modules, one per branch tensor for each module.
    shared = {k: nets[0].weight(k).detach().clone().requires_grad_(True) for k in trainable_weights(nets[0], trunk)}
    own = [{k: net.weight(k).detach().clone().requires_grad_(True) for k in trainable_weights(net, group.branch)}
           for net in nets]
    params = list(shared.values()) + [p for mine in own for p in mine.values()]
    trained = [{**shared, **mine} for mine in own]  # what each module runs on while it trains
    if not params:
        raise CnnmodError("expected modules with weights to train, found none.")
    steps_per_epoch = math.ceil(len(index) / options.batch_size)
    steps = max(1, math.ceil(options.epochs * steps_per_epoch))
    optimizer = torch.optim.Adam(params, lr=options.lr)
    # A linear warm-up over the first 5% of the steps: Adam's first steps move every weight by the full
    # learning rate whatever its gradient, which undid much of the closed-form fit (measured on the
    # CIFAR-10 ResNet-20 without it: the first tenth of the steps averaged a loss of 20.6 at lr 1e-3,
    # 5.5 at 3e-4; with it, 4 epochs at 1e-3 beat 3e-4, 78.9% against 76.7% composed top-1).
    warm = max(1, steps // 20)
    gen = torch.Generator().manual_seed(options.seed)
    classes = [m.class_index for m in modules]
    state = {"step": 0, "images": 0, "losses": [], "order": torch.empty(0, dtype=torch.long)}
    saver = None
    if progress_file is not None:
        key = hashlib.sha256(json.dumps([asdict(options), classes, sorted(trunk)]).encode()
                             + tensors_checksum({"index": index, **_named(shared, own)}).encode()).hexdigest()
        saver = _Saver(Path(progress_file), key, save_every, index)
        if resume:
            saver.load(state, shared, own, optimizer, gen)
    bar = tqdm(total=steps, initial=state["step"], disable=not (progress and sys.stderr.isatty()), unit="step",
               desc="distillation")
    losses, images, order = state["losses"], state["images"], state["order"]
    try:
        for step in range(state["step"], steps):
            for g in optimizer.param_groups:
                g["lr"] = options.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
            if len(order) == 0:  # a new epoch: the images in a new seeded order
                order = index[torch.randperm(len(index), generator=gen)]
            batch, order = order[: options.batch_size], order[options.batch_size:]
            x = fetch(batch)
            if options.flip:  # the teacher sees the mirrored image too: its logits stay the target
                mirror = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            targets = channeled_targets(teacher(x), classes)
            with torch.enable_grad():
                outputs = _outputs(nets, group, x, trained)
                loss = _summed_loss(outputs, targets, options.composed) / len(x)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            losses.append(float(loss) / len(modules))
            images += len(batch)
            bar.update(1)
            if saver is not None:
                saver.maybe_save(dict(step=step + 1, images=images, losses=losses, order=order),
                                 shared, own, optimizer, gen)
    finally:
        bar.close()
    if saver is not None:
        saver.path.unlink(missing_ok=True)  # a finished run leaves nothing to resume
    # The check: the loss on (up to) the first CHECK_IMAGES images, before and after. Weights that did
    # not lower it are not kept (few steps at a learning rate too high for a module already close).
    check = index[:CHECK_IMAGES]
    before = _loss(nets, group, teacher, fetch, check, classes, options.batch_size, None, options.composed)
    after = _loss(nets, group, teacher, fetch, check, classes, options.batch_size, trained, options.composed)
    if after < before:
        for net, mine in zip(nets, trained):  # the trunk's trained tensors are the same objects in every module
            for k, p in mine.items():
                net.set_weight(k, p.detach())
    shape = tuple(fetch(index[:1]).shape[1:])
    student = sum(cost(net, shape, group.branch)["macs"] for net in nets) + (cost(nets[0], shape, trunk)["macs"]
                                                                             if trunk else 0)
    tenth = max(1, steps // 10)
    teacher_macs = cost(teacher, shape)["macs"]
    report = {"steps": steps, "images": images, "parent_macs_per_image": teacher_macs,
              "teacher_macs": teacher_macs * (images + len(check)),
              "student_macs": student * (3 * images + 2 * len(check)), "loss_first": sum(losses[:tenth]) / tenth,
              "loss_last": sum(losses[-tenth:]) / tenth, "loss_before": before, "loss_after": after,
              "kept": after < before, "trunk_layers": len(trunk), "options": asdict(options)}
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
          batch_size: int, tensors: list[dict] | None, composed: float) -> float:
    """The distillation loss over ``check``, averaged over the modules as the steps' losses are, with
    ``tensors`` bound (None: the networks' own)."""
    total = 0.0
    for batch in check.split(batch_size):
        x = fetch(batch)
        targets = channeled_targets(teacher(x), classes)
        outputs = _outputs(nets, group, x, tensors or [{}] * len(nets))
        total += float(_summed_loss(outputs, targets, composed))
    return total / len(check) / len(nets)


def _summed_loss(outputs: list[torch.Tensor], targets: torch.Tensor, composed: float) -> torch.Tensor:
    """The loss of a batch, summed over its images: each module's squared error to its two target
    logits (halved), plus ``composed`` x the divergence of the modules' answer from the parent's:
    KL(softmax of the parent's channeled margins || softmax of the modules' margins), over the
    modules distilled together (a composition's vote is the argmax of those margins)."""
    loss = sum(torch.nn.functional.mse_loss(o, t, reduction="sum") for o, t in zip(outputs, targets)) / 2
    if composed and len(outputs) > 1:
        mine = torch.stack([o[:, 1] - o[:, 0] for o in outputs], 1)
        theirs = targets[:, :, 1].T - targets[:, :, 0].T
        loss = loss + composed * torch.nn.functional.kl_div(mine.log_softmax(1), theirs.log_softmax(1),
                                                            reduction="sum", log_target=True)
    return loss


def _outputs(nets: list[GraphNetwork], group: Group, x: torch.Tensor, tensors: list[dict]) -> list[torch.Tensor]:
    """Each module's output on ``x``, the trunk run once (as a composition runs it), each network
    on its ``tensors`` (autograd kept) instead of its own."""
    with ExitStack() as stack:
        for net, mine in zip(nets, tensors):
            stack.enter_context(net.bound(mine))
        return run_group(group, nets, x)


def _named(shared: dict, own: list[dict]) -> dict[str, torch.Tensor]:
    """The trained tensors by one name each: the trunk's once, each module's under its position."""
    return {**{f"trunk/{k}": t for k, t in shared.items()},
            **{f"{i}/{k}": t for i, mine in enumerate(own) for k, t in mine.items()}}


class _Saver:
    """The distillation's state in one cnnmod file (weights, Adam's moments, step, image order)."""

    FORMAT = "cnnmod.distill_progress"

    def __init__(self, path: Path, key: str, every: float, index: torch.Tensor):
        self.path, self.key, self.every, self.last = path, key, every, time.monotonic()
        self.index = index  # the images the saved order may name

    def maybe_save(self, state: dict, shared: dict, own: list[dict], optimizer, gen: torch.Generator) -> None:
        if time.monotonic() - self.last < self.every:
            return
        tensors = {f"w/{k}": t.detach() for k, t in _named(shared, own).items()}
        for j, moments in optimizer.state_dict()["state"].items():
            tensors.update({f"adam/{j}/{name}": t for name, t in moments.items()})
        tensors.update({"order": state["order"], "generator": gen.get_state()})
        write_file(self.path, tensors, {"format": self.FORMAT, "format_version": 1, "key": self.key,
                                        "step": state["step"], "images": state["images"],
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
        state.update(step=step, images=meta["images"], losses=[float(v) for v in meta["losses"]],
                     order=tensors["order"])
