"""An exponential moving average of the weights, evaluated in place of the trained model.

Averaging the iterates (Polyak & Juditsky 1992) as an EMA is how NFNets were evaluated
(Brock et al. 2021, arXiv 2102.06171: decay 0.99999 over 360 epochs of ImageNet), and a
standard option of image-classification recipes (timm's ``ModelEmaV3``). After every
optimizer step, every floating-point parameter and buffer of the average moves towards
the model's:

    avg <- d avg + (1 - d) w,    d = min(decay, (1 + n) / (10 + n))

after the n-th update (n from 0). The warmup term (TensorFlow's
``ExponentialMovingAverage(num_updates=...)``) lets the average follow the fast early
changes instead of holding on to the initial weights for ~1 / (1 - decay) steps; buffers
that are not floating point (BN's batch counter) are copied.

Written here rather than with ``torch.optim.swa_utils.AveragedModel``: that class tests
its device-side update counter on the host at every step (a device sync on a GPU), and
its decay is fixed. Here the count is the loop's own step, the decay a Python number,
and the update one ``_foreach_lerp_`` over all tensors: no sync, no host-side tensor.
The average keeps references to the model's own parameters and buffers, read at every update, so
the model must be changed in place after it is built (optimizer steps, ``load_state_dict``
and DDP's broadcasts all are); it is made after every conversion (SyncBN, memory format).
BN layers' running statistics are averaged like the weights (as timm does); with precise
BN (``method.precise_bn_batches``) they are recomputed for the average before evaluation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """The average of ``model``'s weights, as a module of its own (``self.module``, a copy
    of ``model`` in eval mode without gradients) that is evaluated and checkpointed."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._averaged = [list(t) for t in zip(*[(a, w) for a, w in pairs if a.is_floating_point()])]
        self._copied = [list(t) for t in zip(*[(a, w) for a, w in pairs if not a.is_floating_point()])]

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (0-based): ``decay`` after the warmup."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, update: int) -> None:
        """Move the average towards the model's current weights (call after the step)."""
        if self._averaged:
            torch._foreach_lerp_(*self._averaged, 1 - self.decay_at(update))
        if self._copied:
            torch._foreach_copy_(*self._copied)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
