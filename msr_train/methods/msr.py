"""Mean Shift Rejection (Ruff, Beck, Bach 2019, arXiv 1911.13173).

BatchNorm's real service is to cancel a spatial common-mode signal (the mean shift).
MSR cancels it at the source instead: every spatial kernel is zero-mean, so it passes no
spatially constant input; the gradients are projected so the kernels stay zero-mean; a
learnable per-filter scale takes BN's gamma role; multiplicative and additive noise per
(sample, channel) replaces the minibatch noise BN injects. There are no minibatch
statistics anywhere, so the training graph is the test graph and any batch size works.

Follows the authors' code (taylorkangbeck/mean-shift-rejection, folder
pytorch_resnet_cifar10 at commit c207915: trainer.py, InitUtil.py, ParamUtil.py,
PerMapRandomScalingLayer.py, and the run configuration in pytorch_resnet_cifar10.pyproj)
and the paper's text where they differ, as options (conf/method/msr.yaml):

- ``zmg_operator``: ``project`` is the paper's text, g <- g - alpha mean(g) over each
  slice (alpha = ``zmg_alpha``; 1 keeps the zero-mean invariant exactly). ``authors`` is
  their active code (trainer.py ``ZeroMeanNormaliseGrads``, per channel, every 4-d
  weight): g <- g + m (g - mean(g)), m = ``zmg_m`` (0.9 in their run). It is not a
  projection: the mean part is kept at x1 and the zero-mean part amplified x(1+m), so
  weights drift from zero-mean slowly.
- ``stem``: ``msr`` (zero-mean, projected, scaled and noised like every conv) or
  ``plain`` (the authors': their stem's parameter name escapes the filters that select
  projected and anchored weights and ``InputConvHasScaling`` is off, so it is
  ZMI-initialised, then trained as a plain conv with a bias; no scale, no noise). On a
  1-channel image a zero-mean stem is a pure high-pass filter, blind to local brightness.
- ``noise_at``: ``conv`` (every conv output; the ``-noise`` help text), ``block_input``
  (the residual-block input, feeding branch and shortcut: the ``-inputnoise`` option,
  the only place their ResBlock builds the noise layer), or ``off`` (their cited run
  passes ``-noise=0.1`` without ``-inputnoise``, so it trained with no active noise).
- ``weight_decay``: null takes optimizer.weight_decay; a number overrides it for every
  MSR parameter (the authors' run used 0). The decay also acts on the log filter scales
  theta, pulling exp(theta) towards 1 (not towards 0 as decay on BN's gamma does); with
  the authors' 0 nothing pulls them.
- ``lr_mult.stem``: the authors' plain stem weight is in their conv group (0.4 where
  biases and the classifier train at 0.1); null keeps the stem with its kind (a
  zero-mean stem with the convs, a plain one with the other parameters).
- Block-input noise (``noise_at=block_input``) with a shift is followed by a ReLU, as in
  the authors' ResnetBiasScaling.py: the shifted input of a post-activation block would
  otherwise be negative, which no ReLU output is.

Two presets name the two configurations compared in docs/results.md, "Batch 128: the
10-epoch protocol": ``method=msr_paper`` (the paper's text: projection, a zero-mean noised stem,
noise at every conv output, the optimizer's weight decay) and ``method=msr_authors``
(their cited run: their operator, the plain stem at the conv rate, no noise, no weight
decay). ``method=msr``'s defaults are described below.

``method=msr``'s defaults are the paper's settings (those of ``msr_paper``): on the
10-epoch protocol the authors' configuration against the paper's was inconclusive over 5
paired seeds, and by the project's rule an inconclusive comparison keeps the paper's
method (the decision and its stats line: conf/method/msr.yaml). The projecting operator
is also the stable one (the authors' operator diverged at 2x its rate there). The earlier
3-epoch ablation's choice, the plain stem without noise, is ``stem=plain noise_at=off``
(docs/results.md, "MSR ablation": it was ahead by 0.65 validation points at batch 2, p
about 0.08, the winner of 7 variants on the same runs).
Other choices where the sources leave room:

- Order at a conv output: noise, then the filter scale exp(theta). Both are per-channel
  products, so only the shift's units depend on the order; "noise at the raw conv output"
  puts it first. Both live in the conv (``MSRConv2d``), which is how they cost no memory.
- Adaptive optimizers (Adam, AdamW) rescale the gradient elementwise, so a zero-mean
  gradient no longer gives a zero-mean update. For them the projected weights are
  re-centred after every step: W <- W - alpha * mean(W). With alpha = 1 and weights that
  were zero-mean before the step this *is* the projection of the update onto the
  zero-mean subspace, without keeping a copy of the old weights. With plain SGD (momentum
  and weight decay are linear in projected quantities) the gradient projection alone
  keeps the invariant, as in the authors' code.
- The soft norm anchors pull each filter of every non-stem conv and each classifier row
  towards norm ``init_magnitude`` (1 by default, the authors' value).
- The cross-channel option (``zmg_cross_channel``) centres and projects 1x1 convs and
  hidden linear layers over their inputs, never the classifier: its rows start
  Xavier-normal, not zero-mean, as in the authors' recipe, and a class's logit may rely on
  the mean of the features.
- Only the stem conv may have a bias (``stem_bias``); architectures that ask for conv
  biases (VGG) get none elsewhere: a bias is a mean shift.
- ``scale_init=preserve_variance`` (not the paper's; for plain stacks such as VGG; the
  ``method=msr_vp`` preset): exp(theta) starts at 1 / sqrt(1/2 - 1/(2 pi)), about 1.713. A
  unit-norm zero-mean filter passes its input's variance (exactly for inputs uncorrelated
  across the kernel) and none of its mean, and a ReLU of a zero-mean Gaussian keeps
  1/2 - 1/(2 pi) of its variance, so a conv-ReLU unit multiplies the variance by
  exp(theta)^2 (1/2 - 1/(2 pi)): 0.218 at the paper's 0.8, which a stack of 13 plain units
  turns into 2.5e-9, and 1 at this value (max-pools and border padding aside). A ResNet's skip path carries the signal past
  each branch, so there the paper's value stays. docs/methods.md, "msr", has the
  derivation; docs/results.md, the VGG screen, its runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..clipping import classifier_weight
from ..distributed import rand_per_sample
from ..rules import added_later, choice, either, flag, number
from .base import Method, PostActivationJoin


#: exp(theta) at init that keeps a plain conv-ReLU stack's activation variance
#: (``scale_init=preserve_variance``; the module docstring derives it).
VARIANCE_PRESERVING_SCALE = 1 / math.sqrt(0.5 - 0.5 / math.pi)


def noise_factors(batch: int, channels: int, delta: float, shift: float, *, device=None,
                  dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of one forward pass, shaped (batch, channels, 1, 1): the multiplier
    n ~ U(1-delta, 1+delta) clamped to [0, 2] and the shift s ~ U(-shift, shift), drawn in
    that order. In a distributed run each rank gets its examples' share of the global
    batch's draws."""
    shape = (batch, channels, 1, 1)
    n = rand_per_sample(shape, 0, low=1 - delta, high=1 + delta, device=device, dtype=dtype)
    if delta > 1:  # (the method's rules keep delta < 1, where n is in (0, 2) already)
        n.clamp_(0, 2)
    return n, rand_per_sample(shape, 0, low=-shift, high=shift, device=device, dtype=dtype)


def add_noise(x: torch.Tensor, delta: float, shift: float) -> torch.Tensor:
    """(x - s) * n with one (n, s) per (sample, channel) from ``noise_factors``."""
    n, s = noise_factors(x.shape[0], x.shape[1], delta, shift, device=x.device, dtype=x.dtype)
    return x * n if shift == 0 else torch.addcmul(-(s * n), x, n)


class NoisyInputJoin(PostActivationJoin):
    """The residual merge with MSR's noise at the block input (the authors' ``-inputnoise``):
    out = act(branch(x~) + shortcut(x~)), x~ = relu((x - s) * n) in training (no ReLU
    without a shift: (x * n) of a ReLU output is non-negative already)."""

    def __init__(self, act: nn.Module, delta: float, shift: float):
        super().__init__(act)
        self.delta, self.shift = delta, shift

    def forward(self, x, branch, shortcut):
        if self.training:
            x = add_noise(x, self.delta, self.shift)
            if self.shift:  # the authors' ReLU after a shifted input (ResnetBiasScaling.py)
                x = torch.relu(x)
        return super().forward(x, branch, shortcut)


class MSRConv2d(nn.Conv2d):
    """A zero-mean conv with MSR's learnable filter scale and mean-shift noise at its output:

        y = exp(theta) * (conv(x) - s) * n    (training; y = exp(theta) * conv(x) in eval)

    with one (n, s) per (sample, channel) from ``noise_factors``. The scale is per output
    channel, so it is applied to whichever is smaller, the weight or the output:
    conv(x, g W, g b) = g conv(x, W, b), exactly. Usually the weight is (folded in, MSR
    keeps no activation beyond what the unnormalised network keeps, where a scale on the
    output would save a full copy of every conv output for theta's gradient); at small
    batches on wide layers (resnet18 at batch 1: 2.4M weights against 8k outputs in its
    last stage) the output is, and the weight-sized products, forward and backward, would
    dominate the step. The noise is then a single ``addcmul`` on the output whose only
    saved tensor is the (N, C) multiplier.

    ``role`` ('stem', 'body', 'shortcut') tells the MSR hooks which convs to anchor."""

    def __init__(self, *args, role: str, scale_init: float, noise_delta: float,
                 noise_shift: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.role = role
        self.log_scale = nn.Parameter(torch.full((self.out_channels,), math.log(scale_init)))
        self.noise_delta, self.noise_shift = noise_delta, noise_shift

    def scales_output(self, x: torch.Tensor) -> bool:
        """Whether the scale multiplies the output (smaller than the weight for this input)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_pixels = x.shape[0] * ((x.shape[-2] + 2 * ph - kh) // sh + 1) * ((x.shape[-1] + 2 * pw - kw) // sw + 1)
        # (from the shape alone: ``weight[0].numel()`` would be an operator per conv per step)
        return out_pixels < math.prod(self.weight.shape[1:])

    def forward(self, x):
        scale = self.log_scale.exp()
        if self.scales_output(x):
            y = self._conv_forward(x, self.weight, self.bias) * scale.view(1, -1, 1, 1)
        else:
            bias = None if self.bias is None else self.bias * scale
            y = self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), bias)
        if not self.training or (self.noise_delta == 0 and self.noise_shift == 0):
            return y
        n, s = noise_factors(y.shape[0], y.shape[1], self.noise_delta, self.noise_shift,
                             device=y.device, dtype=y.dtype)
        if self.noise_shift == 0:
            return y * n
        # g (c - s) n = (g c) n - g s n: the shift is in the raw conv output's units.
        return torch.addcmul(-(s * n) * scale.view(1, -1, 1, 1), y, n)

    def extra_repr(self):
        return (f"{super().extra_repr()}, role={self.role}, noise_delta={self.noise_delta}, "
                f"noise_shift={self.noise_shift}")


def zero_mean_axes(weight: torch.Tensor) -> tuple[int, ...]:
    """Slice mean (over kh, kw) for spatial kernels, the mean over `in` for 1x1 kernels
    and linear layers."""
    return (2, 3) if weight.dim() == 4 and weight.shape[-1] * weight.shape[-2] > 1 else (1,)


@torch.no_grad()
def zero_mean_init_(weight: torch.Tensor, magnitude: float) -> None:
    """ZMI: U(-1, 1), made zero-mean along ``zero_mean_axes``, filters scaled to L2 norm
    ``magnitude`` over (in, kh, kw)."""
    weight.uniform_(-1, 1)
    weight.sub_(weight.mean(zero_mean_axes(weight), keepdim=True))
    norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    weight.mul_((magnitude / norms).view(-1, *[1] * (weight.dim() - 1)))


@torch.no_grad()
def add_anchor_grad_(weights: list[torch.Tensor], target: float, strength: float) -> None:
    """The gradient of the soft norm anchors, strength * sum_rows (||w_r|| - target)^2 over
    every filter / row w_r, added to the weights' gradients: 2 strength (1 - target /
    ||w_r||) w_r. In closed form, without autograd (as a loss term its graph overhead was a
    large share of a batch-1 step, docs/benchmarks.md), and in foreach ops over all weights, one row-norm op
    per weight aside (at batch 1 a step is mostly per-op overhead)."""
    if not weights:
        return
    inv_norms = [w.flatten(1).norm(dim=1) for w in weights]
    torch._foreach_clamp_min_(inv_norms, 1e-12)
    torch._foreach_reciprocal_(inv_norms)
    inv_norms = [c.view((-1,) + (1,) * (w.dim() - 1)) for c, w in zip(inv_norms, weights)]
    for w in weights:
        if w.grad is None:  # a weight without a gradient gets the anchors' alone
            w.grad = torch.zeros_like(w)
    grads = [w.grad for w in weights]
    # 2 strength w - 2 strength target w / ||w||, the constants as alpha / value: a Python
    # number as an operand would cost four operators of conversion per weight on the CPU.
    torch._foreach_add_(grads, weights, alpha=2 * strength)
    torch._foreach_addcmul_(grads, weights, inv_norms, value=-2 * strength * target)


@torch.no_grad()
def subtract_slice_means_(tensors: list[torch.Tensor], alpha: float) -> None:
    """t <- t - alpha * mean(t) along each tensor's ``zero_mean_axes``: the slice sums,
    subtracted with alpha / (slice size) in one foreach op per slice size (on the CPU a
    mean is three operators and a sum one; a step at batch 1 is mostly per-op overhead)."""
    by_size: dict[int, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}
    for t in tensors:
        axes = zero_mean_axes(t)
        # (a list, not a generator: torch.compile breaks its graph on a generator argument)
        by_size.setdefault(math.prod([t.shape[a] for a in axes]), []).append((t, axes))
    for size, group in by_size.items():
        torch._foreach_sub_([t for t, _ in group], [t.sum(axes, keepdim=True) for t, axes in group],
                            alpha=alpha / size)


class MeanShiftRejection(Method):
    name = "msr"

    rules = {
        **Method.rules,
        "init_magnitude": number(0, 1e3, lo_open=True, note="every filter's L2 norm at init"),
        "scale_init": either(number(0, 1e3, lo_open=True, note="exp(theta) at init"),
                             choice("preserve_variance", note="1 / sqrt(1/2 - 1/(2 pi)), for plain stacks")),
        "stem": choice("msr", "plain"),
        "stem_bias": flag(),
        "zmg_operator": choice("project", "authors"),
        "zmg_alpha": number(0, 1, note="1 = exact projection"),
        "zmg_m": number(0, 100, note="the authors' run: 0.9"),
        "zmg_cross_channel": flag(),
        "noise_at": choice("conv", "block_input", "off"),
        "noise_delta": number(0, 1, hi_open=True, note="multipliers U(1 - delta, 1 + delta) stay positive; 0: none"),
        "noise_shift": number(0, 10, note="0 = no additive noise"),
        "anchor_weight": number(0, 1e3, note="0 = no norm anchors"),
        "weight_decay": number(0, 1, null=True, note="null: optimizer.weight_decay"),
        "lr_mult.conv": number(0, 1e3),
        "lr_mult.other": number(0, 1e3),
        "lr_mult.stem": added_later(number(0, 1e3, null=True, note="null: the conv rate for stem=msr, the other rate "
                                           "for stem=plain"), None),
    }

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        if role == "stem" and self.cfg.stem == "plain":
            stem = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=self.cfg.stem_bias)
            stem.role = role  # for param_groups' lr_mult.stem
            return stem
        noise = self.cfg.noise_at == "conv"
        return MSRConv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2,
                         bias=role == "stem" and self.cfg.stem_bias, role=role,
                         scale_init=self.scale_init(), noise_delta=self.cfg.noise_delta if noise else 0.0,
                         noise_shift=self.cfg.noise_shift if noise else 0.0)

    def scale_init(self) -> float:
        """exp(theta) at init: ``scale_init``, or VARIANCE_PRESERVING_SCALE."""
        value = self.cfg.scale_init
        return VARIANCE_PRESERVING_SCALE if value == "preserve_variance" else value

    def residual_join(self, position):
        if self.cfg.noise_at == "block_input":
            return NoisyInputJoin(self.act(), self.cfg.noise_delta, self.cfg.noise_shift)
        return super().residual_join(position)

    # norm() stays the identity: the filter scale and the noise live in MSRConv2d.

    def convert_refusal(self):
        if self.cfg.noise_at == "block_input":
            return "method.noise_at=block_input needs msr-train's residual join (use noise_at=conv or off)"
        return None

    def initialize(self, model):
        """ZMI for every conv (the plain stem too), Xavier-normal linear layers (zero-mean
        rows for the hidden ones with zmg_cross_channel), zero biases."""
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                zero_mean_init_(m.weight, self.cfg.init_magnitude)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        head = classifier_weight(model)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
                if self.cfg.zmg_cross_channel and m.weight is not head:
                    with torch.no_grad():
                        m.weight.sub_(m.weight.mean(1, keepdim=True))

    def bind(self, model):
        self._projected = []  # weights kept zero-mean by ZMG
        self._anchored = []   # weights whose filters / rows the soft anchors pull to norm 1
        head = classifier_weight(model)
        for m in model.modules():
            if isinstance(m, MSRConv2d):  # the plain stem is initialised, then left alone
                if m.kernel_size != (1, 1) or self.cfg.zmg_cross_channel:
                    self._projected.append(m.weight)
                if m.role != "stem":
                    self._anchored.append(m.weight)
            elif isinstance(m, nn.Linear) and self.cfg.zmg_cross_channel and m.weight is not head:
                self._projected.append(m.weight)
        self._anchored.append(head)

    def param_groups(self, model):
        """The authors' two learning rates: conv weights and filter scales at
        ``lr_mult.conv`` times the base lr, biases and linear layers (the classifier) at
        ``lr_mult.other`` times it. ``lr_mult.stem`` puts the stem's weight in a group of
        its own: the authors' plain stem weight (``Conv1Weight``) is in their conv group
        (trainer.py, lines 2669-2676), at 0.4 where their biases and classifier train at 0.1."""
        conv, other, stem = [], [], []
        for m in model.modules():
            params = list(m.parameters(recurse=False))
            if self.cfg.lr_mult.stem is not None and getattr(m, "role", None) == "stem":
                stem.append(m.weight)
                other += [m.bias] if m.bias is not None else []
                conv += [m.log_scale] if isinstance(m, MSRConv2d) else []
            elif isinstance(m, MSRConv2d):
                conv += [m.weight, m.log_scale]
                other += [m.bias] if m.bias is not None else []
            else:
                other += params
        groups = [{"params": conv, "lr_mult": self.cfg.lr_mult.conv},
                  {"params": other, "lr_mult": self.cfg.lr_mult.other}]
        if stem:
            groups.append({"params": stem, "lr_mult": self.cfg.lr_mult.stem})
        if self.cfg.weight_decay is not None:
            for group in groups:
                group["weight_decay"] = self.cfg.weight_decay
        return groups

    @torch.no_grad()
    def before_step(self, model, optimizer):
        """Soft norm anchors, then ZMG along each weight's zero-mean axes: the projection
        g - alpha mean(g), or the authors' g (1 + m) - m mean(g) (the anchors' gradient of
        a zero-mean weight is zero-mean, so the order only matters when the weights are
        not exactly zero-mean, where it matches a loss term's gradient)."""
        if self.cfg.anchor_weight:
            add_anchor_grad_(self._anchored, self.cfg.init_magnitude, self.cfg.anchor_weight)
        grads = [w.grad for w in self._projected if w.grad is not None]
        if not grads:
            return
        if self.cfg.zmg_operator == "authors":  # (1 + m) (g - m / (1 + m) mean(g))
            m = self.cfg.zmg_m
            torch._foreach_mul_(grads, 1 + m)
            subtract_slice_means_(grads, m / (1 + m))
        else:
            subtract_slice_means_(grads, self.cfg.zmg_alpha)

    @torch.no_grad()
    def after_step(self, model, optimizer):
        # The authors' operator does not keep the invariant: nothing to re-centre.
        if isinstance(optimizer, torch.optim.SGD) or self.cfg.zmg_operator == "authors":
            return
        subtract_slice_means_(self._projected, self.cfg.zmg_alpha)
