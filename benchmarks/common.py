"""Shared helpers of the benchmarks: timing in the same run, and writing BENCHMARKS.md sections."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train-jpeg.tar.gz"
# CNNMOD_BENCH_CHECKPOINTS: another folder of checkpoints (a dry run on an unfinished model)
CHECKPOINTS = Path(os.environ.get("CNNMOD_BENCH_CHECKPOINTS", ROOT / "benchmarks" / "checkpoints"))
RESULTS = ROOT / "benchmarks" / "results"


def seconds(fn, repeat: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(name: str, markdown: str, results: dict) -> None:
    """Replace the ``name`` section of BENCHMARKS.md and write results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def machine() -> str:
    import os
    import platform

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads{gpu}"


def train_briefly(model, data, spec, *, epochs: int, batch: int, lr: float, log=None) -> float:
    """Train ``model`` from its random weights for a CPU budget (seeded order and augmentation, SGD
    with Nesterov momentum, one-cycle schedule to ``lr``, crop and flip); returns the seconds taken."""
    import math

    import torch.nn.functional as F

    from cnnmod.training import augment_batch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    steps = epochs * math.ceil(len(data) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(batch):
            x = spec.prepare(augment_batch(data.images[idx], gen, "crop-flip"))
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s")
    model.eval()
    return time.perf_counter() - start
