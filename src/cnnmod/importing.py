"""``cnnmod import``: turn a user's ``.pt``/``.pth`` state dict into a cnnmod checkpoint.

The only place where cnnmod reads a torch.save file, and it does so with
``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor or a
plain container.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
import importlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import save_checkpoint
from .data.inputspec import InputSpec, measure_spec
from .data.sources import Dataset
from .errors import CnnmodError
from .evaluate import evaluate_model
from .models import create_model
from .trace.network import run_on_blank


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth`` state dict with ``torch.load(weights_only=True)``; refuse anything else."""
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
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel


def import_state_dict(path: str | os.PathLike, architecture: str, data: Dataset, out: str | os.PathLike,
                      *, arch_args: dict | None = None) -> dict:
    """Load ``path`` into a registered ``architecture`` (classes and input from ``data``) and write ``out``."""
    path = Path(path)
    state = read_state_dict(path)
    spec = measure_spec(data.images)
    args = dict(arch_args or {}, num_classes=len(data.classes), in_channels=spec.channels)
    if architecture == "smallcnn":
        args.setdefault("image_size", spec.size[0])
    model = create_model(architecture, **args)
    _load_into(model, state, path, f"{architecture} with {len(data.classes)} classes")
    return _finish(model, path, out, data, data.classes, spec, architecture=architecture, arch_args=args)


def _load_into(model: nn.Module, state: dict, path: Path, what: str) -> None:
    if getattr(state, "_metadata", None) is None:  # layer versions (torchvision's MNASNet checks them)
        state = OrderedDict(state)
        state._metadata = model.state_dict()._metadata  # the architecture's own: the weights are loaded into it
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        lines = str(e).splitlines()
        raise CnnmodError(f"{path}: the state dict does not fit {what} "
                          f"({lines[1].strip() if len(lines) > 1 else e}).") from None
    model.eval()


def _finish(model, path: Path, out, data: Dataset | None, classes: list[str], spec: InputSpec, **how) -> dict:
    meta = {"imported_from": path.name, "imported_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if data is not None:
        acc = evaluate_model(model, data, spec, classes)
        meta.update(data_fingerprint=data.fingerprint(),
                    accuracy={"split": "import data", "top1": acc["top1"], "top5": acc["top5"], "n": acc["n"]})
    save_checkpoint(model, out, classes=classes, input_spec=spec, **how, **meta)
    return meta


# torchvision's ImageNet weights are prepared so (resize the shorter side to 256, centre crop 224)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def import_library_model(path: str | os.PathLike, arch: str, out: str | os.PathLike, *, data=None,
                         size: tuple[int, int] | None = None, mean: tuple[float, ...] | None = None,
                         std: tuple[float, ...] | None = None, classes: list[str] | None = None) -> dict:
    """Load ``path`` into ``torchvision:NAME`` or ``timm:NAME`` and write a graph checkpoint ``out``.

    The number of classes is read off the weights. Input preparation: timm's from the model's own
    pretrained configuration (mean, std, size, crop); torchvision's the ImageNet one (mean, std,
    224 pixels, shorter side resized to 256 then centre-cropped); ``size``, ``mean`` and ``std``
    override either. Class names: ``classes``, else ``data``'s (when it has as many), else 0..K-1.
    ``data``: a ``Dataset``, or a function of the model's ``InputSpec`` that loads one (photos are
    then decoded to the model's input: shorter side resized, centre cropped).
    """
    path = Path(path)
    library, _, name = arch.partition(":")
    if library not in ("torchvision", "timm") or not name:
        raise CnnmodError(f"expected --arch torchvision:NAME or timm:NAME, found {arch!r}.")
    state = read_state_dict(path)
    model = _library_model(library, name, state, path)
    c, h, w = 3, 224, 224
    m, s, crop = IMAGENET_MEAN, IMAGENET_STD, 224 / 256
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        c, h, w = cfg.get("input_size", (3, 224, 224))
        m, s, crop = tuple(cfg.get("mean", m)), tuple(cfg.get("std", s)), cfg.get("crop_pct", crop)
    h, w = size or (h, w)
    spec = InputSpec(int(c), (int(h), int(w)), tuple(mean or m), tuple(std or s), crop_pct=float(crop))
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise CnnmodError(f"expected {spec.channels} values for --mean and --std, found {len(spec.mean)} and "
                          f"{len(spec.std)}.")
    outputs = run_on_blank(model, spec, f"expected {arch} to take inputs of {spec.channels} x {spec.size[0]} x "
                                         f"{spec.size[1]}, found that it does not").shape[1]
    if callable(data):
        data = data(spec)
    if classes is None:
        named = data is not None and len(data.classes) == outputs
        classes = data.classes if named else [str(i) for i in range(outputs)]
    if len(classes) != outputs:
        raise CnnmodError(f"expected {outputs} class names (the model's outputs), found {len(classes)}.")
    if data is not None and not set(data.classes) <= set(classes):
        data = None  # its classes are not the model's: no accuracy to report
    return _finish(model, path, out, data, list(classes), spec, architecture=arch)


def _library_model(library: str, name: str, state: dict, path: Path) -> nn.Module:
    """Build ``name`` of ``library`` with as many classes as the weights' classifier has, and load them."""
    try:
        package = importlib.import_module(library)
    except ImportError:
        raise CnnmodError(f"expected the {library} package for --arch {library}:{name}, found it missing; "
                          f"install it (pip install {library}).") from None
    except Exception as e:  # a broken install (a torchvision built for another torch) raises anything
        raise CnnmodError(f"expected the {library} package to import, found it broken "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120]}).") from None
    if library == "torchvision":
        def build(k):
            return package.models.get_model(name, weights=None, num_classes=k)
    else:
        def build(k):
            return package.create_model(name, pretrained=False, num_classes=k)
    try:
        model = build(1000)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CnnmodError(f"expected a {library} model name, found {name!r} "
                          f"({str(e).splitlines()[0][:120]}).") from None
    head = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if head and f"{head[-1]}.weight" in state and state[f"{head[-1]}.weight"].shape[0] != 1000:
        model = build(int(state[f"{head[-1]}.weight"].shape[0]))
    _load_into(model, state, path, f"{library}:{name}")
    return model
