"""Batch Normalization Preconditioning (Lange, Helfrich, Ye, JMLR 23(72), 2022).

BNP keeps what BatchNorm does to the optimisation and drops what it does to the network:
instead of normalising activations with minibatch statistics, it preconditions each
layer's parameter gradients with the normalisation BN would apply, estimated from
running statistics of the layer's input. The forward pass is the plain layer, so the
training graph is the test graph and any batch size works, including 1 (online).

Definition (docs/methods.md, "bnp"; the paper's exact formulas were not
recoverable, so this project defines BNP as the update that gradient descent on the
BN-reparametrised parameters induces). A layer y = W h + b whose input h has running
per-feature mean mu and variance var, D = var + eps (+ damping, below), is reparametrised
as BN would:
y = V (h - mu) / sqrt(D) + c, i.e. W = V D^(-1/2), b = c - W mu. One gradient step on
(V, c), mapped back to (W, b), is one gradient step on (W, b) with the gradients

    G_W' = (G_W - g_b mu^T) / D        (column j divided by D_j)
    g_b' = g_b - G_W' mu

For a conv, mu and var are per input channel (over batch and positions) and broadcast over
kh x kw; the sum in g_b' runs over (in, kh, kw). The optimizer then treats (G_W', g_b')
as the gradient: momentum accumulates it, weight decay is added to it unpreconditioned.

Choices made here where the sources leave room (conf/method/bnp.yaml):

- Every conv and every linear layer is preconditioned, the classifier included: its input
  (pooled post-ReLU features) has a large mean and uneven scales, the ill-conditioning
  BNP targets. Every such layer has a bias (the reparametrisation needs c).
- Running statistics (buffers ``running_mean`` / ``running_var``, so checkpoints keep
  them) are updated in every training-mode forward with momentum m (BN's 0.1 at batch
  128; at other batches the m whose window holds as many examples, below). They describe
  the exponentially weighted mixture of all batches seen: mean <- (1-m) mean + m
  batch_mean, var <- (1-m) var + m batch_var + m (1-m) (batch_mean - mean)^2 with the
  biased within-batch variance. The between-batch term is what makes batch size 1 work:
  a single example has within-batch variance 0 for a linear layer, and an EMA of batch
  variances alone would shrink var to 0 and blow the preconditioner up by 1/eps. With
  large batches from a stationary distribution it reduces to BN's EMA of batch variances.
- The statistics start at mean 0, var 1: identity preconditioning (up to 1/(1+eps)).
  The first step's statistics already hold one update (10% of the first batch), and the
  preconditioner phases in as the prior's weight 0.9^t decays over the first ~20-50
  steps, a built-in warmup.
- Architecture and initialisation are the unnormalised control's (``none``: PyTorch's
  default init, no normalisation layers), so bnp vs none isolates the preconditioning.

Step size, and the one departure from the plain definition: the preconditioner scales
feature j's update by 1/D_j. In the unnormalised network the input variances of one
layer span ~1e7 (nearly dead ReLU channels down to 1e-7), so 1/(var + 1e-5) amplifies
some updates ~1e5-fold and the loss explodes at any usable lr. BN itself is protected by
its forward normalisation; BNP is not. So D is damped relative to the layer's typical
variance: D_j = var_j + eps + ``damping`` * mean_k(var_k), the mean over the layer's input
features. No feature's step can then exceed 1/``damping`` times the typical feature's;
damping = 0 is the plain definition (what the tests check against the
reparametrisation), damping -> infinity is SGD with a per-layer step of
1/(damping * mean var). Damping bought no usable learning rate (docs/results.md), so
its default is 0. What does is ``grad_clip_norm``: the raw gradients' global norm is
clipped (exactly as ``trainer.grad_clip_norm`` would, all parameters together) before
they are preconditioned, which bounds the rare steps where a large gradient meets a small
variance. At its default bound (1 at batch 128, below the median raw norm there) it
clips nearly every step, so bnp in practice takes steps of length lr x bound along the
preconditioned direction. The default clip, BNP's own learning rate (``method.lr``, the
default optimizer.lr) and damping were chosen on validation accuracy: docs/results.md.

Batch size. ``momentum`` and ``grad_clip_norm`` are given at ``reference_batch`` (128)
and hold at larger batches. Below it the bound is grad_clip_norm x sqrt(128 / B), since
the raw gradient's norm is mostly sampling noise at small batches, and the momentum is
1 - (1 - m)^(b / 128) for statistics updated with micro-batches of b examples (b = B
without accumulation or several processes), which keeps the statistics' window at the
same number of examples. Batch 128's bound and momentum left bnp far behind at batches
1-2, and scaling them above 128 as well cost it much at batch 1024, so they are scaled
below 128 only (the measurements: docs/methods.md, "bnp", and docs/results.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..clipping import Clipping
from ..rules import added_later, number
from .base import Method


class Preconditioned:
    """Mixin for a layer y = W h + b (Linear, Conv2d): running statistics of its input h
    per feature, and the BNP gradient preconditioning they define."""

    weight: torch.Tensor
    bias: torch.Tensor

    def _init_statistics(self, features: int, momentum: float, eps: float, damping: float) -> None:
        self.momentum, self.eps, self.damping = momentum, eps, damping
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    @torch.no_grad()
    def _track(self, h: torch.Tensor, sample_dims: tuple[int, ...]) -> None:
        """Update the statistics with a batch ``h`` whose ``sample_dims`` index samples (and
        positions). Moments are taken about the running mean, d = h - mean: two plain sums
        instead of ``var_mean`` (whose Welford reduction is ~10x slower on CPU), and no
        cancellation because the running mean is close to the batch mean."""
        feature_shape = [-1 if i not in sample_dims else 1 for i in range(h.dim())]
        d = h - self.running_mean.view(feature_shape)
        count = d.numel() // self.running_mean.numel()
        delta = d.sum(sample_dims) / count          # batch_mean - mean
        batch_var = (d * d).sum(sample_dims) / count - delta ** 2
        m = self.momentum
        self.running_var.mul_(1 - m).add_(m * batch_var + m * (1 - m) * delta ** 2)
        self.running_mean.add_(m * delta)

    def denominator(self) -> torch.Tensor:
        """D per input feature: running variance + eps + damping x the layer's mean variance."""
        return self.running_var + (self.eps + self.damping * self.running_var.mean())

    @torch.no_grad()
    def precondition_grad_(self) -> None:
        gw, gb = self.weight.grad, self.bias.grad
        if gw is None or gb is None:
            return
        along_in = (1, -1) + (1,) * (gw.dim() - 2)  # input features are W's dim 1
        mu = self.running_mean.view(along_in)
        gw.sub_(gb.view((-1,) + (1,) * (gw.dim() - 1)) * mu).div_(self.denominator().view(along_in))
        gb.sub_((gw * mu).flatten(1).sum(1))

    def extra_repr(self):
        return f"{super().extra_repr()}, momentum={self.momentum}, eps={self.eps}, damping={self.damping}"


class BNPLinear(Preconditioned, nn.Linear):
    def __init__(self, in_features: int, out_features: int, *, momentum: float, eps: float, damping: float = 0.0):
        super().__init__(in_features, out_features, bias=True)
        self._init_statistics(in_features, momentum, eps, damping)

    def forward(self, h):
        if self.training:
            self._track(h, tuple(range(h.dim() - 1)))
        return super().forward(h)


class BNPConv2d(Preconditioned, nn.Conv2d):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, *,
                 momentum: float, eps: float, damping: float = 0.0):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=True)
        self._init_statistics(in_ch, momentum, eps, damping)

    def forward(self, h):
        if self.training:
            self._track(h, (0, 2, 3))
        return super().forward(h)


class BNPreconditioning(Method):
    name = "bnp"

    rules = {
        **Method.rules,
        "momentum": added_later(number(0, 1, lo_open=True, note="at batch reference_batch; default 0.1, BatchNorm's"),
                                0.1),
        "eps": added_later(number(0, 1, lo_open=True, note="default 1e-5, BatchNorm's"), 1e-5),
        "damping": number(0, 1e3, note="0: the undamped preconditioner"),
        "grad_clip_norm": added_later(number(0, 1e6, lo_open=True, null=True,
                                             note="the raw gradients' global norm bound at batch reference_batch, "
                                                  "before preconditioning; null: off"), None),
        "reference_batch": number(1, 1e9, null=True,
                                  note="the batch momentum and grad_clip_norm are given at; null: the same "
                                       "values at every batch"),
    }

    def _ratio_to_reference(self, batch: int | None) -> float | None:
        """batch / reference_batch below the reference batch; None at or above it (where
        the reference values hold) or where either is unknown or off."""
        ref = self.cfg.get("reference_batch")
        return batch / ref if ref and batch and batch < ref else None

    @property
    def grad_clip_norm(self) -> float | None:
        """The bound this run clips to: ``grad_clip_norm`` x sqrt(``reference_batch`` /
        batch_size) below the reference batch, ``grad_clip_norm`` above it. A small batch's
        gradient is mostly sampling noise, whose norm grows about as 1 / sqrt(batch)
        (the medians measured: docs/methods.md, "bnp"), so the bound of batch 128 clips
        every small-batch step to a fraction of its length; this one clips steps of about
        the same share of their typical length. Above the reference the bound is not
        scaled (docs/results.md)."""
        clip, ratio = self.cfg.grad_clip_norm, self._ratio_to_reference(self.batch_size)
        if not clip or ratio is None:
            return clip or None
        return clip / math.sqrt(ratio)

    @property
    def statistics_momentum(self) -> float:
        """The running statistics' momentum: ``momentum`` at and above ``reference_batch``,
        and for updates of B < ref examples the momentum whose window holds as many
        examples, 1 - (1 - m)^(B / ref). B is the micro-batch: the statistics are updated
        at every forward pass, and in a DDP run rank 0's, which every rank uses, see its
        shard only. BN's 0.1 at batch 2 would average about 20 examples, a noisy
        preconditioner (its cost at batch 2: docs/results.md)."""
        m, ratio = self.cfg.momentum, self._ratio_to_reference(self.micro_batch)
        return m if ratio is None else 1 - (1 - m) ** ratio

    def _stats(self) -> dict:
        return {"momentum": self.statistics_momentum, "eps": self.cfg.eps, "damping": self.cfg.damping}

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        return BNPConv2d(in_ch, out_ch, kernel_size, stride, **self._stats())

    def linear(self, in_features, out_features):
        return BNPLinear(in_features, out_features, **self._stats())

    def head(self, in_features, num_classes):
        return BNPLinear(in_features, num_classes, **self._stats())

    def clipping(self):
        # The trainer's own global-norm clipping, as bnp's default: it acts before before_step preconditions.
        return Clipping(max_norm=self.grad_clip_norm)

    def bind(self, model):
        self._layers = [m for m in model.modules() if isinstance(m, Preconditioned)]

    def before_step(self, model, optimizer):
        for layer in self._layers:
            layer.precondition_grad_()
