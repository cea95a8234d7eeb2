"""Benchmark of issue #6: mutated module and checkpoint files are refused or load identically.

    .venv/bin/python benchmarks/bench_fuzz.py

Builds one module file and one checkpoint (tiny, in a temporary folder), writes thousands of
mutated copies (truncations, byte flips, header edits, half of them "crafted" with the
checksum recomputed) and loads each. Counts: tried, refused with cnnmod's own error, loaded
with identical outputs, crashed with another exception (must be 0), hung (must be 0), code
executed (a pickle planted among them would create a marker file; must never exist).
"""

from __future__ import annotations

import pickle
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import write_section  # noqa: E402
from fuzzing import mutations  # noqa: E402
from nets import Unfamiliar  # noqa: E402

from cnnmod import CnnmodError, TrainConfig, decompose, load_data, load_model, load_module, save_module, train  # noqa: E402


class Marker:
    path = None

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fuzz(original: Path, load, run, count: int, tmp: Path) -> Counter:
    expected = run(load(original))
    tally = Counter()

    def hang(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, hang)
    for i, (kind, blob) in enumerate(mutations(original.read_bytes(), count, seed=1)):
        path = tmp / f"mutant{i}.safetensors"
        path.write_bytes(blob)
        tally["tried"] += 1
        signal.alarm(10)
        try:
            same = torch.equal(run(load(path)), expected)
            tally["loaded, same outputs" if same else "loaded, DIFFERENT outputs"] += 1
        except CnnmodError:
            tally["refused"] += 1
        except TimeoutError:
            tally["hung"] += 1
        except Exception as e:  # noqa: BLE001 - counting crashes is the point
            tally[f"crashed ({type(e).__name__})"] += 1
        finally:
            signal.alarm(0)
        path.unlink()
    return tally


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = Unfamiliar(3).eval()
        data = torch.utils.data.TensorDataset(torch.randn(30, 1, 8, 8), torch.arange(3).repeat(10))
        save_module(decompose(model, data)[1], tmp / "module.safetensors")
        train("smallcnn", load_data("digits", "train"), tmp / "ckpt.safetensors", TrainConfig(epochs=1), progress=False)
        x = torch.randn(4, 1, 8, 8)
        results = {
            "module file": fuzz(tmp / "module.safetensors", load_module, lambda m: m.network(x), 3000, tmp),
            "checkpoint file": fuzz(tmp / "ckpt.safetensors", load_model, lambda m: m(x), 1500, tmp),
        }
        marker = tmp / "code-ran"
        Marker.path = marker
        (tmp / "evil.safetensors").write_bytes(pickle.dumps(Marker()))
        for load in (load_module, load_model):
            try:
                load(tmp / "evil.safetensors")
            except CnnmodError:
                pass
        executed = marker.exists()
    lines = ["## Safety fuzzing (issue #6)", "",
             "Command: `.venv/bin/python benchmarks/bench_fuzz.py`. Mutations: a third truncations, a third "
             "single-byte flips (half in the header, half in the data), a third header edits (tensor shape, "
             "dtype, offsets, a dropped tensor, format and version, class name, layer graph, input size), half "
             "of those \"crafted\" with the checksum recomputed so that only the load-time checks can catch "
             "them.", "", "| file | tried | refused | loaded, same outputs | other outcomes |", "|---|---|---|---|---|"]
    for name, t in results.items():
        other = {k: v for k, v in t.items() if k not in ("tried", "refused", "loaded, same outputs")}
        lines.append(f"| {name} | {t['tried']} | {t['refused']} | {t['loaded, same outputs']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in other.items()) or 'none (0 crashes, 0 hangs)'} |")
    lines += ["", f"Code executed by loading a planted pickle: {'YES' if executed else 'never'}."]
    print("\n".join(lines))
    write_section("fuzz", "\n".join(lines), {k: dict(v) for k, v in results.items()} | {"code_executed": executed})


if __name__ == "__main__":
    main()
