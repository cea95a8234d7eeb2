"""The channels strategy: channel spaces from the graph, exact physical extraction, small modules."""

import json

import torch

from cnnmod import TrainConfig, compose, create_model, decompose, load_data, load_model, load_module, save_module, train
from cnnmod.data.inputspec import measure_spec
from cnnmod.evaluate import evaluate_scores
from cnnmod.modules.extract import cost, extract, fold_batchnorm
from cnnmod.trace import GraphNetwork, overlaid, trace_graph
from cnnmod.trace.channels import channel_spaces

from nets import Branchy, Unfamiliar, random_removal


def _randomised(model):
    """A model with random BatchNorm statistics and affine terms, so that nothing cancels out."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def test_resnet_channel_spaces_tie_each_stage_and_free_each_branch():
    spaces = channel_spaces(trace_graph(create_model("resnet20"), (3, 32, 32)))
    of = spaces.of
    assert of["stem.2"] == of["blocks.0.relu"] == of["blocks.2.relu"]  # stage 1's residual stream
    assert of["blocks.3.relu"] == of["blocks.3.shortcut.1"] == of["blocks.5.relu"] != of["blocks.2.relu"]
    assert of["blocks.0.branch.2"] not in (of["blocks.0.relu"], of["blocks.1.branch.2"])  # inside a block
    assert len(spaces.prunable) == 3 + 9  # three residual streams, nine blocks' inner channels
    assert of["x"] not in spaces.prunable and of["fc"] not in spaces.prunable


def test_a_concatenation_read_by_a_grouped_convolution_keeps_its_sources_whole():
    spaces = channel_spaces(trace_graph(Unfamiliar(), (1, 8, 8)))
    assert spaces.prunable == set() and not spaces.derived
    assert sorted(spaces.whole.values()) == ["a grouped or depthwise convolution", "a linear layer's output",
                                             "read by cat 'cat', kept whole", "read by cat 'cat', kept whole"]


def test_channels_flow_through_concatenations_splits_and_shuffles():
    # Oracle: Inception's concatenation and ShuffleNet's split and shuffle, random channels removed
    # from every branch, random constants in their place: the smaller network (whose split and
    # shuffle pick the kept channels by index) gives the same logits.
    model = _randomised(Branchy())
    shape = (1, 8, 8)
    graph = trace_graph(model, shape)
    spaces = channel_spaces(graph)
    assert {n.op for n in spaces.derived.values()} == {"cat", "slice", "select"}  # split: slices; shuffle: select
    assert {spaces.of[n] for n in ("a", "b", "branch", "stem", "last")} == spaces.prunable
    shapes = GraphNetwork(graph, model.state_dict()).shapes(shape)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        keep = {s: torch.rand(shapes[spaces.relus[s][0]][0], generator=gen) < 0.5 for s in spaces.prunable}
        for k in keep.values():
            k[torch.randint(len(k), (1,), generator=gen)] = True  # a space keeps at least one channel
        masks = {r: keep[s].view(-1, 1, 1).expand(shapes[r]) for s in spaces.prunable for r in spaces.relus[s]}
        fills = {r: torch.rand(shapes[r], generator=gen) for r in masks}
        masked = overlaid(graph, model.state_dict(), masks=masks, fills=fills)
        small = extract(masked, spaces, keep, shape)
        x = torch.randn(6, *shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
        shuffle = small.graph.by_name["view_1"]
        kept = int(spaces.expand(keep, shapes)[spaces.of["view_1"]].sum())
        assert kept == 10 or (shuffle.op == "select" and len(shuffle.attrs["index"]) == kept)


def test_channels_modules_of_a_branchy_net_round_trip(tmp_path):
    data = load_data("digits", "train")
    spec = measure_spec(data.images)
    modules = decompose(_randomised(Branchy()), data, strategy="channels", keep=0.5, calibration=0,
                        positives=30, negatives_per_class=3, input_spec=spec)
    x = spec.prepare(data.images[:16])
    assert modules[0].meta["macs_fraction"] < 0.8
    save_module(modules[0], tmp_path / "m.safetensors")
    assert torch.equal(load_module(tmp_path / "m.safetensors").margin(x), modules[0].margin(x))


def test_extracted_network_computes_what_the_masked_network_computes():
    # Oracle: random channels removed per space and random constants in their place; the
    # physically smaller network must give the same logits on random inputs.
    for model, shape in [(_randomised(create_model("resnet20")), (3, 32, 32)),
                         (_randomised(create_model("smallcnn", image_size=28)), (1, 28, 28))]:
        graph = trace_graph(model, shape)
        spaces = channel_spaces(graph)
        full = GraphNetwork(graph, model.state_dict())
        gen = torch.Generator().manual_seed(1)
        keep, masked = random_removal(graph, model.state_dict(), shape, spaces, gen)
        small = extract(masked, spaces, keep, shape)
        x = torch.randn(5, *shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)
        assert cost(small, shape)["params"] < 0.6 * cost(full, shape)["params"]
        assert cost(small, shape)["macs"] < 0.6 * cost(full, shape)["macs"]


def test_folding_batchnorm_into_convolutions_changes_no_answer():
    # Oracle: an extracted network (with added constants) and the same network with every
    # conv -> BatchNorm pair folded into one convolution give the same logits, minus the BNs.
    model = _randomised(create_model("resnet20"))
    shape = (3, 32, 32)
    graph = trace_graph(model, shape)
    spaces = channel_spaces(graph)
    full = GraphNetwork(graph, model.state_dict())
    shapes = full.shapes(shape)
    gen = torch.Generator().manual_seed(2)
    keep = {s: torch.rand(shapes[spaces.relus[s][0]][0], generator=gen) < 0.7 for s in spaces.prunable}
    masks = {r: keep[s].view(-1, 1, 1).expand(shapes[r]) for s in spaces.prunable for r in spaces.relus[s]}
    fills = {r: torch.rand(shapes[r], generator=gen) for r in masks}
    small = extract(overlaid(graph, model.state_dict(), masks=masks, fills=fills), spaces, keep, shape)
    folded = fold_batchnorm(small)
    ops, before = [n.op for n in folded.graph.nodes], [n.op for n in graph.nodes]
    assert ops.count("bn") == 0 and ops.count("identity") == before.count("identity") + before.count("bn")
    assert not any(k.endswith("running_mean") for k in folded.weight_names)
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), small(x), rtol=1e-4, atol=1e-4)


def test_building_modules_never_writes_into_the_parents_tensors():
    # Modules share the parent's tensors (no copies); extraction and re-fits bind new ones.
    model = _randomised(create_model("smallcnn", num_classes=10, image_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_data("digits", "train")
    for strategy in ("paper", "channels"):
        decompose(model, data, strategy=strategy, calibration=0, positives=20, negatives_per_class=3,
                  input_spec=measure_spec(data.images))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keeping_every_channel_answers_exactly_like_the_model(tmp_path):
    data = load_data("digits", "train")
    train("smallcnn", data, tmp_path / "m.safetensors", TrainConfig(epochs=1, lr=0.05), progress=False)
    model = load_model(tmp_path / "m.safetensors")
    modules = decompose(model, data, strategy="channels", keep=1.0, calibration=0)
    # keep=1.0 removes nothing: each module is the model with the paper's channeled head, so the
    # composed vote answers exactly as the model does.
    composed = evaluate_scores(compose(modules, rule="vote").score_images, data, data.classes)
    direct = evaluate_scores(lambda x: model(model.input_spec.prepare(x)), data, data.classes)
    assert composed["top1"] == direct["top1"]


def test_channel_modules_are_small_and_their_files_round_trip(tmp_path):
    data, test = load_data("digits", "train"), load_data("digits", "test")
    train("smallcnn", data, tmp_path / "m.safetensors", TrainConfig(epochs=2, lr=0.05, batch_size=64), progress=False)
    model = load_model(tmp_path / "m.safetensors")
    modules = decompose(model, data, strategy="channels", keep=0.5)
    m = modules[4]
    assert 0.3 < m.meta["params_fraction"] < 0.6 and m.meta["macs_fraction"] < 0.4
    assert m.network.weight("features.0.weight").shape[0] == round(0.5 * 16)  # physically smaller
    save_module(m, tmp_path / "4.safetensors")
    again = load_module(tmp_path / "4.safetensors")
    x = m.input_spec.prepare(test.images[:16])
    assert torch.equal(again.network(x), m.network(x))
    result = evaluate_scores(compose(modules).score_images, test, test.classes)
    assert result["top1"] > 0.5  # far above chance (0.1); the benchmark measures the real numbers


def test_cli_decompose_channels_reports_sizes_and_inspect_shows_them(tmp_path, capsys):
    import json

    from cnnmod.cli import main

    ckpt = tmp_path / "d.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(ckpt), "--epochs", "1"]) == 0
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "m"), "--json",
                 "--strategy", "channels", "--keep", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["strategy"] == "channels"
    assert all(m["params_fraction"] < 0.6 and m["macs_fraction"] < 0.4 for m in summary["modules"].values())
    assert main(["inspect", str(tmp_path / "m" / "7.safetensors")]) == 0
    assert "multiply-accumulates" in capsys.readouterr().out
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "x"),
                 "--strategy", "channels", "--keep", "1.5"]) == 2
    assert "argument --keep: expected a share > 0 and <= 1, found 1.5" in capsys.readouterr().err


def test_modules_with_a_trunk_share_it_and_compose_runs_it_once(tmp_path, monkeypatch):
    data, test = load_data("digits", "train"), load_data("digits", "test")
    train("smallcnn", data, tmp_path / "m.safetensors", TrainConfig(epochs=1, lr=0.05), progress=False)
    model = load_model(tmp_path / "m.safetensors")
    # trunk=0.05: the first convolution's channels (10% of the MACs start there) are chosen alike
    # for every class; the second convolution's are chosen per class.
    modules = decompose(model, data, strategy="channels", keep=0.5, trunk=0.05, calibration=0)
    first = modules[0].network.weight("features.0.weight")
    assert all(torch.equal(m.network.weight("features.0.weight"), first) for m in modules)
    assert not torch.equal(modules[0].network.weight("features.4.weight"), modules[1].network.weight("features.4.weight"))
    clf = compose(modules, rule="vote")
    assert clf.trunk_layers() == [{"x", "features.0", "features.1", "features.2", "features.3"}]
    ran, step = [], GraphNetwork._step
    monkeypatch.setattr(GraphNetwork, "_step",
                        lambda self, node, *a: ran.append((self, node.name)) or step(self, node, *a))
    x = test.images[:32]
    scores = clf.score_images(x)
    seen = [[name for net, name in ran if net is m.network] for m in modules]
    assert "features.0" in seen[0] and all("features.0" not in s and "features.4" in s for s in seen[1:])  # once
    monkeypatch.undo()
    # Oracle: the shared trunk changes nothing; each module alone gives the same margins.
    alone = torch.stack([m.margin(m.input_spec.prepare(x)) for m in modules], 1)
    assert torch.equal(scores, alone)
    # Without a trunk every module prunes its first convolution its own way: nothing is shared.
    plain = decompose(model, data, strategy="channels", keep=0.5, calibration=0)
    assert compose(plain).trunk_layers() == [set()]


def test_cli_compose_and_inspect_report_the_shared_trunk(tmp_path, capsys):
    from cnnmod.cli import main

    ckpt = tmp_path / "d.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(ckpt), "--epochs", "1"]) == 0
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "m"), "--json",
                 "--strategy", "channels", "--keep", "0.5", "--trunk", "0.05", "--trunk-keep", "1.0"]) == 0
    capsys.readouterr()
    assert main(["compose", str(tmp_path / "m"), "--out", str(tmp_path / "c.safetensors")]) == 0
    assert "one shared trunk per parent" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "c.safetensors"), "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    # trunk-keep 1.0: the trunk is the parent's first convolution whole, its BatchNorm folded into
    # it (1 x 16 x 3 x 3 weights, 16 biases), run once instead of 10 times.
    assert cost["trunk_params"] == 16 * 9 + 16
    assert cost["macs"] == cost["separate_macs"] - 9 * cost["trunk_macs"]
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "x"),
                 "--strategy", "channels", "--trunk", "2"]) == 2
    assert "argument --trunk: expected a share >= 0 and <= 1, found 2" in capsys.readouterr().err


def test_shared_trunk_of_resnets_gives_each_network_its_own_output():
    # Oracle on the trunk machinery itself: three ResNet-20s that differ only in block 3's branch
    # and the head. Block 3's shortcut (in the trunk) reads, after the branch, what the branch reads.
    from cnnmod.compose.trunk import Group, run_group, shared_layers

    model = _randomised(create_model("resnet20"))
    graph, base = trace_graph(model, (3, 32, 32)), model.state_dict()
    gen = torch.Generator().manual_seed(2)
    nets = []
    for _ in range(3):
        w = {k: (v + 0.1 * torch.randn(v.shape, generator=gen) if k.startswith(("blocks.3.branch.", "fc.")) and
                 v.is_floating_point() and "running_var" not in k else v) for k, v in base.items()}
        nets.append(GraphNetwork(graph, w))
    trunk = shared_layers(nets)
    assert {"stem.0", "blocks.2.relu", "blocks.3.shortcut.0", "blocks.3.shortcut.1"} <= trunk
    assert "blocks.3.branch.0" not in trunk and "add_3" not in trunk and "fc" not in trunk
    group = Group([0, 1, 2], trunk, {n.name for n in graph.nodes} - trunk)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        for out, net in zip(run_group(group, nets, x), nets):
            assert torch.equal(out, net(x))


def test_energy_score_removes_a_constant_channel_first(tmp_path):
    # A channel whose BatchNorm scale is 0 is the same constant for every image: replacing it by
    # its mean changes nothing, so the energy score ranks it last and keep=15/16 removes it.
    data = load_data("digits", "train")
    train("smallcnn", data, tmp_path / "m.safetensors", TrainConfig(epochs=1, lr=0.05), progress=False)
    model = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        model.features[1].weight[3] = 0.0
        model.features[1].bias[3] = 0.7
    modules = decompose(model, data, strategy="channels", keep=15 / 16, score="energy", calibration=0)
    bn = model.features[1]  # folded into the convolution in the module
    parent_rows = model.features[0].weight * (bn.weight / (bn.running_var + bn.eps).sqrt()).view(-1, 1, 1, 1)
    for m in modules[:3]:
        kept = m.network.weight("features.0.weight")
        assert kept.shape[0] == 15
        torch.testing.assert_close(kept, torch.cat([parent_rows[:3], parent_rows[4:]]).detach())
    # retain: each space keeps the fewest best channels that hold that share of its score.
    few = decompose(model, data, strategy="channels", score="energy", retain=0.5, calibration=0)
    assert all(m.network.weight("features.0.weight").shape[0] < 15 for m in few)
    # ... the trunk's spaces too, chosen alike for every class: one shared trunk.
    shared = decompose(model, data, strategy="channels", score="energy", retain=0.5, trunk=1.0, calibration=0)
    assert shared[0].network.weight("features.0.weight").shape[0] < 15
    assert "features.4" in compose(shared).trunk_layers()[0]
    # multiple: every kept count rounded to a multiple of 8 (the parent's 16 and 32 channels are).
    blocks = decompose(model, data, strategy="channels", score="energy", retain=0.5, multiple=8, calibration=0)
    convs = [n.name for n in blocks[0].network.graph.nodes if n.op == "conv"]
    counts = {m.network.weight(f"{c}.weight").shape[0] for m in blocks for c in convs}
    assert counts and all(k % 8 == 0 for k in counts) and min(counts) < 32
    assert any(k % 8 for m in few for c in convs for k in [m.network.weight(f"{c}.weight").shape[0]])


def test_multiple_must_be_a_whole_number(tmp_path, capsys):
    from cnnmod.cli import main

    ckpt = tmp_path / "d.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--out", str(ckpt), "--epochs", "1"]) == 0
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "x"),
                 "--strategy", "channels", "--multiple", "0"]) == 2
    assert "argument --multiple: expected a whole number >= 1, found 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _trained_digits(tmp_path):
    data = load_data("digits", "train")
    train("smallcnn", data, tmp_path / "m.safetensors", TrainConfig(epochs=1, lr=0.05), progress=False)
    return load_model(tmp_path / "m.safetensors"), data


def test_shared_refits_are_computed_once_and_equal_fresh_ones(tmp_path):
    import dataclasses

    from cnnmod import build, observe
    from cnnmod.modules.strategies import channels_strategy

    model, data = _trained_digits(tmp_path)
    obs = observe(model, data)
    modules = build(obs, "channels", score="energy", retain=0.8, trunk=1.0)
    parent = obs.parent
    assert len(parent._refits) == 1 and len(next(iter(parent._refits.values()))) >= 2  # one trunk, its re-fits
    # Oracle: class 6's module built from scratch (no re-fit reused) is the same module, bit for bit.
    fresh, _ = channels_strategy(dataclasses.replace(parent, _refits={}), 6, score="energy", retain=0.8, trunk=1.0)
    assert fresh.weights().keys() == modules[6].network.weights().keys()
    assert all(torch.equal(w, modules[6].network.weight(k)) for k, w in fresh.weights().items())  # maps too
    # Without a trunk every class chooses its own channels: nothing can be reused.
    parent._refits.clear()
    build(obs, "channels", score="energy", retain=0.8)
    assert all(not cache for cache in parent._refits.values())


def test_refits_summed_in_chunks_equal_one_solve(tmp_path, monkeypatch):
    from cnnmod.modules import reconstruct

    model, data = _trained_digits(tmp_path)
    whole = decompose(model, data, strategy="channels", keep=0.5, calibration=0)
    monkeypatch.setattr(reconstruct, "CHUNK", 7)  # the normal equations summed over 7-image chunks
    chunked = decompose(model, data, strategy="channels", keep=0.5, calibration=0)
    for a, b in zip(whole, chunked):
        for k, w in a.network.weights().items():
            torch.testing.assert_close(b.network.weight(k), w, rtol=1e-4, atol=1e-5)


def test_only_builds_the_named_classes_on_their_images(tmp_path, capsys):
    from cnnmod.cli import main
    from cnnmod.errors import CnnmodError

    model, data = _trained_digits(tmp_path)
    test = load_data("digits", "test")
    pair = decompose(model, data, strategy="channels", score="energy", keep=0.5, trunk=1.0, only=["7", "3"],
                     sample_images=64, calibration=0)
    assert [m.class_name for m in pair] == ["3", "7"] and [m.class_index for m in pair] == [3, 7]
    assert pair[0].meta["only"] == ["3", "7"] and pair[0].meta["options"]["sample_images"] == 64
    clf = compose(pair, rule="vote")
    assert clf.trunk_layers()[0]  # the pair's own trunk, run once
    result = evaluate_scores(clf.score_images, test.only(["3", "7"]), ["3", "7"])
    assert result["top1"] > 0.8  # chance is 0.5; the benchmark measures the real numbers
    try:
        decompose(model, data, strategy="channels", only=["3", "cat"])
        raise AssertionError("an unknown class was accepted")
    except CnnmodError as e:
        assert "expected --only to name classes of the model" in str(e) and "cat" in str(e)
    ckpt = tmp_path / "m.safetensors"
    out = tmp_path / "pair"
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(out), "--strategy", "channels",
                 "--only", "3,7", "--sample-images", "64", "--json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["3.safetensors", "7.safetensors"]
    capsys.readouterr()
    assert main(["decompose", str(ckpt), "--data", "digits", "--out", str(tmp_path / "y"), "--strategy", "channels",
                 "--sample-images", "0"]) == 2
    assert "argument --sample-images: expected a whole number >= 1, found 0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
