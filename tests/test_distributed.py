"""torchrun with 2 gloo processes on the CPU gives the same module files as one process."""

import os
import subprocess
import sys

import pytest

from cnnmod import CnnmodError, TrainConfig, load_data, train
from cnnmod.cli import main
from cnnmod.distributed import resolve_device


@pytest.mark.parametrize("strategy", ["paper", "channels"])  # channels: also the summed values
def test_two_gloo_processes_write_identical_module_files(tmp_path, strategy):
    ckpt = tmp_path / "d.safetensors"
    train("smallcnn", load_data("digits", "train"), ckpt, TrainConfig(epochs=1, batch_size=64), progress=False)
    common = ["decompose", str(ckpt), "--data", "digits", "--device", "cpu", "--batch-size", "64", "--json",
              "--strategy", strategy]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cnnmod", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    # ten modules, and for the paper strategy the parent they share
    assert [f.name for f in one] == [f.name for f in two] and len(one) == (11 if strategy == "paper" else 10)
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert run.stdout.count('"strategy"') == 1  # rank 0 alone reports


def test_devices_are_checked():
    assert resolve_device("cpu").type == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(CnnmodError, match="expected a CUDA device"):
            resolve_device("cuda")
    with pytest.raises(CnnmodError, match="expected --device cpu, cuda or auto"):
        resolve_device("tpu")
