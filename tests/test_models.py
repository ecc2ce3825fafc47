"""Architectures: parameter parity with torchvision, shapes for every input size we serve."""

import pytest
import torch
import torchvision

from conftest import method_cfg
from msr_train.methods import build_method
from msr_train.methods.none import NoNorm
from msr_train.models import ARCHITECTURES, build_model


def bn():
    """BatchNorm at its shipped defaults (conf/method/bn.yaml)."""
    return build_method(method_cfg("bn"))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,reference", [
    ("resnet18", "resnet18"), ("resnet34", "resnet34"), ("resnet50", "resnet50"),
    *(pytest.param(n, n, marks=pytest.mark.slow) for n in ("resnet101", "resnet152")),  # seconds each
    *(pytest.param(n, f"{n}_bn", marks=pytest.mark.slow) for n in ("vgg11", "vgg13", "vgg16", "vgg19")),
])
def test_bn_parameter_count_equals_torchvision(name, reference):
    ours = build_model(name, bn(), in_channels=3, num_classes=1000, image_size=224)
    theirs = getattr(torchvision.models, reference)(weights=None)
    assert n_params(ours) == n_params(theirs)
    # Same tensors, not just the same total: compare the sorted parameter shapes.
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in theirs.parameters())


@pytest.mark.parametrize("depth,expected", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_sizes_match_he_et_al(depth, expected):
    # He et al. 2016, table 6: 0.27M, 0.85M, 1.7M parameters.
    model = build_model(f"resnet{depth}", bn(), in_channels=3, num_classes=10, image_size=32)
    assert abs(n_params(model) - expected) / expected < 0.03


def test_cifar_resnet_has_option_a_shortcuts():
    model = build_model("resnet20", bn(), in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)  # no 1x1 projection


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_every_model_serves_small_images(name, size, channels):
    model = build_model(name, NoNorm(), in_channels=channels, num_classes=7, image_size=size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_small_input_stem_choice():
    small = build_model("resnet18", bn(), in_channels=3, num_classes=10, image_size=32)
    large = build_model("resnet18", bn(), in_channels=3, num_classes=10, image_size=224)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert large.stem[0].kernel_size == (7, 7) and isinstance(large.stem[-1], torch.nn.MaxPool2d)
