"""Any traceable model as a checkpoint (issue #15): graph checkpoints, import --arch, photos of any size."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnmod import InputSpec, load_data, load_model, save_checkpoint
from cnnmod.cli import main
from cnnmod.trace import GraphNetwork

from zoo import create, import_torchvision

SPEC = InputSpec(3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_a_graph_checkpoint_runs_without_the_models_code(tmp_path):
    model = create("torchvision", "mobilenet_v3_small", num_classes=10)
    save_checkpoint(model, tmp_path / "m.safetensors", classes=[str(d) for d in range(10)], input_spec=SPEC,
                    architecture="torchvision:mobilenet_v3_small")
    loaded = load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded, GraphNetwork)  # cnnmod's executor, not torchvision's classes
    assert loaded.cnnmod_meta["format_version"] == 2 and loaded.input_spec == SPEC
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    # the same bytes again from the loaded checkpoint (its graph is its own trace)
    save_checkpoint(loaded, tmp_path / "again.safetensors", classes=[str(d) for d in range(10)], input_spec=SPEC,
                    architecture="torchvision:mobilenet_v3_small")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(Exception, match="expected 10 class names"):
        save_checkpoint(model, tmp_path / "x.safetensors", classes=["a"], input_spec=SPEC)


def test_the_command_line_decomposes_a_graph_checkpoint(tmp_path, capsys):
    model = create("timm", "mobilenetv3_small_050", num_classes=10)
    ckpt = tmp_path / "m.safetensors"
    with pytest.raises(Exception, match=r"expected the model to take inputs of 1 x 8 x 8"):
        save_checkpoint(model, ckpt, classes=[str(d) for d in range(10)], input_spec=InputSpec(1, (8, 8), (0.5,), (0.25,)))
    # digits are grey 8x8: prepared as RGB 16x16 for this model
    save_checkpoint(model, ckpt, classes=[str(d) for d in range(10)], input_spec=InputSpec(3, (16, 16), (0.5,) * 3,
                                                                                         (0.25,) * 3))
    capsys.readouterr()
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "mods"), "--only", "3,8",
                 "--json"]) == 0
    assert main(["evaluate", str(tmp_path / "mods"), "--data", "digits", "--json"]) == 0
    files = sorted(p.name for p in (tmp_path / "mods").iterdir())  # the two modules and the parent they share
    assert files[:2] == ["3.safetensors", "8.safetensors"] and files[2].startswith("_parent-") and len(files) == 3
    grouped = tmp_path / "regnety.safetensors"  # grouped convolutions: spaces the channels strategy keeps whole
    save_checkpoint(create("timm", "regnety_002", num_classes=10), grouped, classes=[str(d) for d in range(10)],
                    input_spec=InputSpec(3, (16, 16), (0.5,) * 3, (0.25,) * 3))
    assert main(["decompose", str(grouped), "--data", "digits", "--out", str(tmp_path / "small"), "--only", "3",
                 "--strategy", "channels", "--sample-images", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "small" / "3.safetensors")]) == 0
    text = capsys.readouterr().out  # which channel spaces were kept whole, and why
    assert "channel spaces kept whole:" in text and "(a grouped or depthwise convolution)" in text
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "mbv3"), "--only", "3",
                 "--strategy", "channels", "--sample-images", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # MobileNetV3: pruned through depthwise convolutions and gates
    assert summary["modules"]["3"]["params_fraction"] < 0.6


def test_import_arch_reads_weights_only_and_keeps_the_libraries_preparation(tmp_path, capsys):
    import_torchvision()  # this machine's torchvision needs the tests' import helper; users' does not
    tv = create("torchvision", "resnet18", num_classes=7)
    torch.save({"state_dict": tv.state_dict(), "epoch": 3}, tmp_path / "tv.pth")
    assert main(["import", str(tmp_path / "tv.pth"), "--arch", "torchvision:resnet18", "--size", "32", "32",
                 "--out", str(tmp_path / "tv.safetensors")]) == 0
    loaded = load_model(tmp_path / "tv.safetensors")
    assert loaded.cnnmod_meta["classes"] == [str(i) for i in range(7)]  # read off the weights' head
    assert loaded.input_spec.mean == (0.485, 0.456, 0.406) and loaded.input_spec.size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), tv(x), atol=1e-5)

    # a plain dict of tensors carries no layer versions, which torchvision's MNASNet checks on loading
    mn = create("torchvision", "mnasnet0_5", num_classes=10)
    torch.save(dict(mn.state_dict()), tmp_path / "mn.pth")
    assert main(["import", str(tmp_path / "mn.pth"), "--arch", "torchvision:mnasnet0_5", "--size", "32", "32",
                 "--out", str(tmp_path / "mn.safetensors")]) == 0
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "mn.safetensors")(x), mn(x), atol=1e-5)

    tm = create("timm", "resnet18d", num_classes=10)
    torch.save(tm.state_dict(), tmp_path / "tm.pth")
    names = "zero,one,two,three,four,five,six,seven,eight,nine"
    assert main(["import", str(tmp_path / "tm.pth"), "--arch", "timm:resnet18d", "--classes", names,
                 "--out", str(tmp_path / "tm.safetensors")]) == 0
    loaded = load_model(tmp_path / "tm.safetensors")
    spec, cfg = loaded.input_spec, tm.pretrained_cfg
    assert spec.size == tuple(cfg["input_size"][1:]) and spec.crop_pct == cfg["crop_pct"]
    assert spec.mean == tuple(cfg["mean"]) and loaded.cnnmod_meta["classes"] == names.split(",")
    assert main(["import", str(tmp_path / "tm.pth"), "--arch", "timm:no_such_net", "--out", str(tmp_path / "x")]) == 2
    assert "expected a timm model name, found 'no_such_net'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "tm.pth"), "--arch", "timm:resnet18", "--out", str(tmp_path / "x")]) == 2
    assert "does not fit timm:resnet18" in capsys.readouterr().err


def test_photos_keep_their_aspect_ratio_and_are_centre_cropped(tmp_path):
    spec = InputSpec(3, (32, 32), (0.0,) * 3, (1.0,) * 3, crop_pct=0.8)
    assert spec.resized(40, 80) == (40, 80) and spec.resized(100, 50) == (80, 40)  # shorter side -> 32 / 0.8
    photo = torch.randint(0, 256, (1, 3, 100, 50), dtype=torch.uint8)
    expected = F.interpolate(photo.float() / 255, size=(80, 40), mode="bilinear", antialias=True)[..., 24:56, 4:36]
    assert torch.allclose(spec.prepare(photo), expected)
    # a folder of photos of several sizes decodes to the model's input, each one cropped the same way
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(48, 64), (90, 40), (32, 32)]):
        (tmp_path / "p" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "p" / f"c{k % 2}" / f"{k}.png")
    data = load_data(str(tmp_path / "p"), size=(32, 32), crop_pct=0.8)
    assert data.images.shape == (3, 3, 32, 32)
