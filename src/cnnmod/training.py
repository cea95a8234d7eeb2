"""Train a registered model on a ``Dataset`` (SGD, cosine schedule, crop/flip augmentation).

Deterministic: the seed fixes the initial weights, the batch order and the augmentation.
After each epoch the full state (weights, momentum, random generator) is saved next to the
output file so that ``resume=True`` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .data.inputspec import InputSpec, measure_spec
from .data.sources import Dataset
from .errors import CnnmodError
from .options import check, option
from .evaluate import evaluate_model
from .files import check_replaceable, read_file, write_file
from .loop import Order, run_steps
from .models import create_model


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(10, "passes over the training images", "count")
    batch_size: int = option(128, "images per step", "count")
    lr: float = option(0.1, "peak learning rate (SGD, cosine schedule)", "positive")
    momentum: float = option(0.9, None, "fraction")
    weight_decay: float = option(5e-4, None, "nonnegative")
    seed: int = option(0, "fixes weights, batch order and augmentation", "integer")
    augment: str = option("auto", "auto: crop-flip for colour images, none for grey", "choice",
                          choices=("auto", "crop-flip", "crop", "none"))
    warmup: int = option(0, "epochs of linear learning-rate warm-up before the cosine schedule", "count0")

    def __post_init__(self):
        check(self)


def augment_batch(x: torch.Tensor, gen: torch.Generator, mode: str, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and/or horizontal flip of a uint8 batch (B, C, H, W).

    The random draws come from ``gen`` on the CPU whatever device ``x`` is on, so a run on a GPU
    sees the same crops and flips as the same run on the CPU.
    """
    if mode == "none":
        return x
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    x = padded[torch.arange(b, device=dev)[:, None, None, None],
               torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if mode == "crop-flip":
        flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train(architecture: str, data: Dataset, out: str | os.PathLike, config: TrainConfig = TrainConfig(), *,
          val: Dataset | None = None, arch_args: dict | None = None, resume: bool = False,
          progress: bool = True, device: str = "cpu") -> dict:
    """Train ``architecture`` on ``data`` and write the checkpoint ``out``; return its metadata."""
    out = Path(out)
    check_replaceable(out, "cnnmod.checkpoint")  # before the training, not after it
    check_replaceable(out.with_name(out.name + ".resume.safetensors"), "cnnmod.train_state")
    spec = measure_spec(data.images)
    arch_args = dict(arch_args or {}, num_classes=len(data.classes), in_channels=spec.channels)
    if architecture == "smallcnn":
        arch_args.setdefault("image_size", spec.size[0])
    mode = config.augment if config.augment != "auto" else ("crop-flip" if spec.channels == 3 else "none")
    if mode not in ("crop-flip", "crop", "none"):
        raise CnnmodError(f"expected augment crop-flip, crop, none or auto, found {config.augment!r}.")

    from .distributed import resolve_device

    device = resolve_device(device)
    torch.manual_seed(config.seed)
    model = create_model(architecture, **arch_args).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    gen = torch.Generator().manual_seed(config.seed)
    state_path = out.with_name(out.name + ".resume.safetensors")
    start = _load_state(state_path, model, opt, gen, config) if resume else 0

    # The images stay uint8 and move to the device once; batches are cut and augmented there.
    images, labels = data.images.to(device), data.labels.to(device)
    for epoch in range(start, config.epochs):
        lr = learning_rate(config, epoch)
        loss = _train_epoch(model, opt, images, labels, spec, gen, mode, config.batch_size, epoch, lr,
                            desc=f"epoch {epoch + 1}/{config.epochs}" if progress else None)
        if not math.isfinite(loss):
            raise CnnmodError(f"expected a finite training loss, found {loss} in epoch {epoch + 1}: "
                              f"training diverged; try a smaller --lr or a --warmup.")
        msg = f"epoch {epoch + 1}/{config.epochs} lr {lr:.4f} loss {loss:.4f}"
        if val is not None:
            msg += f" val top1 {evaluate_model(model, val, spec, data.classes, device=device)['top1']:.4f}"
        if progress:
            tqdm.write(msg)
        _save_state(state_path, model, opt, gen, config, epoch + 1)

    final = evaluate_model(model, val if val is not None else data, spec, data.classes, device=device)
    model.cpu()
    meta = dict(seed=config.seed, train_config=asdict(config), data_fingerprint=data.fingerprint(),
                data_name=Path(data.name).name, n_train=len(data),
                accuracy={"split": "val" if val is not None else "train", "top1": final["top1"],
                          "top5": final["top5"], "n": final["n"]})
    save_checkpoint(model, out, architecture=architecture, arch_args=arch_args,
                    classes=data.classes, input_spec=spec, **meta)
    state_path.unlink(missing_ok=True)
    return meta


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Linear warm-up for ``config.warmup`` epochs, then a cosine decay to 0 over the rest."""
    if epoch < config.warmup:
        return config.lr * (epoch + 1) / (config.warmup + 1)
    t = (epoch - config.warmup) / max(1, config.epochs - config.warmup)
    return 0.5 * config.lr * (1 + math.cos(math.pi * t))


def _train_epoch(model: nn.Module, opt, images: torch.Tensor, labels: torch.Tensor, spec: InputSpec,
                 gen, mode: str, batch_size: int, epoch: int, lr: float, desc: str | None) -> float:
    """One pass over the images in a new seeded order, at learning rate ``lr``; the mean loss."""
    n = len(images)
    per_epoch = sum(1 for first in range(0, n, batch_size) if min(batch_size, n - first) >= 2)  # BatchNorm: 2+
    total = torch.zeros((), dtype=torch.float64, device=images.device)  # summed on the device: no sync per step
    seen = 0

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(images.device)
        return F.cross_entropy(model(spec.prepare(augment_batch(images[idx], gen, mode))), labels[idx])

    def after(order: Order, batch: torch.Tensor, loss: torch.Tensor) -> None:
        nonlocal total, seen
        total += loss * len(batch)
        seen += len(batch)

    model.train()
    run_steps(opt, loss_of, index=torch.arange(n), batch_size=batch_size, steps=(epoch + 1) * per_epoch,
              rate=lambda step: lr, gen=gen, order=Order(epoch * per_epoch), min_batch=2, after=after,
              desc=desc or "", progress=desc is not None)
    model.eval()
    return float(total) / max(1, seen)


def _save_state(path: Path, model, opt, gen, config: TrainConfig, epoch: int) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf
    tensors["generator"] = gen.get_state()
    write_file(path, tensors, {"format": "cnnmod.train_state", "format_version": 1,
                               "epoch": epoch, "train_config": asdict(config)})


def _load_state(path: Path, model, opt, gen, config: TrainConfig) -> int:
    if not path.exists():
        return 0
    tensors, meta = read_file(path, expect="cnnmod.train_state")
    if meta["train_config"] != asdict(config):
        raise CnnmodError(f"{path}: expected the same training options to resume, found "
                          f"{meta['train_config']} (now {asdict(config)}).")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"momentum.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].clone().to(p.device)
    gen.set_state(tensors["generator"])
    return int(meta["epoch"])
