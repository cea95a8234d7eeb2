"""``cnnmod import``: turn a user's ``.pt``/``.pth`` state dict into a cnnmod checkpoint.

The only place where cnnmod reads a torch.save file, and it does so with
``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor or a
plain container.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .data.inputspec import measure_spec
from .data.sources import Dataset
from .errors import CnnmodError
from .evaluate import evaluate_model
from .models import create_model


def import_state_dict(path: str | os.PathLike, architecture: str, data: Dataset, out: str | os.PathLike,
                      *, arch_args: dict | None = None) -> dict:
    """Load ``path`` into ``architecture`` (classes and input from ``data``) and write ``out``."""
    path = Path(path)
    if not path.is_file():
        raise CnnmodError(f"{path}: no such file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CnnmodError(f"{path}: expected a state dict that torch.load(weights_only=True) accepts, "
                          f"found something else ({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CnnmodError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}.")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    spec = measure_spec(data.images)
    args = dict(arch_args or {}, num_classes=len(data.classes), in_channels=spec.channels)
    if architecture == "smallcnn":
        args.setdefault("image_size", spec.size[0])
    model = create_model(architecture, **args)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CnnmodError(f"{path}: the state dict does not fit {architecture} with {len(data.classes)} classes "
                          f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}).") from None
    model.eval()
    acc = evaluate_model(model, data, spec, data.classes)
    meta = {"imported_from": path.name, "imported_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "data_fingerprint": data.fingerprint(),
            "accuracy": {"split": "import data", "top1": acc["top1"], "top5": acc["top5"], "n": acc["n"]}}
    save_checkpoint(model, out, architecture=architecture, arch_args=args, classes=data.classes,
                    input_spec=spec, **meta)
    return meta
