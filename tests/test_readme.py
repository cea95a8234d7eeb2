"""The README's Python examples run as written (issue #14: one of them raised AttributeError)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2  # the API example and the prepared-tensors example
    monkeypatch.chdir(tmp_path)  # the examples write model.safetensors, 3.safetensors, ...
    namespace: dict = {}
    for block in blocks:  # one namespace: later blocks use what earlier ones made, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "3.safetensors").exists()
    assert namespace["scores"].shape == (8, 2) and namespace["clf"].rule == "calibrated"
