"""ONNX export: what onnxruntime computes from the exported file equals what cnnmod computes."""

import json

import numpy as np
import onnx  # the test extra installs onnx and onnxruntime
import onnxruntime as ort
import torch

from cnnmod import compose, load_data, load_model, load_module
from cnnmod.cli import main


def _run(path, images: torch.Tensor) -> tuple[np.ndarray, dict]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": images.numpy()})[0]
    meta = json.loads(onnx.load(str(path)).metadata_props[0].value)
    return out, meta


def test_module_composed_and_checkpoint_exports_match_cnnmod(decomposed, tmp_path, capsys):
    _, ckpt, mods = decomposed
    images = load_data("digits", "test").images[:37]  # raw uint8, a batch size not exported
    module = load_module(mods / "3.safetensors")
    assert main(["export", str(mods / "3.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    got, meta = _run(tmp_path / "m.onnx", images)
    with torch.no_grad():
        expected = module.network(module.input_spec.prepare(images))
    assert meta["kind"] == "module" and meta["outputs"] == ["not 3", "3"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)

    assert main(["export", str(mods), "--onnx", str(tmp_path / "c.onnx")]) == 0
    got, meta = _run(tmp_path / "c.onnx", images)
    clf = compose([load_module(mods / f"{d}.safetensors") for d in range(10)])
    np.testing.assert_allclose(got, clf.score_images(images).numpy(), rtol=1e-4, atol=1e-4)
    assert meta["classes"] == [str(d) for d in range(10)] and meta["kind"] == "composed"

    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "k.onnx")]) == 0
    got, _ = _run(tmp_path / "k.onnx", images)
    model = load_model(ckpt)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(model.input_spec.prepare(images)).numpy(), rtol=1e-4, atol=1e-4)


def test_export_of_a_non_cnnmod_file_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a file")
    assert main(["export", str(bad), "--onnx", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
