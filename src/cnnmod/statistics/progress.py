"""Save the statistics pass every so often, so that an interrupted run resumes (``--resume``)."""

from __future__ import annotations

import time
from pathlib import Path


from ..errors import CnnmodError
from ..files import read_file, write_file

FORMAT = "cnnmod.statistics_progress"
FORMAT_VERSION = 2  # 2: bit tables and channel counts (issue #16); 1 held per-class counts


def read_progress(path: Path, fmt: str, version: int, key: str, what: str, decided_by: str) -> tuple[dict, dict]:
    """Read a saved state of an interrupted run (``what``: "saved statistics"); refuse another
    cnnmod version's or another run's (``decided_by``: what its key covers)."""
    tensors, meta = read_file(path, expect=fmt)
    if meta.get("format_version") != version:
        raise CnnmodError(f"{path}: expected {what} of format {version}, found {meta.get('format_version')!r} "
                          "(another cnnmod version); delete it or rerun without --resume.")
    if meta.get("key") != key:
        raise CnnmodError(f"{path}: {what} of another run (other {decided_by}); delete it or rerun without --resume.")
    return tensors, meta


class ProgressSaver:
    """Counts saved to ``path`` at most every ``interval`` seconds; ``key`` names the run.

    The key covers everything that decides the counts (parent weights, sample, batch size), so
    a saved state is only resumed by the same run.
    """

    def __init__(self, path: str | Path, key: str, *, resume: bool, interval: float = 30.0):
        self.path, self.key, self.resume, self.interval = Path(path), key, resume, interval
        self.last = time.monotonic()

    def load(self, counts: dict, seen: dict) -> int:
        """Fill ``counts`` and ``seen`` from a saved state; return the batches already counted."""
        if not (self.resume and self.path.exists()):
            return 0
        tensors, meta = read_progress(self.path, FORMAT, FORMAT_VERSION, self.key, "saved statistics",
                                      "model, data or options")
        for name, t in tensors.items():
            part, _, layer = name.partition("/")
            if layer == "seen":
                seen[part].copy_(t)
            else:
                counts[part][layer] = t.clone()
        return int(meta["batches_done"])

    def maybe_save(self, counts: dict, seen: dict, batches_done: int, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.interval:
            return
        tensors = {f"{part}/{layer}": t for part in counts for layer, t in counts[part].items()}
        tensors.update({f"{part}/seen": seen[part] for part in seen})
        write_file(self.path, tensors, {"format": FORMAT, "format_version": FORMAT_VERSION, "key": self.key,
                                        "batches_done": batches_done})
        self.last = time.monotonic()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
