"""ResNets built from a method's layer factories.

- CIFAR ResNets (He, Zhang, Ren, Sun 2016, arXiv 1512.03385, section 4.2): widths
  16/32/64, depth 6n+2, basic blocks, option-A shortcuts (stride-2 subsampling plus
  zero-padded channels).
- ImageNet ResNets (same paper, table 1; torchvision's layout, stride on the 3x3 conv of
  the bottleneck): 18/34 with basic blocks, 50/101/152 with bottlenecks, 1x1 conv
  projection shortcuts at transitions. Inputs of 64 px or less get a small-image stem
  (3x3 stride-1 conv, no max-pool) instead of the 7x7 stride-2 conv and max-pool.

Every conv, norm, activation, branch end, residual merge and the classifier come from the
method (see ``msr_train.methods.base``), so one architecture serves every method.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..methods.base import BlockPosition, Method


class ResidualBlock(nn.Module):
    """A residual block; the method's ``join`` decides how branch and shortcut combine."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module, join: nn.Module):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.join = join

    def forward(self, x):
        return self.join(x, self.branch, self.shortcut)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_ch - in_ch
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x):
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


def basic_branch(method: Method, in_ch: int, out_ch: int, stride: int, position: BlockPosition) -> nn.Sequential:
    return nn.Sequential(
        method.conv(in_ch, out_ch, 3, stride), method.norm(out_ch), method.act(),
        method.conv(out_ch, out_ch, 3), method.norm(out_ch, role="branch_end"),
        method.branch_end(position),
    )


def bottleneck_branch(method: Method, in_ch: int, out_ch: int, stride: int,
                      position: BlockPosition) -> nn.Sequential:
    width = out_ch // Bottleneck.expansion
    return nn.Sequential(
        method.conv(in_ch, width, 1), method.norm(width), method.act(),
        method.conv(width, width, 3, stride), method.norm(width), method.act(),
        method.conv(width, out_ch, 1), method.norm(out_ch, role="branch_end"),
        method.branch_end(position),
    )


class Basic:
    expansion, convs = 1, 2
    branch = staticmethod(basic_branch)


class Bottleneck:
    expansion, convs = 4, 3
    branch = staticmethod(bottleneck_branch)


def shortcut(method: Method, in_ch: int, out_ch: int, stride: int, zero_pad: bool) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if zero_pad and not method.needs_projection_shortcut:
        return ZeroPadShortcut(in_ch, out_ch, stride)
    return nn.Sequential(method.conv(in_ch, out_ch, 1, stride, role="shortcut"), method.norm(out_ch))


class ResNet(nn.Module):
    def __init__(self, method: Method, block, blocks_per_stage: list[int], widths: list[int], *,
                 stem: str, in_channels: int, num_classes: int, zero_pad_shortcuts: bool):
        super().__init__()
        stem_ch = widths[0] if stem == "cifar" else 64
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        layers = [method.conv(in_channels, stem_ch, kernel, stride, role="stem"), method.norm(stem_ch)]
        if not method.preactivation:
            layers.append(method.act())
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*layers)

        stages, ch, index, depth = [], stem_ch, 0, 0
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            out_ch = width * block.expansion
            blocks = []
            for j in range(n):
                s = 2 if (i > 0 and j == 0) else 1
                transition = s != 1 or ch != out_ch
                position = BlockPosition(index=index, count=sum(blocks_per_stage), transition=transition,
                                         stream_depth=depth, branch_convs=block.convs)
                blocks.append(ResidualBlock(
                    block.branch(method, ch, out_ch, s, position),
                    shortcut(method, ch, out_ch, s, zero_pad_shortcuts),
                    method.residual_join(position),
                ))
                ch, index, depth = out_ch, index + 1, 1 if transition else depth + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_act = method.act() if method.preactivation else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = method.head(ch, num_classes)

    def forward(self, x):
        x = self.final_act(self.stages(self.stem(x)))
        return self.head(self.pool(x).flatten(1))


def cifar_resnet(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(method, *, in_channels, num_classes, small_input):
        return ResNet(method, Basic, [n] * 3, [16, 32, 64], stem="cifar", in_channels=in_channels,
                      num_classes=num_classes, zero_pad_shortcuts=True)
    return build


def imagenet_resnet(block, blocks_per_stage):
    def build(method, *, in_channels, num_classes, small_input):
        return ResNet(method, block, blocks_per_stage, [64, 128, 256, 512],
                      stem="small" if small_input else "imagenet", in_channels=in_channels,
                      num_classes=num_classes, zero_pad_shortcuts=False)
    return build


ARCHITECTURES = {
    **{f"resnet{d}": cifar_resnet(d) for d in (8, 20, 32, 44, 56, 110)},
    "resnet18": imagenet_resnet(Basic, [2, 2, 2, 2]),
    "resnet34": imagenet_resnet(Basic, [3, 4, 6, 3]),
    "resnet50": imagenet_resnet(Bottleneck, [3, 4, 6, 3]),
    "resnet101": imagenet_resnet(Bottleneck, [3, 4, 23, 3]),
    "resnet152": imagenet_resnet(Bottleneck, [3, 8, 36, 3]),
}
