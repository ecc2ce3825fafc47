"""GroupNorm and GroupNorm + Weight Standardization: against independent computations,
batch independence, and the group-count rule."""

import pytest
import torch
from torch import nn

from conftest import method_cfg
from msr_train.methods import build_method
from msr_train.methods.gn import StdConv2d, group_count
from msr_train.models import build_model
from msr_train.models.resnet import ResidualBlock


def model(name, **overrides):
    torch.manual_seed(0)
    return build_model("resnet20", build_method(method_cfg(name, **overrides)), in_channels=3, num_classes=10,
                       image_size=16).double()


@pytest.mark.parametrize("channels,groups", [(16, 8), (32, 16), (64, 32), (256, 32), (24, 12), (10, 5), (3, 1)])
def test_group_count_keeps_two_channels_per_group_and_divides_the_channels(channels, groups):
    assert group_count(channels, 32, 2) == groups


@pytest.mark.parametrize("name", ["gn", "gn_ws"])
def test_every_norm_computes_group_norm_by_hand(name):
    net = model(name)
    seen = []
    # Outputs cloned: the in-place ReLU after a norm overwrites them.
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0], out.clone())))
             for m in net.modules() if isinstance(m, nn.GroupNorm)]
    with torch.no_grad():
        for m in net.modules():  # non-trivial affine parameters
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_()
                m.bias.normal_()
        net(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert len(seen) == 19  # stem + 9 blocks x 2
    for m, x, out in seen:
        n, c = x.shape[:2]
        g = x.reshape(n, m.num_groups, -1)
        expected = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + m.eps))
        expected = expected.reshape(x.shape) * m.weight[:, None, None] + m.bias[:, None, None]
        assert torch.allclose(out, expected, atol=1e-10)


def test_standardized_weights_have_zero_mean_and_unit_variance_per_filter():
    conv = StdConv2d(8, 16, 3, bias=False, eps=0.0).double()
    with torch.no_grad():
        conv.weight.mul_(5).add_(3)
    w = conv.standardized_weight().flatten(1)
    assert torch.allclose(w.mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(w.var(1, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, conv.standardized_weight(), padding=1))


@pytest.mark.parametrize("name", ["gn", "gn_ws"])
def test_training_is_batch_independent(name):
    net = model(name).train()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    together = net(x)
    alone = torch.cat([net(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-10)


def test_zero_init_last_makes_every_block_start_as_its_shortcut():
    net = model("gn", zero_init_last="true")
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    ends = [[m for m in b.branch.modules() if isinstance(m, nn.GroupNorm)][-1] for b in blocks]
    assert len(blocks) == 9 and all(torch.count_nonzero(end.weight) == 0 for end in ends)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    assert torch.count_nonzero(blocks[0].branch(x)) == 0
    assert all(torch.count_nonzero(m.weight) == m.weight.numel() for m in net.modules()
               if isinstance(m, nn.GroupNorm) and all(m is not e for e in ends))
