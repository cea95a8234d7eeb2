"""Composed latency of the fastest channels configurations, timed longer than bench_channels does.

    .venv/bin/python benchmarks/bench_latency.py [--repeat 25]

bench_channels times each of its many configurations 7 times; on a shared 2-core machine one
such median moves by 10% between runs. Here the few configurations that decide issue #5's
latency target are decomposed once and timed ``--repeat`` times each, the model and the
composed modules alternately on the same batch of 256 CIFAR-10 validation images; we report the
median ratio and the quartiles of the per-round ratios. Writes the "latency" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CHECKPOINTS, CIFAR_TAR, machine, seconds, write_section  # noqa: E402

from cnnmod import compose, decompose, load_data, load_model  # noqa: E402
from bench_channels import CONFIGS  # noqa: E402

CHOSEN = ["keep 1.0", "inner, energy, trunk 1.0, retain 0.95", "inner, energy, trunk 1.0, retain 0.95, multiple 8",
          "inner, energy, trunk 1.0, retain 0.9, multiple 8", "inner, energy, trunk 1.0, retain 0.85, multiple 8"]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(CHECKPOINTS / "cifar10_resnet20.safetensors")
    train_set, val = load_data(str(CIFAR_TAR), "train"), load_data(str(CIFAR_TAR), "val")
    batch = val.images[:256]
    rows = []
    for label in CHOSEN:
        clf = compose(decompose(model, train_set, strategy="channels", calibration=0, **CONFIGS[label]), rule="vote")
        ratios = []
        with torch.no_grad():
            clf.score_images(batch)  # warm-up
            for _ in range(args.repeat):
                t_model = seconds(lambda: model(model.input_spec.prepare(batch)))
                ratios.append(seconds(lambda: clf.score_images(batch)) / t_model)
        ratios.sort()
        n = len(ratios)
        rows.append({"config": label, "median": ratios[n // 2], "q1": ratios[n // 4], "q3": ratios[(3 * n) // 4]})
        print(rows[-1], flush=True)
    result = {"repeat": args.repeat, "rows": rows}
    write_section("latency", render(result), result)


def render(result: dict) -> str:
    lines = ["### Composed latency, timed longer (CIFAR-10 ResNet-20)", "",
             f"Command: `.venv/bin/python benchmarks/bench_latency.py --repeat {result['repeat']}` "
             f"(machine: {machine()}). All 10 modules composed against the model (run as given: its BatchNorms "
             f"not folded), alternately on the same batch of 256 validation images, {result['repeat']} rounds each; "
             "the ratio per round, median and quartiles.", "",
             "| configuration | 10 composed: latency / model, median | quartiles |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['median']:.2f}x | {r['q1']:.2f}x - {r['q3']:.2f}x |" for r in result["rows"]]
    lines += ["", "`keep 1.0` removes no channel: every module is the model with a 2-logit head, so the composition "
              "is one shared trunk (the whole model, BatchNorms folded) and ten heads. It is the baseline that "
              "pruning must beat. Channel counts between two multiples of 8 save no time (the convolution table "
              "above), and each layer that reads removed channels adds their constant contribution in one more "
              "pass, so a pruned composition gets faster than it only where whole blocks of 8 channels go."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
