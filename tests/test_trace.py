import pytest
import torch
import torch.nn as nn

from cnnmod import CnnmodError, create_model, list_models
from cnnmod.trace import Graph, GraphNetwork, trace_graph

from nets import Unfamiliar


def _input(name):
    return torch.randn(3, 1, 28, 28) if name == "smallcnn" else torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("name", list_models())
def test_graph_network_equals_the_model(name):
    model = create_model(name).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    graph = Graph.from_dict(trace_graph(model, tuple(_input(name).shape[1:])).to_dict())  # through JSON-able data
    x = _input(name)
    assert torch.allclose(GraphNetwork(graph, model.state_dict())(x), model(x), atol=1e-5)


def test_unfamiliar_architecture_is_traced_by_layer_kind():
    model = Unfamiliar().eval()
    graph = trace_graph(model, (1, 8, 8))
    ops = {n.name: n.op for n in graph.nodes}
    assert ops["dw"] == "conv" and graph.by_name["dw"].attrs["groups"] == 8
    assert "add" in ops.values() and "cat" in ops.values() and ops["pool"] == "maxpool"
    assert graph.by_name[graph.output].name == "fc2"
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(GraphNetwork(graph, model.state_dict())(x), model(x), atol=1e-5)


def test_untraceable_model_names_the_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 1, 1), Branchy())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(CnnmodError, match=r"test_trace.py:\d+ in module 'body.1' branches on the values of a "
                                          r"tensor \(data-dependent control flow\); compute the same operations"):
        trace_graph(Outer(), (1, 4, 4))


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(CnnmodError, match=r"cannot capture operation 'prelu' \(.*in module '1'.*\); the operations "
                                          r"cnnmod knows: .*conv2d"):
        trace_graph(model, (1, 4, 4))


def test_damaged_graph_is_refused():
    graph = trace_graph(create_model("smallcnn"), (1, 28, 28)).to_dict()
    graph["nodes"][3]["op"] = "exec"
    with pytest.raises(CnnmodError, match="unknown or uses a later layer"):
        Graph.from_dict(graph)


def test_a_new_activation_is_one_registry_entry():
    """Mish was added as one line of trace/ops.py: traced, run, observed and masked exactly."""
    from cnnmod import decompose
    from cnnmod.trace.ops import REGISTRY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Mish(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    graph = trace_graph(model, (1, 8, 8))
    assert [n.op for n in graph.nodes] == ["input", "conv", "mish", "flatten", "linear"]
    assert REGISTRY["mish"].activation
    x = torch.randn(12, 1, 8, 8)
    assert torch.allclose(GraphNetwork(graph, model.state_dict())(x), model(x), atol=1e-6)
    data = torch.utils.data.TensorDataset(x, torch.arange(3).repeat_interleave(4))
    modules = decompose(model, data, negatives_per_class=4, delta=1e9, calibration=0)
    with torch.no_grad():
        assert torch.allclose(modules[2].network(x)[:, 1], model(x)[:, 2], atol=1e-6)
