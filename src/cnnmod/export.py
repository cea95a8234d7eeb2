"""Export a module, a composed classifier or a checkpoint to ONNX, for runtimes without cnnmod.

The exported graph takes raw uint8 images (B, C, H, W) in the format of the (first) module's
input specification and does the preparation itself (scaling, normalisation, and for modules of
other specifications their conversion), so a user feeds it the same images as ``cnnmod evaluate``.
Outputs: a module gives ``logits`` (B, 2) [not this class, this class]; a composed classifier
gives ``scores`` (B, K), one column per module in class order (argmax is the answer; below the
stored threshold it is "unknown"); a checkpoint gives ``logits`` (B, K). The class names and the
threshold travel in the ONNX file's metadata (key ``cnnmod``).

We use torch's TorchScript-based exporter (``dynamo=False``): on our plain ops it is exact, it
exports a ResNet-20 module in under a second (the dynamo exporter took 11 s) and needs no
onnxscript. The ``onnx`` package adds the metadata; ``onnxruntime`` checks the result in tests.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CnnmodError
from .files import atomic_write_bytes, read_metadata, refuse_unless_ours
from .trace.overlays import unpacked


class _FromRaw(nn.Module):
    """Raw uint8 images -> prepared input -> ``net``; for a single network and its specification."""

    def __init__(self, net: nn.Module, spec):
        super().__init__()
        self.net, self.spec = net, spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.spec.prepare(images))


class _Composed(nn.Module):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clf.score_images(images)


def _exported_by_cnnmod(path: Path) -> bool:
    import onnx

    try:
        return "cnnmod" in {p.key for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not ONNX at all: protobuf raises its own error types
        return False


def export_onnx(paths: list[str], out: str | os.PathLike) -> dict:
    """Write ``out`` (ONNX) for a module file, a composed file or module set, or a checkpoint."""
    from .compose.io import load_classifier
    from .modules.io import FORMAT as MODULE_FORMAT
    from .modules.io import load_module

    try:
        import onnx
    except ImportError:
        raise CnnmodError("expected the onnx package for export, found it missing; "
                          "install cnnmod[export].") from None
    if len(paths) == 1 and Path(paths[0]).is_file() and read_metadata(paths[0]).get("format") == MODULE_FORMAT:
        module = load_module(paths[0])
        net, spec, output = _FromRaw(unpacked(module.network), module.input_spec), module.input_spec, "logits"
        info = {"kind": "module", "classes": [module.class_name], "outputs": ["not " + module.class_name,
                                                                              module.class_name]}
    else:
        kind, obj = load_classifier(paths)
        if kind == "model":
            net, spec, output = _FromRaw(obj, obj.input_spec), obj.input_spec, "logits"
            info = {"kind": "checkpoint", "classes": obj.cnnmod_meta["classes"]}
        else:
            for k, network in enumerate(obj.networks):
                obj.networks[k] = unpacked(network)
            net, spec, output = _Composed(obj), obj.modules_[0].input_spec, "scores"
            info = {"kind": "composed", "classes": obj.classes, "rule": obj.rule,
                    "unknown_below_score": obj.reject_below()}
    specs = [m.input_spec for m in obj.modules_] if info["kind"] == "composed" else [spec]
    if any(s.prepared for s in specs):
        raise CnnmodError("expected modules that prepare raw images (the exported graph takes uint8 images), found "
                          "a module decomposed from prepared tensors without input_spec=.")
    refuse_unless_ours(out, _exported_by_cnnmod, "an ONNX file cnnmod exported")
    info["input"] = {"dtype": "uint8", "channels": spec.channels, "size": list(spec.size)}
    example = torch.zeros(1, spec.channels, *spec.size, dtype=torch.uint8)
    buffer = io.BytesIO()
    net.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns that shapes and mean/std become constants: they are, by design
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["images"],
                              output_names=[output], dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}},
                              opset_version=17)
    except Exception as e:  # the exporter's errors are long; one sentence for the user
        raise CnnmodError(f"expected an exportable network, found that torch.onnx could not export it "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {"cnnmod": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(out, model.SerializeToString())
    return info
