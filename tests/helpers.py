"""Helpers several test modules share (a module of its own, so no test file imports
another)."""

import torch
from torch import nn


def slice_drift(model) -> float:
    """max |slice mean| / |slice| over every k x k conv but the stem (the first conv)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)][1:]
    assert convs
    w = torch.cat([c.weight.detach().flatten(0, 1).flatten(1) for c in convs])
    return (w.mean(1).abs() / w.norm(dim=1)).max().item()


def batches(n=5, channels=3, size=32, classes=10, batch=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, channels, size, size, generator=g) + 0.5,
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]
