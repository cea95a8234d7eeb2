"""Seconds per training image of a model on a device, so a time-boxed GPU session can choose its epochs.

    python3 benchmarks/gpu_calibrate.py resnet20 [--no-bn] [--device cuda]

Trains on generated images (timing only): one warm-up run, then 1 and 3 epochs; the difference
of the two, over the images of two epochs, is the cost of one more image in a real run.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cnnmod import Dataset
from cnnmod.training import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--no-bn", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=128 * 40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    data = Dataset(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen),
                   torch.arange(args.images) % 10, [f"c{i}" for i in range(10)], "generated")
    arch_args = {"bn": False} if args.no_bn else None
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in (1, 1, 3):  # the first run only warms up (CUDA context, cuDNN plans)
            start = time.perf_counter()
            train(args.model, data, Path(tmp) / "m.safetensors", TrainConfig(epochs=epochs, lr=0.01, batch_size=args.batch_size),
                  arch_args=arch_args, progress=False, device=args.device)
            times[epochs] = time.perf_counter() - start
    print(json.dumps({"model": args.model, "bn": not args.no_bn, "device": args.device,
                      "seconds_per_image": (times[3] - times[1]) / (2 * args.images)}))


if __name__ == "__main__":
    main()
