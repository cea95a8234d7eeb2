"""Observe once, build many (issue #16): an observation is saveable and builds any strategy's modules."""

import pytest
import torch

from cnnmod import (ChannelsOptions, CnnmodError, PaperOptions, build, create_model, decompose, load_data,
                    load_observation, observe, save_module, save_observation)
from cnnmod.data.inputspec import measure_spec

from fuzzing import fuzz_loads


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = load_data("digits", "train")
    model = create_model("smallcnn", num_classes=10, image_size=8).eval()
    return model, data, measure_spec(data.images)


def _bytes(modules, folder, tag):
    out = []
    for m in modules:
        save_module(m, folder / f"{tag}_{m.class_name}.safetensors")
        out.append((folder / f"{tag}_{m.class_name}.safetensors").read_bytes())
    return out


def test_build_from_one_observation_gives_what_decompose_gives(setup, tmp_path):
    model, data, spec = setup
    obs = observe(model, data, input_spec=spec, positives=40)
    for strategy, options in [("paper", {}), ("paper", {"delta": 0.3}), ("channels", {"keep": 0.5, "trunk": 0.2})]:
        once = decompose(model, data, input_spec=spec, positives=40, calibration=0, strategy=strategy, **options)
        assert _bytes(build(obs, strategy, **options), tmp_path, "b") == _bytes(once, tmp_path, "d"), strategy
    # a dataclass of options records the options that differ from their defaults, as the keywords do
    assert _bytes(build(obs, "channels", ChannelsOptions(keep=0.5, trunk=0.2)), tmp_path, "c") == \
        _bytes(build(obs, "channels", trunk=0.2), tmp_path, "k")


def test_a_saved_observation_builds_the_same_modules(setup, tmp_path):
    model, data, spec = setup
    obs = observe(model, data, input_spec=spec, positives=40, only=["3", "5"])
    save_observation(obs, tmp_path / "obs.safetensors")
    back = load_observation(tmp_path / "obs.safetensors")
    for strategy in ("paper", "channels"):
        assert _bytes(build(back, strategy), tmp_path, "l") == _bytes(build(obs, strategy), tmp_path, "o")
    assert [m.class_name for m in build(back, "paper")] == ["3", "5"]


def test_options_are_validated_and_a_paper_observation_cannot_build_channels(setup):
    model, data, spec = setup
    with pytest.raises(CnnmodError, match=r"expected --keep to be a share > 0 and <= 1, found 0"):
        ChannelsOptions(keep=0)
    with pytest.raises(CnnmodError, match="expected --delta to be a number > 0"):
        PaperOptions(delta=-1.0)
    obs = observe(model, data, input_spec=spec, positives=20, sums=False)
    with pytest.raises(CnnmodError, match="expected options of this strategy"):
        build(obs, "paper", keep=0.5)
    with pytest.raises(CnnmodError, match=r"of the observation \(batch_size, .*\) or of the paper strategy "
                                          r"\(delta\), found positves"):
        decompose(model, data, input_spec=spec, positves=20)  # refused before the pass
    with pytest.raises(CnnmodError, match="observation made with sums=True"):
        build(obs, "channels")
    assert len(build(obs, "paper", PaperOptions(delta=0.4))) == 10


def test_a_reuse_skips_the_other_classes_own_images_and_changes_no_paper_module(setup, tmp_path):
    model, data, spec = setup
    lean = observe(model, data, input_spec=spec, positives=40, only=["2", "7"], sums=False)
    sums = observe(model, data, input_spec=spec, positives=40, only=["2", "7"])
    every = observe(model, data, input_spec=spec, positives=40)
    # their negatives and the two classes' images, for either strategy (issue #25: channels observed all)
    assert lean.timing["images"] == sums.timing["images"] < 0.4 * every.timing["images"]
    assert _bytes(build(lean, "paper"), tmp_path, "lean") == _bytes(build(sums, "paper"), tmp_path, "sums")
    assert len(build(sums, "channels", keep=0.5)) == 2


def test_fuzzed_observation_files_build_the_same_or_are_refused(setup, tmp_path):
    model, data, spec = setup
    obs = observe(model, data, input_spec=spec, positives=20, only=["3", "5"], sums=False)
    save_observation(obs, tmp_path / "obs.safetensors")
    x = torch.randn(4, 1, 8, 8)
    expected = [m.network(x) for m in build(obs, "paper")]

    def same_output(loaded, kind):
        assert all(torch.equal(m.network(x), e) for m, e in zip(build(loaded, "paper"), expected)), kind

    refused, same = fuzz_loads((tmp_path / "obs.safetensors").read_bytes(), 60, tmp_path, load_observation,
                               same_output, seed=3)
    assert refused + same == 60 and refused >= 50


def test_build_takes_its_strategys_dataclass_and_keywords_on_top(setup, tmp_path):
    model, data, spec = setup
    obs = observe(model, data, input_spec=spec, positives=20, only=["4"])
    with pytest.raises(CnnmodError, match="expected ChannelsOptions for the channels strategy, found PaperOptions"):
        build(obs, "channels", PaperOptions())
    both = build(obs, "channels", ChannelsOptions(keep=0.25), trunk=0.5)[0]
    assert both.meta["options"]["keep"] == 0.25 and both.meta["options"]["trunk"] == 0.5
