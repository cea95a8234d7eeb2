"""The torchvision and timm models the zoo test decomposes, and a safe import of torchvision.

torchvision's wheel on this machine is built against CUDA torch: ``import torchvision`` fails
beside the CPU torch build because its compiled operators (``torchvision::nms``, ...) cannot be
registered, while its model definitions are pure Python. ``import_torchvision`` skips the
registration of ``torchvision::`` operators during the import. Tests only: users with a normal
torchvision install need nothing of the kind.
"""

import sys

import pytest
import torch


def import_torchvision():
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    real = torch.library.register_fake

    def skip_torchvision_ops(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn: fn
        return real(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops
    try:
        return pytest.importorskip("torchvision")
    finally:
        torch.library.register_fake = real


# (library, name, input size): the smallest member of each family, at the smallest input it takes.
ZOO = [
    ("torchvision", "resnet18", 32), ("torchvision", "resnext50_32x4d", 32), ("torchvision", "wide_resnet50_2", 32),
    ("torchvision", "vgg11", 32), ("torchvision", "vgg11_bn", 32), ("torchvision", "alexnet", 64),
    ("torchvision", "densenet121", 32), ("torchvision", "googlenet", 32), ("torchvision", "inception_v3", 75),
    ("torchvision", "mobilenet_v2", 32), ("torchvision", "mobilenet_v3_small", 32), ("torchvision", "mnasnet0_5", 32),
    ("torchvision", "efficientnet_b0", 32), ("torchvision", "efficientnet_v2_s", 32),
    ("torchvision", "regnet_x_400mf", 32), ("torchvision", "regnet_y_400mf", 32), ("torchvision", "squeezenet1_0", 64),
    ("torchvision", "convnext_tiny", 32), ("torchvision", "shufflenet_v2_x0_5", 32),
    ("timm", "resnet18", 32), ("timm", "resnet18d", 32), ("timm", "efficientnet_b0", 32),
    ("timm", "mobilenetv3_small_050", 32), ("timm", "regnety_002", 32), ("timm", "convnext_atto", 32),
    # TF-ported weights' "same" padding computed from the input's size, and GroupNorm (issue #23)
    ("timm", "tf_mobilenetv3_small_minimal_100", 32), ("timm", "test_efficientnet_gn", 32),
]


def create(library: str, name: str, num_classes: int) -> torch.nn.Module:
    """A random-weight model of the zoo with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    if library == "torchvision":
        models = import_torchvision().models
        extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = getattr(models, name)(num_classes=num_classes, **extra)
    else:
        import_torchvision()  # timm imports torchvision
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, num_classes=num_classes, pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
