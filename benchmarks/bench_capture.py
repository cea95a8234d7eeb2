"""Benchmark of issue #15: capture with torch.fx (cnnmod's tracer) or with torch.export, on the zoo.

    .venv/bin/python benchmarks/bench_capture.py

For every model of the zoo test (random weights, its small input), in the same run: whether
``torch.fx.symbolic_trace`` and ``torch.export.export`` capture it, how long each takes, how long
cnnmod's whole ``trace_graph`` (fx plus the registry's recognition) takes, and how many distinct
operation spellings each capture yields across the zoo (fx: module types, functions and tensor
methods; export: ATen overloads). This is the measurement behind the choice written in
``src/cnnmod/trace/graph.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import machine, write_section  # noqa: E402
from zoo import ZOO, create  # noqa: E402

from cnnmod.trace import trace_graph  # noqa: E402


def spellings_fx(model, graph) -> set[str]:
    modules = dict(model.named_modules())
    out = set()
    for n in graph.graph.nodes:
        if n.op == "call_module":
            out.add("module " + type(modules[n.target]).__name__)
        elif n.op in ("call_function", "call_method"):
            out.add(f"{n.op[5:]} " + getattr(n.target, "__name__", str(n.target)))
    return out


def timed(fn):
    start = time.perf_counter()
    try:
        return fn(), time.perf_counter() - start, None
    except Exception as e:  # a row that says why
        return None, time.perf_counter() - start, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def main() -> int:
    torch.manual_seed(0)
    rows, all_fx, all_aten = [], set(), set()
    for library, name, size in ZOO:
        model = create(library, name, num_classes=10)
        x = torch.randn(2, 3, size, size)
        g, fx_s, fx_err = timed(lambda: fx.symbolic_trace(model))
        _, ours_s, ours_err = timed(lambda: trace_graph(model))
        ep, ex_s, ex_err = timed(lambda: torch.export.export(model, (x,)))
        if g is not None:
            all_fx |= spellings_fx(model, g)
        if ep is not None:
            all_aten |= {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        rows.append({"model": f"{library}:{name}", "fx_seconds": fx_s, "fx_error": fx_err, "cnnmod_seconds": ours_s,
                     "cnnmod_error": ours_err, "export_seconds": ex_s, "export_error": ex_err})
        print(rows[-1], flush=True)
    results = {"machine": machine(), "rows": rows, "fx_spellings": sorted(all_fx), "aten_ops": sorted(all_aten)}
    write_section("capture", render(results), results)
    return 0


def render(r: dict) -> str:
    ok = lambda err, s: "refused" if err else f"{s:.2f} s"  # noqa: E731
    lines = ["## Capture: torch.fx or torch.export (issue #15)", "",
             f"Command: `.venv/bin/python benchmarks/bench_capture.py` ({r['machine']}). The zoo test's models "
             "(random weights, small inputs), each captured three ways in the same run.", "",
             "| model | torch.fx symbolic_trace | cnnmod trace_graph (fx + registry) | torch.export.export |",
             "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {ok(row['fx_error'], row['fx_seconds'])} | "
                     f"{ok(row['cnnmod_error'], row['cnnmod_seconds'])} | {ok(row['export_error'], row['export_seconds'])} |")
    fx_total = sum(x["fx_seconds"] for x in r["rows"])
    ex_total = sum(x["export_seconds"] for x in r["rows"])
    lines += ["", f"- Total: fx {fx_total:.1f} s, export {ex_total:.1f} s ({ex_total / fx_total:.0f}x). "
              f"Distinct spellings across the zoo: fx {len(r['fx_spellings'])} (module types, functions, methods), "
              f"export {len(r['aten_ops'])} ATen overloads.",
              "- Failures: " + ("; ".join(f"{x['model']}: {x['export_error'] or x['fx_error'] or x['cnnmod_error']}"
                                          for x in r["rows"] if x["export_error"] or x["fx_error"] or x["cnnmod_error"])
                                or "none.")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
