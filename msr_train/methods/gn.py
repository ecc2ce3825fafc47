"""GroupNorm (Wu & He, ECCV 2018, arXiv 1803.08494) in place of every BatchNorm, and
GroupNorm with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520), the recipe of
BiT (Kolesnikov et al., ECCV 2020, arXiv 1912.11370): the standard batch-independent
baselines. A GroupNorm normalises each example over groups of channels, so training
does not depend on the batch at all, and training and test compute the same function.

Choices (conf/method/gn.yaml, gn_ws.yaml):

- Groups: ``groups`` = 32 (Wu & He's default), but never fewer than ``min_group_channels``
  = 2 channels per group, the fewest in their networks (ResNet-50's 64-channel stage in 32
  groups); a count that does not divide the channels is lowered to the next divisor. CIFAR
  ResNets' 16-channel layers get 8 groups, 32 channels 16 groups, 64 and more 32.
- ``zero_init_last``: the last norm of every residual branch starts with gain 0, so every
  block starts as the identity (Goyal et al. 2017; timm's ``zero_init_last``). Off by
  default, as in Wu & He.
- Initialisation as ``bn`` (torchvision's): Kaiming normal (fan-out) convs, norm gains 1
  and biases 0; ResNet convs without bias, VGG's with.
- gn_ws: every conv uses the standardised weight (W - mean) / sqrt(var + ``ws_eps``) per
  output filter over its fan-in (Qiao et al.; no gain, the GroupNorm after it has one).
  Unlike nf's Scaled WS there is no gamma: the next GroupNorm restores the scale.
- Learning rate at batch 128, chosen on validation (3 seeds, docs/results.md): gn keeps
  bn's 0.1 (0.05-0.2 are level), gn_ws takes 0.2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..rules import flag, integer, number
from .base import Method
from .bn import kaiming_init_


def group_count(channels: int, groups: int, min_group_channels: int) -> int:
    """``groups``, lowered to keep ``min_group_channels`` per group and to divide ``channels``."""
    count = max(1, min(groups, channels // min_group_channels))
    while channels % count:
        count -= 1
    return count


class StdConv2d(nn.Conv2d):
    """A conv with Weight Standardization: per output filter, zero mean and unit variance
    over the fan-in, recomputed from the raw weight at every forward pass."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, *, bias: bool, eps: float):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class GroupNormMethod(Method):
    name = "gn"
    rules = {
        **Method.rules,
        "groups": integer(1, note="Wu & He: 32"),
        "min_group_channels": integer(1, note="fewer groups where a layer is narrow"),
        "zero_init_last": flag(note="the last norm of each residual branch starts at gain 0"),
    }

    def norm(self, channels, *, role="body"):
        layer = nn.GroupNorm(group_count(channels, self.cfg.groups, self.cfg.min_group_channels), channels)
        if role == "branch_end" and self.cfg.zero_init_last:
            nn.init.zeros_(layer.weight)
        return layer

    def initialize(self, model):
        kaiming_init_(model)


class GroupNormWS(GroupNormMethod):
    name = "gn_ws"
    rules = {**GroupNormMethod.rules, "ws_eps": number(0, 1, lo_open=True, note="added to each filter's variance")}

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        return StdConv2d(in_ch, out_ch, kernel_size, stride, bias=bias, eps=self.cfg.ws_eps)
