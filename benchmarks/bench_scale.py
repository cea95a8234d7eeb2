"""Benchmark of issue #7: decomposition time and memory as the number of classes grows.

    .venv/bin/python benchmarks/bench_scale.py                # 10, 100 and 1000 classes
    .venv/bin/python benchmarks/bench_scale.py --classes 10    # one size (what each subprocess runs)
    python3 benchmarks/bench_scale.py --device cuda --images 10000   # the same on a GPU (its own section)

GENERATED data: random 32x32 colour images (a fixed number, 2,000), labels i mod K; a
randomly initialised ResNet-20 with K outputs. This measures cost, not accuracy. Each size runs
in its own process, so that its peak memory (max RSS) is its own. Time per image of the
statistics pass is compared with one plain inference pass over the same images, same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

from cnnmod import Dataset, create_model, decompose  # noqa: E402
from cnnmod.data.inputspec import InputSpec  # noqa: E402



def one_size(k: int, images: int, device: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    data = Dataset(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen),
                   torch.arange(images) % k, [f"c{i}" for i in range(k)], "generated")
    model = create_model("resnet20", num_classes=k).eval().to(device)
    spec = InputSpec(3, (32, 32), (0.5,) * 3, (0.25,) * 3)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        model(spec.prepare(data.images[:256].to(device)))  # warm-up (CUDA kernels, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for idx in torch.arange(images).split(256):
            model(spec.prepare(data.images[idx].to(device)))
        if device == "cuda":
            torch.cuda.synchronize()
        plain = time.perf_counter() - start
    modules = decompose(model.cpu(), data, input_spec=spec, classes=data.classes, calibration=0, device=device)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = modules[0].timing
    observed = modules[0].meta["elements_total"]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"classes": k, "images": t["images"], "statistics_seconds": t["statistics_seconds"],
            "total_seconds": t["total_seconds"], "plain_pass_seconds": plain, "device": device,
            "gpu_peak_allocated_mb": gpu_peak,
            "statistics_per_image_ms": 1000 * t["statistics_seconds"] / t["images"],
            "plain_per_image_ms": 1000 * plain / images,
            "count_tables_mb": t["statistics_bytes"] / 2**20,  # bits and channel counts (issue #16)
            "peak_rss_mb": rss_after / 1024, "rss_before_decompose_mb": rss_before / 1024,
            "observed_elements": observed}


def render(rows: list[dict], command: str, where: str) -> str:
    base = rows[0]["statistics_per_image_ms"] / rows[0]["plain_per_image_ms"]
    lines = [f"## Scale (issue #7){'' if rows[0]['device'] == 'cpu' else ', on a GPU'}", "",
             f"Command: `{command}` (machine: {where}). **Generated data**: "
             f"{rows[0]['images']} random 32x32 colour images, labels i mod K, a randomly initialised ResNet-20 with K outputs "
             "(cost only, no accuracy). Each row runs in its own process.", "",
             "| classes | statistics pass, ms/image | plain inference, ms/image | statistics / plain | vs 10 classes | "
             "decompose incl. building all modules (s) | statistics tables (MB) | peak RSS of the process (MB) | "
             "peak GPU memory allocated (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["statistics_per_image_ms"] / r["plain_per_image_ms"]
        gpu = "-" if r.get("gpu_peak_allocated_mb") is None else f"{r['gpu_peak_allocated_mb']:.0f}"
        lines.append(f"| {r['classes']} | {r['statistics_per_image_ms']:.2f} | {r['plain_per_image_ms']:.2f} | "
                     f"{ratio:.2f}x | {ratio / base:.2f}x | {r['total_seconds']:.1f} | {r['count_tables_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {gpu} |")
    lines += ["", "\"vs 10 classes\" compares the statistics pass's cost relative to plain inference (measured in the "
              "same process) at K classes with the same ratio at 10 classes, so that machine noise between "
              "processes cancels. Statistics tables (issue #16): one bit per class and observed element, one "
              f"per element for the shared negatives, a count per class and channel; {rows[0]['observed_elements']:,} observed "
              "elements per class."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json-out", default=None, help="write the rows here instead of BENCHMARKS.md")
    parser.add_argument("--render", default=None, help="write BENCHMARKS.md's section from a --json-out file")
    parser.add_argument("--note", default="", help="with --render: what to add about the machine")
    args = parser.parse_args(argv)
    if args.render:
        got = json.loads(Path(args.render).read_text())
        rows = got["rows"]
        command = f"python3 benchmarks/bench_scale.py --device {rows[0]['device']} --images {rows[0]['images']}"
        text = render(rows, command, got["machine"] + args.note)
        text += ("\n\nOn the GPU the statistics pass costs several plain passes: a plain ResNet-20 pass takes "
                 "0.04 ms per image there, and the counting (per-label runs, each a small reduction with a "
                 "host synchronisation) is bound by kernel launches, not arithmetic. It still does not grow "
                 "with the number of classes.")
        write_section("scale_gpu", text, got)
        return
    if args.classes:
        print(json.dumps(one_size(args.classes, args.images, args.device)))
        return
    rows = []
    for k in (10, 100, 1000):
        out = subprocess.run([sys.executable, __file__, "--classes", str(k), "--images", str(args.images),
                              "--device", args.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    if args.json_out:  # a lent GPU machine: the rows come back as a file, rendered here with --render
        Path(args.json_out).write_text(json.dumps({"rows": rows, "machine": machine()}, indent=2))
        return
    command = "python3 benchmarks/bench_scale.py" + ("" if args.device == "cpu" else
                                                       f" --device {args.device} --images {args.images}")
    text = render(rows, command, machine())
    print(text)
    write_section("scale" if args.device == "cpu" else "scale_gpu", text, {"rows": rows})


if __name__ == "__main__":
    main()
