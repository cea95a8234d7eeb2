"""Every torchvision/timm CNN family (smallest member, random weights, small input) decomposes.

For each: the traced graph computes what the model computes; paper-strategy modules give, on the
images they observed, exactly the model's logit for their class and the mean of the others (the
masks only zero elements that were zero); module files load without the model's code and give
what the in-memory module gives; the channels strategy decomposes (the extracted network's
exactness against the masked parent is checked on ResNets and hand-built nets in test_channels).
"""

import pytest
import torch

from cnnmod import Dataset, InputSpec, decompose, load_module, save_module
from cnnmod.trace import Graph, GraphNetwork, trace_graph

from nets import random_removal
from zoo import ZOO, create

NO_BLN = 1e9  # an MC-BLN threshold no weight reaches: the exactness check covers the masks alone
# Files of 230-530 MB: their round trip is left to the others (the same operations).
LARGE_FILES = {"vgg11", "vgg11_bn", "alexnet", "wide_resnet50_2"}
# The channels strategy takes 10-35 s on each of these on 2 cores; vgg11_bn covers VGG.
SLOW_CHANNELS = {"vgg11", "wide_resnet50_2"}


@pytest.mark.parametrize("library, name, size", ZOO, ids=[f"{lib}:{name}" for lib, name, _ in ZOO])
def test_zoo_model_decomposes(library, name, size, tmp_path):
    model = create(library, name, num_classes=3)
    graph = Graph.from_dict(trace_graph(model, (3, size, size)).to_dict())  # through JSON-able data
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(GraphNetwork(graph, model.state_dict())(x), model(x), atol=1e-4, rtol=1e-4)

    gen = torch.Generator().manual_seed(2)
    data = Dataset(torch.randint(0, 256, (12, 3, size, size), dtype=torch.uint8, generator=gen),
                   torch.arange(3).repeat_interleave(4), ["0", "1", "2"])
    spec = InputSpec(3, (size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    modules = decompose(model, data, input_spec=spec, negatives_per_class=4, delta=NO_BLN, calibration=0)
    prepared = spec.prepare(data.images)  # every module observed every image (4 negatives of each class)
    with torch.no_grad():
        z = model(prepared)
        for c, m in enumerate(modules):
            out = m.network(prepared)
            others = torch.cat([z[:, :c], z[:, c + 1:]], 1).mean(1)
            assert torch.allclose(out[:, 1], z[:, c], atol=1e-4, rtol=1e-4)
            assert torch.allclose(out[:, 0], others, atol=1e-4, rtol=1e-4)
    assert 0 < modules[0].meta["share_kept"] <= 1

    if name not in LARGE_FILES:
        save_module(modules[1], tmp_path / "paper.safetensors")
        loaded = load_module(tmp_path / "paper.safetensors")
        assert torch.equal(loaded.margin(prepared), modules[1].margin(prepared))
    if name in SLOW_CHANNELS:
        return
    small = decompose(model, data, input_spec=spec, strategy="channels", keep=0.5, sample_images=12, calibration=0)
    assert all(0 < m.meta["params_fraction"] <= 1 for m in small)
    if name not in LARGE_FILES:
        save_module(small[2], tmp_path / "channels.safetensors")
        loaded = load_module(tmp_path / "channels.safetensors")
        assert torch.equal(loaded.margin(prepared), small[2].margin(prepared))


@pytest.mark.parametrize("library, name", [("torchvision", "mobilenet_v3_small"), ("torchvision", "regnet_y_400mf"),
                                           ("timm", "efficientnet_b0"), ("torchvision", "googlenet"),
                                           ("torchvision", "shufflenet_v2_x0_5")])
def test_extracted_zoo_network_computes_what_the_masked_network_computes(library, name):
    """Oracle of the channels strategy on the zoo's ops: random channels of every prunable space
    removed, random constants in their place; the physically smaller network gives the same logits."""
    from cnnmod.modules.extract import extract
    from cnnmod.trace.channels import channel_spaces
    from cnnmod.trace.network import weights_of

    model = create(library, name, num_classes=3)
    graph = trace_graph(model, (3, 32, 32))
    spaces = channel_spaces(graph)
    assert spaces.prunable  # something to remove
    pruned = {n for s in spaces.prunable for n in spaces.members(s)}
    if name in ("mobilenet_v3_small", "efficientnet_b0"):  # MBConv: pruned through the depthwise
        assert any(graph.by_name[n].attrs.get("depthwise") for n in pruned)  # convolution and the
        assert any(graph.by_name[n].op == "mul" for n in pruned)  # squeeze-excitation's x * gate
    if name in ("googlenet", "shufflenet_v2_x0_5"):  # Inception's concatenations; ShuffleNet's split and shuffle
        derived = {n.op for n in spaces.derived.values()}
        # ShuffleNet's split is captured as slices, its shuffle as a select of channels
        assert derived == ({"cat"} if name == "googlenet" else {"cat", "slice", "select"})
    gen = torch.Generator().manual_seed(1)
    keep, masked = random_removal(graph, weights_of(model), (3, 32, 32), spaces, gen)
    small = extract(masked, spaces, keep, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)
