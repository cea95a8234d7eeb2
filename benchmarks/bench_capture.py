"""Benchmark of issue #23: capture coverage and time, the old capture against the new.

    .venv/bin/python benchmarks/bench_capture.py

The models: the test corpus of user-style CIFAR code (tests/corpus.py) and the zoo test's
torchvision/timm models (random weights, their small inputs). Each is captured, in this run, by
the old capture (cnnmod's ``trace_graph`` at 2f36d34: symbolic torch.fx and its allowlist; run in
a subprocess on that commit's sources, read with ``git archive``) and by the new one (torch.export
on an example input, the registry's ops). A capture counts only if it succeeds; the new one also
checks that its graph computes the model's outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import RESULTS, ROOT, machine, write_section  # noqa: E402
from corpus import CORPUS, randomised  # noqa: E402
from zoo import ZOO, create  # noqa: E402

OLD = "2f36d34"  # main before issue #23


def models():
    """(name, make, input shape) of every model measured."""
    found = [(f"corpus:{name}", lambda make=make: randomised(make()), shape) for name, (make, shape) in CORPUS.items()]
    found += [(f"{lib}:{name}", lambda lib=lib, name=name: create(lib, name, num_classes=10), (3, size, size))
              for lib, name, size in ZOO]
    return found


def timed(fn):
    start = time.perf_counter()
    try:
        fn()
        return time.perf_counter() - start, None
    except Exception as e:  # a row that says why
        return time.perf_counter() - start, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def measure(capture) -> dict:
    rows = {}
    for name, make, shape in models():
        torch.manual_seed(0)
        model = make().eval()
        seconds, error = timed(lambda: capture(model, shape))
        rows[name] = {"seconds": seconds, "error": error}
        print(name, rows[name], file=sys.stderr, flush=True)
    return rows


def old_rows() -> dict:
    """The old capture, run on the old commit's sources in a subprocess (the same models)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); import bench_capture as b; "
                "from cnnmod.trace import trace_graph; assert %r in trace_graph.__code__.co_filename; "
                "print(json.dumps(b.measure(lambda m, s: trace_graph(m))))") % (
                    str(Path(tmp) / "src"), str(Path(__file__).parent), tmp)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONPATH": str(Path(tmp) / "src"), "PATH": "/usr/bin:/bin"})
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    from cnnmod.trace import trace_graph

    if "--render" in sys.argv:  # only rewrite BENCHMARKS.md from the measured rows
        results = json.loads((RESULTS / "capture.json").read_text())
    else:
        results = {"machine": machine(), "old": old_rows(), "new": measure(trace_graph)}
    write_section("capture", render(results), results)
    return 0


def render(r: dict) -> str:
    cell = lambda row: f"refused ({row['error'][:90]})" if row["error"] else f"{row['seconds']:.2f} s"  # noqa: E731
    lines = ["## Capture of user code (issue #23): symbolic torch.fx against running the model", "",
             f"Command: `.venv/bin/python benchmarks/bench_capture.py` ({r['machine']}). The test corpus of "
             "user-style CIFAR code (`tests/corpus.py`) and the zoo test's torchvision/timm models, each captured "
             f"in the same run by the old capture (cnnmod at {OLD}: symbolic torch.fx and its allowlist) and the new "
             "one (torch.export on an example input of the input's shape, the batch symbolic; the registry's ops; "
             "the graph checked against the model's outputs).", "",
             "| model | old capture (fx) | new capture (export) |", "|---|---|---|"]
    for name in r["new"]:
        lines.append(f"| {name} | {cell(r['old'][name])} | {cell(r['new'][name])} |")
    lines.append("")
    for group in ("corpus", "zoo"):
        names = [n for n in r["new"] if n.startswith("corpus:") == (group == "corpus")]
        ok = {k: [n for n in names if not r[k][n]["error"]] for k in ("old", "new")}
        both = [n for n in ok["old"] if n in ok["new"]]
        t = {k: sum(r[k][n]["seconds"] for n in both) for k in ("old", "new")}
        mean = sum(r["new"][n]["seconds"] for n in ok["new"]) / max(1, len(ok["new"]))
        lines.append(f"- {group}: old {len(ok['old'])}/{len(names)}, new {len(ok['new'])}/{len(names)} captured; "
                     f"the new capture {mean:.2f} s a model on average" +
                     (f"; on the {len(both)} both capture, {t['old']:.1f} s old against {t['new']:.1f} s new"
                      if both else "") + ".")
    lines.append("- The new capture's time is torch.export's (running `forward` on fake tensors) plus two plain "
                 "forward passes (the model's and the graph's, compared); it is seconds where fx took "
                 "milliseconds, still a small part of any decomposition" + _decomposition_share() + ". A model "
                 "captured again in the same process (a second decomposition) reuses its graph once the graph "
                 "reproduces the model's outputs again.")
    return "\n".join(lines)


def _decomposition_share() -> str:
    """The capture's share of the option-A ResNet-20's paper decomposition (bench_user_models.py), if measured."""
    path = RESULTS / "user_models.json"
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    return (f" (the option-A ResNet-20 of the section on user-written models: {r['capture_seconds']:.1f} s of a "
            f"paper decomposition of {r['paper_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
