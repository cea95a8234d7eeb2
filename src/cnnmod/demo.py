"""``cnnmod demo``: the pipeline on the embedded MNIST digits (filled in by the decomposition)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .checkpoint import load_model
from .data import load_data
from .evaluate import evaluate_model
from .training import TrainConfig, train


def run_demo(*, epochs: int = 3, as_json: bool = False) -> int:
    """Train smallcnn on mnist5k and report its test accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mnist5k_smallcnn.safetensors"
        train("smallcnn", load_data("mnist5k", "train"), ckpt, TrainConfig(epochs=epochs, lr=0.05),
              progress=not as_json)
        model = load_model(ckpt)
        result = evaluate_model(model, load_data("mnist5k", "test"))
    if as_json:
        print(json.dumps({"model_top1": result["top1"], "model_top5": result["top5"]}))
    else:
        print(f"smallcnn on mnist5k test: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    return 0
