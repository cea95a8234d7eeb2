"""Data-only files: safetensors tensors plus one JSON metadata entry, written atomically.

Every cnnmod file (checkpoint, module, composed classifier) is a safetensors file whose
metadata holds a single key, ``cnnmod``, with a JSON object. Loading never unpickles: the
safetensors format is a JSON header followed by raw little-endian tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CnnmodError

METADATA_KEY = "cnnmod"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Return a sha256 over names, dtypes, shapes and bytes of ``tensors`` in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_checksum(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Return the sha256 stored in a file: over its tensors and its metadata (less the checksum)."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    digest = hashlib.sha256(tensors_checksum(tensors).encode())
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Interrupted (Ctrl-C included) or failed: leave nothing half-written behind.
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_unless_ours(path: str | os.PathLike, ours, what: str) -> None:
    """Refuse to write ``path`` if it is a folder, or an existing file for which ``ours(path)`` is False.

    ``what`` names the kind of file cnnmod may replace there ("a plot cnnmod drew").
    """
    path = Path(path)
    if path.is_dir():
        raise CnnmodError(f"{path}: expected a file name to write, found a folder.")
    if path.exists() and not ours(path):
        raise CnnmodError(f"{path}: exists and is not {what}; cnnmod never overwrites a file it did not write "
                          "(choose another name, or remove the file yourself).")


def check_replaceable(path: str | os.PathLike, fmt: str) -> None:
    """Refuse to write ``path`` over anything but a cnnmod file of format ``fmt``.

    cnnmod never overwrites a file it did not write: a folder, a foreign file, or a cnnmod file
    of another kind (a module where a checkpoint is written) at ``path`` is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise CnnmodError(f"{path}: expected a file name to write, found a folder.")
    if not path.exists():
        return
    try:
        found = read_metadata(path).get("format")
    except CnnmodError:
        raise CnnmodError(f"{path}: exists and is not a cnnmod file; cnnmod never overwrites a file it did not "
                          "write (choose another name, or remove the file yourself).") from None
    if found != fmt:
        raise CnnmodError(f"{path}: expected to replace a {fmt} file, found a {found} file; choose another name.")


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save ``tensors`` and JSON ``meta`` (plus a checksum of both) to ``path``.

    An existing file at ``path`` is replaced only if it is a cnnmod file of the same format.
    """
    check_replaceable(path, meta["format"])
    # clone: modules of one parent share its weight tensors, which safetensors refuses to store twice
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    meta = dict(meta, checksum=file_checksum(tensors, meta))
    # sort_keys: the same content always gives the same bytes.
    blob = st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, blob)


def read_file(path: str | os.PathLike, *, expect: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a cnnmod file; refuse anything that is not one, with a sentence saying why."""
    path = Path(path)
    if not path.exists():
        raise CnnmodError(f"{path}: no such file.")
    if path.is_dir():
        raise CnnmodError(f"{path}: expected a cnnmod .safetensors file, found a directory.")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CnnmodError(f"{path}: cannot be read ({e.strerror}).") from None
    meta = _read_metadata(path, blob)
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CnnmodError(f"{path}: expected a valid safetensors file, found a damaged one ({e}).") from None
    if meta.get("checksum") != file_checksum(tensors, meta):
        raise CnnmodError(f"{path}: the content does not match the checksum in its metadata (damaged file).")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CnnmodError(f"{path}: tensor {name} holds NaN or Inf values.")
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:  # torch's bools are 0 or 1
            raise CnnmodError(f"{path}: tensor {name} holds bools that are neither 0 nor 1 (damaged file).")
    if expect is not None and meta.get("format") != expect:
        raise CnnmodError(f"{path}: expected a {expect} file, found a {meta.get('format')!r} file.")
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """Return the metadata of a cnnmod file without reading or checking its tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            # only the header; a length beyond the file is reported by _read_metadata
            blob = head + f.read(n if 0 < n <= 100_000_000 else 8)
            if len(blob) < 8 + n:
                blob += f.read()
    except OSError as e:
        raise CnnmodError(f"{path}: cannot be read ({e.strerror}).") from None
    return _read_metadata(path, blob)


def _read_metadata(path: Path, blob: bytes) -> dict:
    # The safetensors header: 8 bytes little-endian length, then that many bytes of JSON. Only a
    # file that is not that is looked at for pickle/zip signatures (a header length of 128 + 256k
    # also starts with byte 0x80, like a pickle).
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
    looks_safetensors = 0 < n and 8 + n <= len(blob) and blob[8:9] == b"{"
    if not looks_safetensors and (blob[:1] == b"\x80" or blob[:2] == b"PK"):
        raise CnnmodError(f"{path}: expected a safetensors file, found a pickle or zip (torch.save) file; "
                          "cnnmod never unpickles files.")
    if len(blob) < 8:
        raise CnnmodError(f"{path}: expected a safetensors file, found {len(blob)} bytes.")
    if n <= 0 or 8 + n > len(blob):
        raise CnnmodError(f"{path}: expected a safetensors header, found a header length of {n} bytes "
                          f"in a {len(blob)}-byte file (not a safetensors file, or truncated).")
    try:
        header = json.loads(blob[8:8 + n])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError):
        raise CnnmodError(f"{path}: expected a safetensors file with cnnmod metadata, found none "
                          "(not a cnnmod file, or damaged).") from None
    if not isinstance(meta, dict) or "format" not in meta or "format_version" not in meta:
        raise CnnmodError(f"{path}: the cnnmod metadata lacks its format and version (damaged file).")
    return meta
