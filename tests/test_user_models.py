"""Models as people write them (issue #23): the corpus (corpus.py) captured exactly, decomposed by
both strategies, extracted exactly; what is still refused names the line it comes from."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnmod import CnnmodError, decompose
from cnnmod.modules.extract import extract
from cnnmod.trace import Graph, GraphNetwork, overlaid, trace_graph
from cnnmod.trace.channels import channel_spaces

from corpus import CORPUS, randomised
from nets import random_removal

NAMES = sorted(CORPUS)


def _model(name):
    make, shape = CORPUS[name]
    torch.manual_seed(0)
    return randomised(make()), shape


@pytest.mark.parametrize("name", NAMES)
def test_the_captured_graph_computes_what_the_model_computes(name):
    model, shape = _model(name)
    graph = Graph.from_dict(json.loads(json.dumps(trace_graph(model, shape).to_dict())))  # as a file stores it
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1))  # another batch size than captured
    with torch.no_grad():
        assert (GraphNetwork(graph, model.state_dict())(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_both_strategies_decompose_and_paper_modules_are_exact_on_observed_images(name):
    model, shape = _model(name)
    x = torch.randn(30, *shape, generator=torch.Generator().manual_seed(2))
    data = torch.utils.data.TensorDataset(x, torch.arange(10).repeat(3))
    with torch.no_grad():
        logits = model(x)
    paper = decompose(model, data, negatives_per_class=3, delta=1e9, calibration=0)  # every image observed
    whole = decompose(model, data, negatives_per_class=3, calibration=0, strategy="channels", keep=1.0,
                      sample_images=30)
    small = decompose(model, data, negatives_per_class=3, calibration=0, strategy="channels", keep=0.5,
                      sample_images=30, only=["3"])
    with torch.no_grad():
        for c in (0, 3, 9):
            assert torch.allclose(paper[c].network(x)[:, 1], logits[:, c], atol=1e-6)  # the model's logit
            assert torch.allclose(whole[c].network(x)[:, 1], logits[:, c], atol=1e-4)
        assert torch.isfinite(small[0].network(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_extraction_through_slices_padding_and_shuffles_is_exact(name):
    """Oracle: random channels of every prunable space removed, random constants in their place;
    the physically smaller network (slices, shuffles and channel padding picking the kept channels
    by index) computes what the masked one does."""
    model, shape = _model(name)
    graph = trace_graph(model, shape)
    spaces = channel_spaces(graph)
    assert spaces.prunable, spaces.whole
    gen = torch.Generator().manual_seed(3)
    keep, masked = random_removal(graph, dict(model.state_dict()), shape, spaces, gen)
    small = extract(masked, spaces, keep, shape)
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)


def test_what_each_construct_becomes():
    """Option-A shortcuts: a strided spatial slice keeps the stream's channels, the channel padding is
    an index map tied to the block's output (kept whole, with the reason); the whole-map pooling
    written with a shape query is an average pooling over the 8x8 map."""
    graph = trace_graph(_model("cifar_resnet20")[0], (3, 32, 32))
    ops = {n.name: n for n in graph.nodes}
    assert [ops[n].op for n in ("layer2.0.shortcut", "layer2.0.shortcut:2", "layer2.0.shortcut:3")] == \
        ["slice", "slice", "pad"]
    assert ops["layer2.0.shortcut:3"].attrs == {"pad": [0, 0, 0, 0, 8, 8], "mode": "constant", "value": 0.0}
    assert next(n for n in graph.nodes if n.op == "avgpool").attrs["kernel_size"] == [8, 8]
    spaces = channel_spaces(graph)
    assert "pad tied to other channels" in spaces.whole.values()
    zero = trace_graph(_model("zero_channels")[0], (3, 6, 6))
    assert {n.op for n in channel_spaces(zero).derived.values()} == {"pad"}  # a derived space: pruned through
    split = channel_spaces(trace_graph(_model("split_shuffle")[0], (3, 8, 8)))
    assert {n.op for n in split.derived.values()} == {"slice", "select", "cat"}
    swish = trace_graph(_model("swish_block")[0], (3, 8, 8))  # x * x.sigmoid() is SiLU; normalising is a scale
    assert [n.op for n in swish.nodes[:6]] == ["input", "scale", "scale", "conv", "bn", "silu"]
    assert "sigmoid" in {n.op for n in swish.nodes} and channel_spaces(swish).prunable  # the gate stays a sigmoid
    eca = trace_graph(_model("channel_attention")[0], (3, 8, 8))  # squeeze, transpose, Conv1d and back
    assert [n.op for n in eca.nodes[3:7]] == ["adaptive_avgpool", "channel_conv", "sigmoid", "expand"]
    assert "a Conv1d across the channels" in channel_spaces(eca).whole.values()


def test_group_norm_is_one_registry_entry():
    """GroupNorm was added as one entry of trace/ops.py: per channel (a group a channel) its spaces
    are pruned, over groups of channels they are kept whole, with the reason."""
    from cnnmod.trace.ops import REGISTRY

    model, shape = _model("group_norm")
    graph = trace_graph(model, shape)
    norms = {n.name: n for n in graph.nodes if n.op == "group_norm"}
    assert sorted(norms) == ["gn0", "gn1", "gn2"] and norms["gn1"].attrs == {"groups": 16, "channels": 16, "eps": 1e-5}
    assert [REGISTRY["group_norm"].flow(norms[n]) for n in ("gn0", "gn1", "gn2")] == ["whole", "same", "whole"]
    spaces = channel_spaces(graph)
    assert spaces.of["gn1"] in spaces.prunable and "GroupNorm over groups of channels" in spaces.whole.values()


class _MixesRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        x = self.conv(x).view(x.size(0), 8, 4, 8)  # rows into channels
        return self.fc(F.relu(x).flatten(1))


class _CatsRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 8, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.cat([y, y * 2], dim=2).flatten(1))


class _MakesTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x) + torch.ones(1, 4, 1, 1)).mean((2, 3)))


class _PicksChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x))[:, [0, 2, 5]].mean((2, 3)))


class _FixesTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(2, -1))


@pytest.mark.parametrize("model, message", [
    (_PicksChannels(), r"cannot capture operation 'index' \(tests/test_user_models.py:\d+: .*\); pick channels with "
                       r"slices \(x\[:, a:b\]\), torch.split or chunk"),
    (_FixesTheBatch(), r"cannot capture the model: .* fixes or constrains the batch size; write the batch dimension as "
                       r"x.size\(0\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
     r"expected the model to take inputs of 3 x 8 x 8, found that it does not \(RuntimeError: mat1 and mat2"),
    (_MixesRows(), r"cannot capture a tensor reshaped off its \(channels, height, width\) layout \(tests/"
                   r"test_user_models.py:\d+: `return self.fc\(F.relu\(x\).flatten\(1\)\)`\); supported: flattening"),
    (_CatsRows(), r"cannot capture 'cat' as it is used here \(tests/test_user_models.py:\d+: `return self.fc\(torch"
                  r".cat\(\[y, y \* 2\], dim=2\).flatten\(1\)\)`\); expected a concatenation along the channels"),
    (_MakesTensors(), r"test_user_models.py:\d+: `return self.fc\(F.relu\(self.conv\(x\) \+ torch.ones"),
])
def test_what_is_refused_names_the_construct_and_its_line(model, message):
    with pytest.raises(CnnmodError, match=message):
        trace_graph(model.eval(), (3, 8, 8))


def test_graphs_of_earlier_versions_still_run():
    """Module files written before issue #23 store ShuffleNet's split and shuffle as ``chunk`` and
    ``shuffle`` nodes: they still run, and still flow channels."""
    graph = Graph.from_dict({"nodes": [
        {"name": "x", "op": "input", "inputs": []},
        {"name": "half", "op": "chunk", "inputs": ["x"], "attrs": {"chunks": 2, "index": 1}},
        {"name": "mixed", "op": "shuffle", "inputs": ["x"], "attrs": {"groups": 2}}], "output": "mixed"})
    x = torch.arange(4.0).view(1, 4, 1, 1)
    values = GraphNetwork(graph, {}).run_all(x)
    assert values["half"].flatten().tolist() == [2.0, 3.0] and values["mixed"].flatten().tolist() == [0, 2, 1, 3]


HOSTILE = {  # attributes a crafted file might give the new ops: too large, the wrong type, unknown names
    "pad": [{"pad": [10 ** 6] * 4}, {"pad": ["x"]}, {"pad": [1] * 10}, {"mode": "exec"}, {"value": "nan"}],
    "slice": [{"step": 0}, {"dim": 9}, {"start": 10 ** 30}, {"end": "x"}],
    "interpolate": [{"size": [10 ** 5, 10 ** 5]}, {"size": None, "scale": [1e9, 1e9]}, {"mode": "exec"}],
    "arithmetic": [{"fn": "__import__"}, {"value": "x"}],
    "clamp": [{"min": "x"}], "amax": [{"keepdim": "x"}],
    "select": [{"index": [10 ** 9]}, {"index": "x"}],
    "group_norm": [{"groups": 0}, {"groups": 3}, {"channels": "x"}],
    "channel_conv": [{"padding": [10 ** 6]}, {"dilation": [0]}, {"padding": "x"}],
    "expand": [{"size": [10 ** 5, 10 ** 5]}, {"size": [3]}],
}


@pytest.mark.parametrize("name", ["upsampling", "split_shuffle", "group_norm", "channel_attention"])
def test_hostile_attributes_of_the_new_ops_are_refused_or_harmless(name, tmp_path):
    """Loading runs no code of the model's: a graph is registry names with data. A crafted file (its
    checksum recomputed) whose new ops carry hostile attributes is refused in one sentence, or loads
    and computes finite outputs of the right shape; never another exception, a hang or a huge tensor."""
    from cnnmod import load_module, save_module
    from fuzzing import _join, _recheck, _split

    model, shape = _model(name)
    x = torch.randn(20, *shape, generator=torch.Generator().manual_seed(4))
    module = decompose(model, torch.utils.data.TensorDataset(x, torch.arange(10).repeat(2)), calibration=0,
                       only=["1"])[0]
    save_module(module, tmp_path / "m.safetensors")
    header, data = _split((tmp_path / "m.safetensors").read_bytes())
    tried, refused = 0, []
    for index, node in enumerate(json.loads(header["__metadata__"]["cnnmod"])["graph"]["nodes"]):
        for attrs in HOSTILE.get(node["op"], []):
            h = json.loads(json.dumps(header))
            meta = json.loads(h["__metadata__"]["cnnmod"])
            meta["graph"]["nodes"][index]["attrs"].update(attrs)
            h["__metadata__"]["cnnmod"] = json.dumps(meta, sort_keys=True)
            path = tmp_path / f"hostile{tried}.safetensors"
            path.write_bytes(_join(_recheck(h, data), data))
            tried += 1
            try:
                loaded = load_module(path)
            except CnnmodError as e:
                refused.append(str(e))
                continue
            with torch.no_grad():
                out = loaded.network(x[:2])
            assert out.shape == (2, 2) and torch.isfinite(out).all(), (node["op"], attrs)
    print(f"{name}: {len(refused)} of {tried} refused", *refused, sep="\n")
    assert tried >= 5 and len(refused) >= tried // 2  # the rest (an unused attribute changed) compute as before


class _MovesElements(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        a = F.pad(F.relu(self.a(x))[:, :, 1:, ::2], (0, 0, 0, 0, 1, 1))  # (6, 5, 3): zero channels around a crop
        b = F.max_pool2d(F.relu(self.b(x)), 2, ceil_mode=True)  # (2, 3, 3)
        return self.fc(torch.cat([a[:, :, 1:4], b], 1).flatten(1))


def test_mc_bln_back_tracks_through_slices_padding_and_concatenation_exactly():
    """Oracle: zero the observed elements back-tracking names; every removed feature is then 0."""
    from cnnmod.concerns import backtrack_removed

    model = _MovesElements().eval()
    graph = trace_graph(model, (3, 6, 6))
    shapes = GraphNetwork(graph, model.state_dict()).shapes((3, 6, 6))
    observed = {n.name for n in graph.nodes if n.op == "relu"}
    head_input = graph.by_name[graph.output].inputs[0]
    removed = torch.rand(72, generator=torch.Generator().manual_seed(5)) < 0.5
    stopped: dict = {}
    gone = backtrack_removed(graph, head_input, removed, observed, shapes, stopped)
    assert set(gone) == observed and not stopped
    masks = {name: ~g for name, g in gone.items()}
    with torch.no_grad():
        values = overlaid(graph, model.state_dict(), masks=masks).run_all(torch.randn(4, 3, 6, 6))
    assert (values[head_input][:, removed] == 0).all() and (values[head_input][:, ~removed] != 0).any()


def test_mc_bln_says_where_it_stops():
    from cnnmod.concerns import backtrack_removed

    class Upsampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 1), nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(F.interpolate(F.relu(self.conv(x)), scale_factor=2).flatten(1))

    model = Upsampled().eval()
    graph = trace_graph(model, (1, 2, 2))
    shapes = GraphNetwork(graph, model.state_dict()).shapes((1, 2, 2))
    stopped: dict = {}
    gone = backtrack_removed(graph, graph.by_name["fc"].inputs[0], torch.ones(32, dtype=torch.bool), {"relu"},
                             shapes, stopped)
    assert gone == {} and list(stopped.values()) == ["MC-BLN cannot see through interpolate 'upsample_nearest2d'"]


class _LogProbabilities(nn.Module):
    """MNIST-example style: spatial sums, and log-probabilities returned instead of logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return F.log_softmax(self.fc(F.relu(self.conv(x)).sum((2, 3)) / 36), dim=1)


def test_a_model_returning_log_probabilities_decomposes_with_the_logits_margins():
    """log_softmax shifts every logit alike: a module's margin z_c - mean of the others is the same
    whether read off the logits or the log-probabilities."""
    torch.manual_seed(0)
    model = _LogProbabilities().eval()
    x = torch.randn(16, 1, 8, 8)
    assert [n.op for n in trace_graph(model, (1, 8, 8)).nodes][-3:] == ["arithmetic", "linear", "log_softmax"]
    data = torch.utils.data.TensorDataset(x, torch.arange(4).repeat(4))
    modules = decompose(model, data, negatives_per_class=4, calibration=0, delta=1e9)  # every image observed
    with torch.no_grad():
        lp = model(x)
        for c in range(4):
            others = torch.cat([lp[:, :c], lp[:, c + 1:]], 1).mean(1)
            assert torch.allclose(modules[c].margin(x), lp[:, c] - others, atol=1e-5)


def test_a_checkpoint_of_a_model_that_does_not_return_logits_is_refused(tmp_path):
    from cnnmod import InputSpec, save_checkpoint

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 10, 3, padding=1)

        def forward(self, x):
            return F.adaptive_avg_pool2d(self.conv(x), 1)  # (B, 10, 1, 1), not (B, 10)

    spec, names = InputSpec(3, (8, 8), (0.5,) * 3, (0.25,) * 3), [str(d) for d in range(10)]
    with pytest.raises(CnnmodError, match=r"expected a model returning one tensor of logits \(batch, classes\), "
                                          r"found \(10, 1, 1\)"):
        save_checkpoint(Features().eval(), tmp_path / "f.safetensors", classes=names, input_spec=spec)
    model = Features().train()
    model.conv.eval()
    with pytest.raises(CnnmodError, match="found tuple"):
        save_checkpoint(nn.Sequential(model, _Pair()), tmp_path / "g.safetensors", classes=names, input_spec=spec)
    assert model.training and not model.conv.training  # each module's mode as the user left it
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "g.safetensors").exists()


class _Pair(nn.Module):
    def forward(self, x):
        return x.flatten(1), x
