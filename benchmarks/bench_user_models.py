"""Benchmark of issue #23: models as people write them.

    .venv/bin/python benchmarks/bench_user_models.py --train   # train the option-A ResNet-20 (background)
    .venv/bin/python benchmarks/bench_user_models.py           # capture coverage, then decompose it

1. Capture coverage and time of the test corpus (tests/corpus.py: user-style CIFAR code) and of the
   zoo test's torchvision/timm models, with the old capture (symbolic torch.fx, as cnnmod traced
   before issue #23) and the new one (torch.export on an example input, the registry's ops).
2. A CIFAR ResNet-20 with option-A shortcuts (strided slice + channel padding in a lambda layer,
   ``F.avg_pool2d(out, out.size()[3])``), written as training repositories write it, trained here
   for a CPU budget (the first 1,500 training images of each class, 8 epochs, SGD one-cycle, crop
   and flip, one thread) and cached in benchmarks/.cache/user/ (not committed); then decomposed
   with both strategies and evaluated on the validation split (the last 10% of each class).
Targets (issue #23): paper modules within 0.02 points of the model; channels modules with a
shared trunk within 1.5 points at <= 1.0x its MACs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import CIFAR_TAR, ROOT, machine, write_section  # noqa: E402
from corpus import CORPUS, cifar_resnet, randomised  # noqa: E402

from cnnmod import load_data  # noqa: E402
from cnnmod.data.inputspec import measure_spec  # noqa: E402
from cnnmod.training import augment_batch  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "user"
PER_CLASS, EPOCHS, BATCH, LR = 1500, 8, 128, 0.1
WEIGHTS = CACHE / "cifar_resnet20_optionA.safetensors"


def first_per_class(data, n: int):
    keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:n] for c in range(len(data.classes))])
    return data.subset(keep.sort().values)


def train(data, spec) -> dict:
    """Train from random weights (seeded) and cache the weights; returns the recipe and its time."""
    torch.manual_seed(0)
    model = cifar_resnet(20).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    steps = EPOCHS * math.ceil(len(data) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(data), generator=gen).split(BATCH):
            x = spec.prepare(augment_batch(data.images[idx], gen, "crop-flip"))
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
    return {"seconds": time.perf_counter() - start, "epochs": EPOCHS, "images": len(data), "threads": 1}


def trained():
    model = cifar_resnet(20)
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="only train (and cache) the option-A ResNet-20")
    args = parser.parse_args(argv)
    train_all = load_data(str(CIFAR_TAR), "train")
    train_set = first_per_class(train_all, PER_CLASS)
    spec = measure_spec(train_set.images)
    if args.train:
        torch.set_num_threads(1)  # leaves the other core to whoever works beside it
        recipe = train(train_set, spec)
        (CACHE / "recipe.json").write_text(json.dumps(recipe))
        print(f"trained: {recipe}", flush=True)
        return 0
    raise SystemExit("measurement stage: not written yet")


if __name__ == "__main__":
    sys.exit(main())
