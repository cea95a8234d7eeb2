import pytest
import torch
import torch.nn as nn

from cnnmod import CnnmodError
from cnnmod.modules.observe import _adapt, sample_batches
from cnnmod.statistics import collect_statistics, observed_layers, select_sample
from cnnmod.bits import count, pack, unpack
from cnnmod.trace import GraphNetwork, trace_graph

from nets import PixelNet, Unfamiliar, pixel_data


def test_observed_layers_are_what_relus_receive():
    graph = trace_graph(Unfamiliar(), (1, 8, 8))
    # post-BN stem, the residual sum (not the pre-add pw output), side conv, grouped conv, hidden fc1;
    # dw feeds pw without a ReLU: not observed
    assert observed_layers(graph) == ["relu", "relu_1", "relu_2", "relu_3", "relu_4"]
    assert [graph.by_name[n].inputs[0] for n in observed_layers(graph)] == ["bn", "add", "side", "grouped", "fc1"]


def test_sample_follows_the_paper_budgets():
    labels = torch.arange(10).repeat_interleave(1200)  # 10 classes of 1,200 images
    s = select_sample(labels, 10)
    assert s.positives == 1000 and s.negatives_per_class == 111  # floor(1000 / 9)
    assert len(s.negatives) == 1110 and len(s.rest) == 10 * (1000 - 111)
    assert torch.equal(select_sample(labels, 10).rest, s.rest)  # fixed seeded rule
    assert not torch.equal(select_sample(labels, 10, seed=1).rest, s.rest)
    small = select_sample(torch.arange(3).repeat_interleave(40), 3)  # fewer than the budget
    assert small.positives == 40 and small.negatives_per_class == 20
    with pytest.raises(CnnmodError, match="found none of bee"):  # classes are named, never indexed
        select_sample(torch.tensor([0, 0, 2]), 3, names=["ant", "bee", "cat"])
    # a reuse needs only its own classes' images; the classes present serve as negatives, 1:1
    only = select_sample(torch.tensor([0] * 30 + [2] * 30), 3, required=[0, 2])
    assert only.positives == 30 and only.negatives_per_class == 30  # 30 // (2 present - 1)


def _per_class_loop_oracle(model, dataset, sample, num_classes, layers):
    """For each class separately: the images its module observes, counted on the graph's values."""
    x_all, y_all = dataset.tensors
    expected = []
    network = GraphNetwork(trace_graph(model, tuple(x_all.shape[1:])), model.state_dict())
    for c in range(num_classes):
        idx = torch.cat([sample.negatives, sample.rest])
        y = y_all[idx]
        is_neg = torch.zeros(len(idx), dtype=torch.bool)
        is_neg[: len(sample.negatives)] = True
        mine = idx[(y == c) | is_neg]  # P_c plus the negatives of every class
        with torch.no_grad():
            outs = network.run_all(x_all[mine])
        expected.append({n: (outs[n] > 0).sum(0) for n in layers})
    return expected


@pytest.mark.parametrize("num_classes, batch_size, shuffled", [(3, 7, False), (12, 64, False), (12, 64, True)])
def test_one_pass_counts_equal_a_per_class_loop(num_classes, batch_size, shuffled):
    """Few runs of one label, many, and batches whose labels come in any order (a label in two runs)."""
    torch.manual_seed(0)
    model = Unfamiliar(num_classes).eval()
    n = 6 * num_classes
    dataset = torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8), torch.arange(num_classes).repeat(6))
    graph = trace_graph(model, (1, 8, 8))
    sample = select_sample(dataset.tensors[1], num_classes, positives=5, negatives_per_class=2)
    labels, fetch = _adapt(dataset, None, None)
    batches = sample_batches(fetch, labels, sample, batch_size)
    if shuffled:
        def mixed(load, seed):
            x, y = load()
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            return x[order], y[order]
        batches = [(part, size, lambda load=load, i=i: mixed(load, i)) for i, (part, size, load) in enumerate(batches)]
        assert any(bool((y[1:] < y[:-1]).any()) for _, _, load in batches for y in [load()[1]])
    stats = collect_statistics(model, graph, batches, num_classes, sums=True)
    expected = _per_class_loop_oracle(model, dataset, sample, num_classes, stats.layers)
    for c in range(num_classes):
        got = stats.active(c)
        assert stats.observed(c) == 5 + 2 * (num_classes - 1)
        for name in stats.layers:
            assert torch.equal(got[name], expected[c][name] > 0), (c, name)  # the count-based decision
    # Oracle of the channel counts: per class, the non-zero elements of each channel over its images.
    x_all, y_all = dataset.tensors
    idx = torch.cat([sample.negatives, sample.rest])
    with torch.no_grad():
        outs = GraphNetwork(graph, model.state_dict()).run_all(x_all[idx])
    for name in stats.layers:
        per_image = (outs[name] != 0).flatten(2).sum(2) if outs[name].dim() > 2 else (outs[name] != 0).long()
        expected_counts = torch.zeros(num_classes, per_image.shape[1], dtype=torch.int64).index_add_(
            0, y_all[idx], per_image)
        assert torch.equal(stats.channel_counts[name], expected_counts), name


def test_exact_counts_on_the_pixel_net():
    model = PixelNet().eval()
    data = pixel_data()
    sample = select_sample(data.tensors[1], 3, positives=2, negatives_per_class=0)
    labels, fetch = _adapt(data, None, None)
    graph = trace_graph(model, (1, 2, 2))
    stats = collect_statistics(model, graph, sample_batches(fetch, labels, sample, 4), 3, sums=True)
    # class c's two images light pixel c of channel 0 (weight +1); channel 1 (weight -1) never fires
    for c in range(3):
        expected = torch.zeros(2, 2, 2, dtype=torch.bool)
        expected[0].view(-1)[c] = True
        assert torch.equal(stats.active(c)["relu"], expected)
        assert stats.channel_counts["relu"][c].tolist() == [2, 0]  # two images, one pixel each


def test_an_observer_belongs_to_one_run():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    network = GraphNetwork(trace_graph(model, (1, 2, 2)), model.state_dict())
    seen = []
    out = network(torch.ones(1, 1, 2, 2), after=lambda name, value: seen.append(name))
    assert seen == ["input", "0", "1", "2", "3"] and torch.equal(out, model(torch.ones(1, 1, 2, 2)))
    network(torch.ones(1, 1, 2, 2))
    assert len(seen) == 5  # the next run observes nothing


def test_a_graph_that_differs_from_the_model_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    graph = trace_graph(model, (1, 2, 2))
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
    labels, fetch = _adapt(data, None, None)
    sample = select_sample(labels, 2)
    with pytest.raises(CnnmodError, match="reproduce the model's outputs"):
        collect_statistics(_Shifted(model), graph, sample_batches(fetch, labels, sample, 4), 2)


class _Shifted(nn.Module):
    """Same weights (state dict) as ``inner`` but adds 1 to every output: untraced behaviour."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1.0

    def state_dict(self, *a, **k):
        return self.inner.state_dict(*a, **k)


def test_sums_give_the_exact_mean_value_on_the_pixel_net():
    # Class c's images light pixel c of channel 0 with 1 and 2; over the six images each of the
    # first three pixels of channel 0 averages (1 + 2) / 6 = 0.5, everything else 0.
    model = PixelNet().eval()
    data = pixel_data()
    sample = select_sample(data.tensors[1], 3, positives=2, negatives_per_class=0)
    labels, fetch = _adapt(data, None, None)
    graph = trace_graph(model, (1, 2, 2))
    stats = collect_statistics(model, graph, sample_batches(fetch, labels, sample, 4), 3, sums=True)
    expected = torch.zeros(2, 2, 2, dtype=torch.float64)
    expected[0].view(-1)[:3] = 0.5
    assert torch.equal(stats.mean("relu"), expected)


def test_bits_round_trip_and_or_like_the_bools():
    gen = torch.Generator().manual_seed(0)
    for e in (1, 7, 8, 9, 17, 64):
        a, b = torch.rand(3, e, generator=gen) < 0.5, torch.rand(3, e, generator=gen) < 0.5
        assert pack(a).shape == (3, (e + 7) // 8)
        assert torch.equal(unpack(pack(a), e), a)
        assert torch.equal(unpack(pack(a) | pack(b), e), a | b)
        assert count(pack(a)) == int(a.sum())
        expected = torch.zeros(3, (e + 7) // 8, dtype=torch.uint8)  # element i in bit i % 8 of byte i // 8
        for i in range(e):
            expected[:, i // 8] |= a[:, i].to(torch.uint8) << (i % 8)
        assert torch.equal(pack(a), expected)
    wide = torch.rand(2, 3 * 2**20, generator=gen) < 0.3  # several chunks of the one-multiply packing
    assert torch.equal(unpack(pack(wide), wide.shape[1]), wide)
    assert torch.equal(pack(wide[:, 8:16]), pack(wide[:, 8:16].clone()))  # a view that is not contiguous


def test_only_keeps_bits_for_the_named_classes():
    torch.manual_seed(0)
    model = Unfamiliar(4).eval()
    dataset = torch.utils.data.TensorDataset(torch.randn(24, 1, 8, 8), torch.arange(4).repeat(6))
    graph = trace_graph(model, (1, 8, 8))
    sample = select_sample(dataset.tensors[1], 4, positives=5, negatives_per_class=1)
    labels, fetch = _adapt(dataset, None, None)
    full = collect_statistics(model, graph, sample_batches(fetch, labels, sample, 5), 4)
    only = collect_statistics(model, graph, sample_batches(fetch, labels, sample, 5), 4, classes_kept=[2])
    assert all(len(only.active_rest[n]) == 1 for n in only.layers) and only.nbytes() < full.nbytes()
    assert all(torch.equal(only.active(2)[n], full.active(2)[n]) for n in full.layers)
    with pytest.raises(CnnmodError, match="class 0, found them left out"):
        only.active(0)


@pytest.mark.parametrize("lengths", [[256], [1, 255], [3, 1, 7, 2], [1] * 40 + [90], [5] * 12])
def test_or_runs_folds_each_run_to_the_any_of_its_images(lengths):
    """Oracle: per label, the OR of its images' elements (uneven runs split the batch; a -1 row is skipped)."""
    from cnnmod.statistics.collect import _or_runs

    gen = torch.Generator().manual_seed(len(lengths))
    y = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.rand(len(y), 77, generator=gen) > 0.97  # sparse: a missed image shows
    rows = torch.arange(len(lengths))
    rows[1 % len(lengths)] = -1 if len(lengths) > 1 else 0
    table = torch.zeros(len(lengths), 10, dtype=torch.uint8)
    _or_runs(table, rows, pos, y)
    for label, row in enumerate(rows.tolist()):
        if row >= 0:
            assert torch.equal(table[row], pack(pos[y == label].any(0)))
    if len(lengths) > 1:  # label 1 has no row: table row 1, no label's, stays empty
        assert not table[1].any()
