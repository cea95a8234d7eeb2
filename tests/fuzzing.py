"""Mutations of a safetensors file: truncations, byte flips and header edits (seeded)."""

from __future__ import annotations

import json
import random

from cnnmod.files import file_checksum


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _recheck(header: dict, data: bytes) -> dict:
    """Recompute the cnnmod checksum so the edit passes it: a crafted, not a damaged, file."""
    from safetensors.torch import load

    meta = json.loads(header["__metadata__"]["cnnmod"])
    try:
        tensors = load(_join(header, data))
    except Exception:
        return header
    meta["checksum"] = file_checksum(tensors, meta)
    header["__metadata__"]["cnnmod"] = json.dumps(meta, sort_keys=True)
    return header


HEADER_EDITS = [
    ("shape", lambda h, m, t: h[t].__setitem__("shape", [d + 1 for d in h[t]["shape"]])),
    ("dtype", lambda h, m, t: h[t].__setitem__("dtype", "F16" if h[t]["dtype"] == "F32" else "F32")),
    ("offsets", lambda h, m, t: h[t].__setitem__("data_offsets", [0, h[t]["data_offsets"][1] + 4])),
    ("drop-tensor", lambda h, m, t: h.pop(t)),
    ("format-version", lambda h, m, t: m.__setitem__("format_version", 2)),
    ("format", lambda h, m, t: m.__setitem__("format", "cnnmod.other")),
    ("class-name", lambda h, m, t: m.__setitem__("class_name", "zebra")),
    ("graph-op", lambda h, m, t: m["graph"]["nodes"][1].__setitem__("op", "exec")),
    ("graph-stride", lambda h, m, t: m["graph"]["nodes"][1]["attrs"].__setitem__("stride", [3, "x"])),
    ("graph-output", lambda h, m, t: m["graph"].__setitem__("output", "nowhere")),
    ("input-size", lambda h, m, t: m["input"].__setitem__("size", [100000, 100000])),
    ("input-channels", lambda h, m, t: m["input"].__setitem__("channels", 2)),
    ("drop-graph", lambda h, m, t: m.pop("graph")),
]


def mutations(blob: bytes, count: int, seed: int = 0):
    """Yield ``count`` (kind, mutated bytes) pairs: a third each of truncations, flips, header edits."""
    rng = random.Random(seed)
    header, data = _split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    n_head = 8 + int.from_bytes(blob[:8], "little")
    for i in range(count):
        kind = ("truncate", "flip", "header")[i % 3]
        if kind == "truncate":
            yield kind, blob[: rng.choice([0, 1, 7, 8, 9, n_head - 1, n_head, rng.randrange(len(blob))])]
        elif kind == "flip":
            pos = rng.randrange(n_head) if rng.random() < 0.5 else rng.randrange(n_head, len(blob))
            mutated = bytearray(blob)
            mutated[pos] ^= rng.randrange(1, 256)
            yield kind, bytes(mutated)
        else:
            h = json.loads(json.dumps(header))
            meta = json.loads(h["__metadata__"]["cnnmod"])
            name, edit = HEADER_EDITS[(i // 3) % len(HEADER_EDITS)]
            try:
                edit(h, meta, rng.choice(names))
            except KeyError:  # a checkpoint has no graph: edit its architecture arguments instead
                meta["arch_args"] = {"num_classes": -1}
            h["__metadata__"]["cnnmod"] = json.dumps(meta, sort_keys=True)
            crafted = rng.random() < 0.5
            yield f"header:{name}{':crafted' if crafted else ''}", _join(_recheck(h, data) if crafted else h, data)


def fuzz_loads(blob: bytes, count: int, folder, load, same_output, seed: int = 0) -> tuple[int, int]:
    """Write ``count`` mutations of ``blob`` into ``folder`` and ``load`` each (10 s at most): return
    (refused with CnnmodError, loaded). ``same_output(loaded, kind)`` asserts what a loaded one computes."""
    import signal

    from cnnmod import CnnmodError

    def hung(*_):
        raise TimeoutError("a load hung")

    refused = loaded = 0
    old = signal.signal(signal.SIGALRM, hung)
    try:
        for i, (kind, mutated) in enumerate(mutations(blob, count, seed=seed)):
            path = folder / f"m{i}.safetensors"
            path.write_bytes(mutated)
            signal.alarm(10)
            try:
                result = load(path)
            except CnnmodError:
                refused += 1
                continue
            finally:
                signal.alarm(0)
            same_output(result, kind)
            loaded += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    return refused, loaded
