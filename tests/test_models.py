import pytest
import torch

from cnnmod import CnnmodError, create_model, list_models

# Parameter counts, computed by hand for option-B shortcuts (1x1 conv + BN when shapes change).
EXPECTED_PARAMS = {"resnet20": 272_474, "resnet32": 466_906, "resnet56": 855_770}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_maps_a_batch_to_logits(name):
    model = create_model(name, num_classes=7).eval()
    size = 28 if name == "smallcnn" else 32
    channels = 1 if name == "smallcnn" else 3
    out = model(torch.zeros(2, channels, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_resnet_parameter_counts(name):
    model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_resnet_without_batchnorm_has_no_batchnorm_and_biased_convs():
    model = create_model("resnet20", bn=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_depth_is_6n_plus_2():
    model = create_model("resnet56")
    convs = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 56  # + the linear layer


def test_smallcnn_parameter_count_and_other_sizes():
    model = create_model("smallcnn", num_classes=10)
    # conv 1*16*9, bn 32, conv 16*32*9, bn 64, hidden 1568*64+64, fc 64*10+10
    assert sum(p.numel() for p in model.parameters()) == 144 + 32 + 4608 + 64 + 100416 + 650
    assert create_model("smallcnn", image_size=8)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CnnmodError, match="expected a model name among"):
        create_model("vgg99")
