"""MimicNorm: zero-mean filters through training, the last BN on the logits, branch
scalars, and the batch-of-one check. Expectations follow docs/methods.md ("mimicnorm")."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_cfg
from msr_train.checks import check_batchnorm_trainable
from msr_train.errors import ConfigError
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.models.resnet import ResidualBlock
from msr_train.train import train


def mimicnorm_model(name, *overrides, num_classes=10, image_size=32, small_input="auto"):
    method = build_method(make_cfg("method=mimicnorm", *(f"method.{o}" for o in overrides)).method)
    return method, build_model(name, method, in_channels=3, num_classes=num_classes, image_size=image_size,
                               small_input=small_input)


def projected_convs(model):
    """The convs the default config projects: fan-in in*kh*kw above 50, as the authors' code."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)
            and m.in_channels * m.kernel_size[0] * m.kernel_size[1] > 50]


def assert_zero_mean(convs):
    for conv in convs:
        w = conv.weight.detach().double().flatten(1)
        assert (w.mean(1).abs() <= 1e-6 * w.norm(dim=1)).all()


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg11"])
def test_filters_stay_zero_mean_through_sgd_steps(name):
    torch.manual_seed(0)
    method, model = mimicnorm_model(name, image_size=16)
    convs = projected_convs(model)
    others = [m for m in model.modules() if isinstance(m, nn.Conv2d) and all(m is not c for c in convs)]
    assert convs and others  # the 3-channel stem (fan-in 27) is left alone
    assert_zero_mean(convs)
    opt = torch.optim.SGD(method.param_groups(model), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        method.before_step(model, opt)
        opt.step()
        method.after_step(model, opt)
        opt.zero_grad()
        assert_zero_mean(convs)
    for conv in others:
        assert conv.weight.detach().flatten(1).mean(1).abs().max() > 1e-3


def test_every_conv_is_projected_with_min_fan_in_zero():
    _, model = mimicnorm_model("resnet20", "min_fan_in=0")
    assert_zero_mean([m for m in model.modules() if isinstance(m, nn.Conv2d)])


def test_conv_init_scale():
    torch.manual_seed(0)
    _, model = mimicnorm_model("resnet18")
    conv = model.stages[3][1].branch[0]  # 512 x 512 x 3 x 3: plenty of samples
    fan_in = 512 * 9
    # The authors' CIFAR init, N(0, 2 / fan_in), with no extra 1.2.
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.01)
    assert (conv.bias == 0).all()


@pytest.mark.parametrize("name,small_input", [("resnet20", True), ("vgg11", True), ("vgg11", False)])
def test_last_module_is_an_affine_free_batchnorm_on_the_logits(name, small_input):
    torch.manual_seed(0)
    image_size = 32
    _, model = mimicnorm_model(name, num_classes=7, image_size=image_size, small_input=small_input)
    modules = list(model.modules())
    bn, linear = modules[-1], modules[-2]
    assert type(bn) is nn.BatchNorm1d and not bn.affine and bn.num_features == 7
    assert isinstance(linear, nn.Linear) and linear.out_features == 7

    features = []
    linear.register_forward_pre_hook(lambda m, inp: features.append(inp[0].detach()))
    x = torch.randn(6, 3, image_size, image_size)
    model.train()
    out = model(x)
    z = F.linear(features[-1], linear.weight, linear.bias)
    expected = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    model.eval()
    out = model(x)
    z = F.linear(features[-1], linear.weight, linear.bias)
    torch.testing.assert_close(out, (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,convs_per_branch", [("resnet20", 2), ("resnet50", 3)])
def test_branch_scalars_start_at_1_2_power_over_block_index(name, convs_per_branch):
    _, model = mimicnorm_model(name)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    gains = [b.branch[-1].gain for b in blocks]
    assert all(g.requires_grad for g in gains)
    assert [g.item() for g in gains] == pytest.approx([1.2 ** convs_per_branch / i for i in range(1, len(blocks) + 1)])


def test_batch_of_one_is_refused_with_a_clear_message(tmp_path):
    _, model = mimicnorm_model("resnet20", image_size=16)
    with pytest.raises(ConfigError, match="BatchNorm") as err:
        check_batchnorm_trainable(model, 1, (3, 16, 16))
    assert "logits" in str(err.value) and "batch_size" in str(err.value)
    check_batchnorm_trainable(model, 2, (3, 16, 16))

    # Through the real loop: refused before the first step, by the method's own check.
    cfg = make_cfg("debug=quick", "method=mimicnorm", "dataset.image_size=8", "dataset.synthetic_train=16",
                   "dataset.synthetic_test=16", "batch_size=1", "epochs=1", "method.min_micro_batch=2")
    with pytest.raises(ConfigError, match="method.min_micro_batch"):
        train(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("batch_size,accumulate", [(2, 1), (3, 1), (8, 4)])
def test_micro_batches_it_cannot_learn_from_are_refused_before_training(tmp_path, batch_size, accumulate):
    cfg = make_cfg("debug=quick", "method=mimicnorm", "dataset.image_size=8", "dataset.synthetic_train=64",
                   "dataset.synthetic_test=16", "dataset.val_size=16", f"batch_size={batch_size}",
                   f"trainer.accumulate={accumulate}", "epochs=1")
    with pytest.raises(ConfigError, match="method.min_micro_batch") as err:
        train(cfg, tmp_path)
    assert f"from {batch_size // accumulate} example(s)" in str(err.value) and "method=msr" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()
