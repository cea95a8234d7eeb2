"""Benchmark of issue #16 item 3: a large image folder starts at once when streamed.

    .venv/bin/python benchmarks/bench_stream.py [--files 200000]

GENERATED: a folder of N small PNG files (one 8x8 image's bytes, copied) in 1,000 class folders,
in a temporary directory removed afterwards. Measured: the time and the memory growth of
``load_data(folder, stream=True)`` (list and index the files, nothing decoded) and of decoding one
batch of 256 of them, against decoding the same batch straight from their bytes, same process.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

from cnnmod import load_data  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    args = parser.parse_args(argv)
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    blob = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        start = time.perf_counter()
        for c in range(1000):
            (root / f"c{c:04d}").mkdir(parents=True)
            for i in range(args.files // 1000):
                (root / f"c{c:04d}" / f"{i:05d}.png").write_bytes(blob)
        made = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        files = load_data(str(root), channels=3, size=(8, 8), stream=True)
        listed = time.perf_counter() - start
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
        batch = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:256]
        start = time.perf_counter()
        files.load(batch)
        decoded = time.perf_counter() - start
        start = time.perf_counter()
        for i in batch.tolist():
            np.asarray(Image.open(io.BytesIO((root / files.files[i]).read_bytes())).convert("RGB"))
        baseline = time.perf_counter() - start
    row = {"files": len(files), "classes": len(files.classes), "seconds_to_make": made, "seconds_to_list": listed,
           "memory_growth_mb": grown, "batch_seconds": decoded, "baseline_batch_seconds": baseline}
    print(row)
    lines = ["## Streamed image folders (issue #16)", "",
             f"Command: `.venv/bin/python benchmarks/bench_stream.py --files {args.files}` ({machine()}). "
             f"**Generated**: {row['files']:,} PNG files (8x8) in {row['classes']:,} class folders.", "",
             "| files | list and index them (s) | memory growth (MB) | decode a batch of 256 (s) | "
             "the same 256 decoded by PIL directly (s) |",
             "|---|---|---|---|---|",
             f"| {row['files']:,} | {listed:.2f} | {grown:.0f} | {decoded:.3f} | {baseline:.3f} |", "",
             "Listing holds the file names and labels only; no image is decoded until a batch asks for it."]
    write_section("stream", "\n".join(lines), row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
