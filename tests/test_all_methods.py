"""Every architecture with every registered method, built from the shipped configs:
builds, takes three optimizer steps at batch 1 and at batch 32 with a finite loss (the
steps are train.py's, hooks included), and evaluates. Where BatchNorm cannot train on a
batch of one, the up-front check must say so instead.

ResNet-34 repeats ResNet-18's basic blocks, ResNet-101 / -152 repeat ResNet-50's
bottlenecks, ResNet-110 repeats ResNet-20's blocks and VGG-16 / -19 repeat VGG-11/13's
conv stacks: they exercise no code their smaller siblings do not, at several times the
cost, and run only when asked for: `pytest -m deep`.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import train_steps
from msr_train.checks import check_batchnorm_trainable
from msr_train.errors import ConfigError
from msr_train.methods import METHODS, build_method
from msr_train.models import ARCHITECTURES, build_model
from msr_train.optim import build_optimizer
from msr_train.train import evaluate

CONF = Path(__file__).resolve().parents[1] / "conf"
METHOD_CFGS = {name: OmegaConf.load(CONF / "method" / f"{name}.yaml") for name in METHODS}
OPTIMIZER_CFG = OmegaConf.load(CONF / "optimizer" / "sgd.yaml")
# The shipped lr is for batch 128; scale it down as a run at batch 1 or 32 would.
OPTIMIZER_CFG.lr_scaling = "linear"
SHAPE = (1, 16, 16)
NUM_CLASSES = 3
STEPS = 3
#: The largest models of each family that CI still runs take seconds each: slow.
#: Deep ones are slow too, so `-m "not slow"` (which replaces the default `-m "not deep"`)
#: leaves them out as well.
MARKS = {**dict.fromkeys(("resnet34", "resnet101", "resnet152", "resnet110", "vgg16", "vgg19"),
                         [pytest.mark.deep, pytest.mark.slow]),
         # Repeat resnet20's blocks, vgg11's stacks or are the one ImageNet basic-block net:
         # CI runs them, the quick loop (resnet8, resnet20, vgg11) does not.
         **dict.fromkeys(("resnet32", "resnet44", "resnet56", "vgg13", "resnet18", "resnet50"), pytest.mark.slow)}
MODELS = [pytest.param(name, marks=MARKS[name]) if name in MARKS else name for name in ARCHITECTURES]


pytestmark = pytest.mark.usefixtures("one_thread")


def batchnorm_fails_on_one_example(model, x1) -> bool:
    """PyTorch's own verdict, on a copy: does a training-mode forward on one example
    raise BatchNorm's "Expected more than 1 value per channel"?"""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(x1)
    except ValueError as e:
        assert "Expected more than 1 value per channel" in str(e)
        return True
    return False


def batch(size):
    return torch.randn(size, *SHAPE), torch.randint(0, NUM_CLASSES, (size,))


@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_trains_with_every_method(model_name, method_name):
    torch.manual_seed(0)
    method = build_method(METHOD_CFGS[method_name])
    model = build_model(model_name, method, in_channels=SHAPE[0], num_classes=NUM_CLASSES, image_size=SHAPE[1])
    for batch_size in (1, 32):
        if batch_size == 1 and batchnorm_fails_on_one_example(model, batch(1)[0]):
            with pytest.raises(ConfigError, match="BatchNorm") as err:
                check_batchnorm_trainable(model, batch_size, SHAPE)
            assert "batch_size" in str(err.value) and "method=" in str(err.value)  # names the fixes
            continue
        check_batchnorm_trainable(model, batch_size, SHAPE)
        optimizer_cfg = OmegaConf.merge(OPTIMIZER_CFG, {"lr": METHOD_CFGS[method_name].lr})  # the method's own lr
        optimizer = build_optimizer(optimizer_cfg, method.param_groups(model), batch_size)
        losses = train_steps(model, method, optimizer, [batch(batch_size) for _ in range(STEPS)])
        assert all(math.isfinite(v) for v in losses), losses
    metrics = evaluate(model, [batch(32)], NUM_CLASSES)
    assert math.isfinite(metrics["test_loss"]) and 0 <= metrics["test_acc"] <= 1
    assert model.training  # evaluate hands the model back in training mode
