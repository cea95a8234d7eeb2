"""Benchmark of issue #25 item 1: what a decomposition costs against one plain inference pass.

    .venv/bin/python benchmarks/bench_one_pass.py                  # every row (about 15 minutes)
    .venv/bin/python benchmarks/bench_one_pass.py --only smallcnn   # rows whose name contains this
    .venv/bin/python benchmarks/bench_one_pass.py --render          # rewrite BENCHMARKS.md from the rows

Each row, in one process: one plain inference pass of the model over the images the statistics
pass observes (a warm-up batch first), then ``decompose`` with its calibration (the default, 50
images per class, held out from the statistics where the data has them), timed in parts: the
capture (torch.export), the statistics pass, building the modules (for the channels strategy: its
channel scores, re-fits and the ``--max-loss`` search, reported apart) and the calibration, each
against the plain pass. A second decomposition of the same model in the same process shows the
capture warm (torch.export's first call in a process imports and initialises its machinery).
Rows: the demo's small CNN on mnist5k; the reference CIFAR-10 ResNet-20; the zoo's architectures
trained by bench_zoo.py (where cached); a ResNet-50 at 224 px (random weights, generated images:
cost only) with 50 images observed per class and 3 calibration images per class held out, about
the default's proportion (50 against 1,000). Channels rows only for the first two (bench_zoo.py
times the zoo's ``--max-loss`` decompositions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import CIFAR_TAR, ROOT, machine, write_section  # noqa: E402

from cnnmod import Dataset, decompose, load_data, load_model  # noqa: E402
from cnnmod.data.inputspec import InputSpec  # noqa: E402
from cnnmod.statistics import plain_pass, select_sample  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "one_pass"
ZOO_CACHE = ROOT / "benchmarks" / ".cache" / "zoo"  # bench_zoo.py's trained weights
ZOO = ["resnet18", "mobilenet_v2", "regnet_y_400mf", "shufflenet_v2_x1_0", "mobilenet_v3_small", "resnet18d",
       "mnasnet0_5", "efficientnet_b0"]


def plain_seconds(model, spec, data, positives: int) -> float:
    sample = select_sample(data.labels, len(data.classes), positives=positives)
    with torch.inference_mode():
        model(spec.prepare(data.images[:32]))  # warm-up
    start = time.perf_counter()
    plain_pass(model, spec, data, sample)
    return time.perf_counter() - start


def timed(model, data, spec, strategy: str, positives: int, calibration: int) -> dict:
    start = time.perf_counter()
    modules = decompose(model, data, input_spec=spec, classes=data.classes, strategy=strategy, positives=positives,
                        calibration=calibration)
    whole = time.perf_counter() - start
    t = modules[0].timing
    return {"whole": whole, "capture": t["capture_seconds"],
            "statistics": t["statistics_seconds"] - t["capture_seconds"],
            "calibration": t["calibration_seconds"], "images": t["images"],
            "build": whole - t["statistics_seconds"] - t["calibration_seconds"],
            "calibration_images": modules[0].meta["calibration"]["images"],
            "module_runs": sum(m.timing["calibration_module_images"] for m in modules) / len(modules)}


def measure(name: str, model, data, spec, *, positives: int = 1000, calibration: int = 50,
            strategies=("paper", "channels")) -> dict:
    plain = plain_seconds(model, spec, data, positives)
    row = {"name": name, "plain_seconds": plain, "positives": positives, "calibration": calibration}
    for i, strategy in enumerate(strategies):
        row[strategy] = timed(model, data, spec, strategy, positives, calibration)
        if i == 0:  # the same again: the capture warm
            row[f"{strategy}_warm"] = timed(model, data, spec, strategy, positives, calibration)
        print(name, strategy, {k: round(v, 3) for k, v in row[strategy].items()}, f"plain {plain:.3f}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"{name.replace(':', '_')}.json").write_text(json.dumps(dict(row, machine=machine()), sort_keys=True))
    return row


def rows(only: str | None):
    """(name, thunk giving (model, data, spec, options)) for every row."""
    def smallcnn():
        from cnnmod.training import TrainConfig, train

        path = CACHE / "smallcnn.safetensors"
        data = load_data("mnist5k", "train")
        if not path.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            train("smallcnn", data, path, TrainConfig(epochs=4, lr=0.05, seed=0), progress=False)  # the demo's
        model = load_model(path)
        return model, data, model.input_spec, {}

    def resnet20():
        model = load_model(ROOT / "benchmarks" / "checkpoints" / "cifar10_resnet20.safetensors")
        return model, load_data(str(CIFAR_TAR), "train"), model.input_spec, {}

    def zoo(arch: str):
        def thunk():
            from bench_zoo import ARCHS, trained
            from cnnmod.data.inputspec import measure_spec

            library = next(lib for lib, n in ARCHS if n == arch)
            data = load_data(str(CIFAR_TAR), "train")  # channels: bench_zoo.py times its --max-loss
            return trained(library, arch), data, measure_spec(data.images[:5000]), {"strategies": ("paper",)}
        return thunk

    def resnet50():
        from zoo import create  # torchvision, imported without its compiled operators

        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        k, per_class = 10, 55
        images = torch.randint(0, 256, (k * per_class, 3, 224, 224), dtype=torch.uint8, generator=gen)
        data = Dataset(images, torch.arange(k * per_class) % k, [f"c{i}" for i in range(k)], "generated")
        spec = InputSpec(3, (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return create("torchvision", "resnet50", num_classes=k).eval(), data, spec, {"positives": 50, "calibration": 3,
                                                                                     "strategies": ("paper",)}

    found = [("smallcnn (demo, mnist5k)", smallcnn), ("resnet20 (CIFAR-10)", resnet20)]
    found += [(f"zoo:{arch}", zoo(arch)) for arch in ZOO if any(ZOO_CACHE.glob(f"*_{arch}.safetensors"))]
    found += [("resnet50 224px (random weights)", resnet50)]
    return [(n, f) for n, f in found if only is None or only in n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="rows whose name contains this")
    parser.add_argument("--render", action="store_true", help="only rewrite BENCHMARKS.md from the measured rows")
    args = parser.parse_args(argv)
    if not args.render:
        torch.set_num_threads(2)
        for name, thunk in rows(args.only):
            model, data, spec, options = thunk()
            measure(name, model, data, spec, **options)
    return _write()


def _write() -> int:
    found = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    order = ["smallcnn", "resnet20", "zoo", "resnet50"]
    found.sort(key=lambda r: (next(i for i, o in enumerate(order) if r["name"].startswith(o)), r["name"]))
    write_section("one_pass", render(found), {"rows": found})
    return 0


# What the table cannot say, written after reading it (the numbers above are the run's).
NOTES = [
    "- Target (issue #25: <= 1.2x, calibration included): met by MobileNetV3-Small warm (1.06x) alone. The paper "
    "strategy reads 1.5-1.7x warm on the ResNets and the demo's CNN, and up to 3.5x on MobileNetV2. What is "
    "left: the statistics pass itself (0.8-1.9x); the calibration's float64 run of the parent over 500 images "
    "(0.2-1.9x; float64 convolutions cost far more than float32 on this CPU, depthwise ones most); and each model's first capture "
    "(torch.export: up to 5.6x cold on the demo's CNN, whose plain pass takes half a second).",
    "- Before this issue's changes, calibration ran every paper module whole in float64: 2.15 s of a 2.85 s "
    "decomposition of the demo's CNN (cProfile), now 0.34-0.39 s; the statistics pass's OR of each label's run "
    "of images took a third of its time (now folded in halves).",
    "- Calibration in float32 would remove most of what is left, but module files would then depend on the "
    "device and thread count (README, \"What is guaranteed\"): not done.",
]


def render(found: list[dict]) -> str:
    def parts(r: dict, s: str) -> list[str]:
        t, plain = r[s], r["plain_seconds"]
        return [f"{t['whole'] / plain:.2f}x", f"{t['capture'] / plain:.2f}x", f"{t['statistics'] / plain:.2f}x",
                f"{t['build'] / plain:.2f}x", f"{t['calibration'] / plain:.2f}x"]

    lines = [
        "## One pass (issue #25): a decomposition against one plain inference pass",
        "",
        "Command: `.venv/bin/python benchmarks/bench_one_pass.py` "
        f"({found[0]['machine'] if found else ''}). Each row in one process: one plain inference pass of the "
        "model over the images the statistics pass observes, then `decompose` with calibration (50 images per "
        "class, held out where the data has them), timed in parts, each against that plain pass. "
        "*cold*: the process's first capture (torch.export imports and initialises its machinery); *warm*: the "
        "same decomposition again (the same model object: its captured graph is reused once it reproduces the "
        "model's outputs). Channels: the default `--max-loss 1.0`, whose build (channel scores, re-fits, "
        "about four builds of its search) is the *build* column.",
        "",
        "| model | images observed | plain pass (s) | strategy | total | capture | statistics | build | "
        "calibration (images; module runs each) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        for s in ("paper", "paper_warm", "channels"):
            if s not in r:
                continue
            label = {"paper": "paper, cold", "paper_warm": "paper, warm", "channels": "channels"}[s]
            cells = parts(r, s)
            cells[-1] += f" ({r[s]['calibration_images']}; {r[s]['module_runs']:.0f})"
            lines.append(f"| {r['name']} | {r[s]['images']:,} | {r['plain_seconds']:.2f} | {label} | "
                         + " | ".join(cells) + " |")
    lines += ["", *NOTES]
    if not any(r["name"].startswith("resnet50") for r in found):
        lines += ["", "- The ResNet-50 row (224 px, random weights, noise images) was stopped after 6 minutes in its "
                  "calibration, while modules ran whole in float64 on held-back images (a noise image lights "
                  "elements that 50 other noise images did not: the worst case of the one-run path; on the trained "
                  "CIFAR models 1 to 52 of 500 images per module ran whole). Its statistics pass and build without "
                  "calibration: BENCHMARKS \"ImageNet scale\"."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
