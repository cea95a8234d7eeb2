"""The retrained baseline of the CIFAR-10 pair reuse (issue #4): a ResNet-20 per pair of classes.

    .venv/bin/python benchmarks/bench_retrain_pairs.py [--epochs 8]

For each of the 6 pairs of the 4 fixed classes, a ResNet-20 is trained from scratch on the
pair's training images (9,000) with the reference recipe but fewer epochs (a CPU budget: the
reference model had 48 on a GPU), and evaluated on the pair's validation images. Writes
results/cifar_retrained_pairs.json, which bench_reuse.py shows beside the composed modules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_TAR, RESULTS, machine  # noqa: E402

from bench_reuse import CIFAR_FOUR  # noqa: E402  (the pairs whose composed accuracy it is compared with)

from cnnmod import TrainConfig, load_data, train  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train_set, val_set = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    rows = []
    for a, b in itertools.combinations(CIFAR_FOUR, 2):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            meta = train("resnet20", train_set.only([a, b]), Path(d) / "m.safetensors", TrainConfig(epochs=args.epochs),
                         val=val_set.only([a, b]), progress=False)
        rows.append({"pair": [a, b], "retrained": meta["accuracy"]["top1"], "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cifar_retrained_pairs.json").write_text(json.dumps(
        {"epochs": args.epochs, "machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
