"""Compare two directories of module files: byte-identical, or where the tensors differ.

    python3 benchmarks/compare_modules.py DIR_A DIR_B

Used by the GPU session to compare modules built on CUDA with modules built on the CPU, and a
torchrun group's modules with one process's. Prints one line per difference and a verdict.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from cnnmod.files import read_file


def main(argv=None) -> int:
    a, b = (Path(p) for p in (argv or sys.argv[1:]))
    names = sorted(p.name for p in a.glob("*.safetensors"))
    if names != sorted(p.name for p in b.glob("*.safetensors")) or not names:
        print(f"DIFFERENT file lists: {names} vs {sorted(p.name for p in b.glob('*.safetensors'))}")
        return 1
    same_files = 0
    for name in names:
        if hashlib.sha256((a / name).read_bytes()).digest() == hashlib.sha256((b / name).read_bytes()).digest():
            same_files += 1
            continue
        ta, ma = read_file(a / name)
        tb, mb = read_file(b / name)
        for key in sorted(set(ta) | set(tb)):
            if key not in ta or key not in tb:
                print(f"{name}: tensor {key} only in one file")
            elif not torch.equal(ta[key], tb[key]):
                diff = (ta[key] != tb[key]).sum().item()
                print(f"{name}: {key}: {diff} of {ta[key].numel()} elements differ")
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        print(f"{name}: metadata keys that differ: {keys}")
    print(f"{'IDENTICAL' if same_files == len(names) else 'DIFFERENT'}: {same_files} of {len(names)} files byte-identical")
    return 0 if same_files == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
