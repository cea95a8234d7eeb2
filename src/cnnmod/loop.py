"""The one training loop: ``train``, the distillation and the repair's training all step through it.

Each step sets the learning rate (``rate(step)``), takes the next batch of a seeded order of the
images (a new permutation of ``index`` whenever the last one is used up), asks the caller for the
batch's loss, and steps the optimizer. What differs between the three (the model, the loss, what
is saved to resume) stays with the caller; what is the same (the order, the schedule, the progress
shown, where the state to resume from lives) is here, once.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm


def device_copies(weights: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors a network binds to run on ``device`` (bound, not moved: its own tensors, which it may
    share with a parent and sibling modules, stay where they are): copies off the CPU, none on it,
    where its own tensors are where it runs (a copy of every tensor at every step cost the CPU runs)."""
    return {} if device.type == "cpu" else {k: t.to(device) for k, t in weights.items()}


def warmup_cosine(lr: float, steps: int, warmup: int) -> Callable[[int], float]:
    """A linear warm-up over ``warmup`` steps, then a cosine decay from ``lr`` towards 0 at ``steps``."""
    return lambda step: lr * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))


@dataclass
class Order:
    """Where a loop is in its images: the step reached and the rest of the current pass's order."""

    step: int = 0
    rest: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def run_steps(optimizer: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor], *,
              index: torch.Tensor, batch_size: int, steps: int, rate: Callable[[int], float],
              gen: torch.Generator, order: Order | None = None, min_batch: int = 1,
              after: Callable[[Order, torch.Tensor, torch.Tensor], None] | None = None,
              desc: str = "training", progress: bool = False) -> Order:
    """Step ``optimizer`` until step ``steps`` on the loss ``loss_of(batch)`` (batch: entries of ``index``).

    ``order`` continues a run (a resumed one, or the next epoch of ``train``); the rest of a pass
    shorter than ``min_batch`` is dropped (BatchNorm in training mode needs two images). ``after(order,
    batch, loss)`` runs after each step (to tally the loss, to save the state). Returns where it stopped.
    """
    order = order or Order()
    shown = Progress(steps, desc, progress, done=order.step)
    try:
        while order.step < steps:
            for group in optimizer.param_groups:
                group["lr"] = rate(order.step)
            if len(order.rest) == 0:  # a new pass: the images in a new seeded order
                order.rest = index[torch.randperm(len(index), generator=gen)]
            batch, order.rest = order.rest[:batch_size], order.rest[batch_size:]
            if len(order.rest) < min_batch:
                order.rest = order.rest[:0]
            with torch.enable_grad():
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            order.step += 1
            if after is not None:
                after(order, batch, loss.detach())
            shown.update()
    finally:
        shown.close()
    return order


class Progress:
    """A progress bar on a terminal; elsewhere (output redirected to a file) a plain line at least once
    a minute with the share done and an estimate of the time left."""

    EVERY = 60.0  # seconds between plain lines

    def __init__(self, total: int, desc: str, enabled: bool, done: int = 0, unit: str = "step"):
        self.total, self.desc, self.done, self.first = total, desc, done, done
        self.enabled, self.start = enabled, time.monotonic()
        self.last = self.start
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, unit_scale=unit != "step", leave=False) \
            if enabled and sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.EVERY:
            self.last = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        """``desc: 40% (400/1000), about 3 min left``."""
        spent, new = time.monotonic() - self.start, self.done - self.first
        left = spent / new * (self.total - self.done) if new else float("nan")
        eta = "" if not math.isfinite(left) else f", about {_duration(left)} left"
        return f"{self.desc}: {100 * self.done / max(1, self.total):.0f}% ({self.done}/{self.total}){eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
