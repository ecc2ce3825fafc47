"""Normalizer-Free ResNets (Brock, De, Smith, ICLR 2021, arXiv 2101.08692) with Adaptive
Gradient Clipping from NFNets (Brock, De, Smith, Simonyan, ICML 2021, arXiv 2102.06171).

BatchNorm keeps the residual stream's variance in check and removes the mean shift that
ReLUs create. NF-ResNets do both analytically: every residual block computes
h + alpha * f(h / beta) with beta = sqrt(the stream's expected variance), so each branch
sees unit-variance input and the variance grows by a known alpha^2 per block; Scaled
Weight Standardization makes every conv variance-preserving and zero-mean, which removes
the mean shift. AGC clips each output unit's gradient relative to its weight norm, which
replaces BN's tolerance of large learning rates and batches.

Follows docs/methods.md ("nf") and the authors' code (google-deepmind/
deepmind-research, nfnets/: base.py WSConv2D and StochDepth, nf_resnet.py NFResBlock,
agc_optax.py, experiment_nfnets.py). Choices made here where the sources leave room (the
knobs are in conf/method/nf.yaml):

- gamma (the activation's variance-restoring constant) multiplies the standardized
  weight of every conv that reads an activation, i.e. every conv but the stem (which
  reads the image, gamma = 1). The authors bake gamma into the activation instead; the
  network is the same, except that the activation before global pooling is unscaled
  here (the classifier absorbs the constant).
- Transition blocks (stride or width change) take their shortcut through a Scaled WS
  1x1 conv applied to h / beta, as NF prescribes, also in CIFAR ResNets whose recipe uses
  option-A shortcuts: the variance reset at a transition assumes the shortcut starts a
  fresh, unit-variance stream, which a zero-padded shortcut does not.
- Expected variance: 1 before the first block, += alpha^2 after every block, reset to
  1 + alpha^2 after a transition block. The authors reset at every stage's first block,
  which is always a transition in their networks; here a stage whose first block keeps
  stride and width (ResNet-18/34 stage 1) does not reset, since its shortcut is h itself.
- ``stem``: ``ws`` (the paper: Scaled WS like every other conv) or ``plain`` (an
  ordinary conv with a bias, N(0, 1/fan_in) init). On a 1-channel image a standardised
  3x3 stem filter is zero-mean, i.e. blind to local brightness (MSR's zero-mean stem has
  the same blindness; its plain stem won on validation, docs/results.md).
- SkipInit: a learnable scalar, initialised to 0, ends every residual branch
  (``skipinit``; off gives no scalar, used to check signal propagation at init). It is
  applied in the join (``NFJoin.skip_gain``), fused with alpha, not as a module of its own.
- AGC belongs to NFNets (arXiv 2102.06171), not to NF-ResNets (arXiv 2101.08692), which
  trained without it. ``agc_clip`` = lambda; ``auto`` (the default) is NFNets' 0.01 for
  optimizer steps of 1024 examples or more and off below (NFNets report that smaller
  batches want looser clipping, and AGC at batch 128 cost nf much on Fashion-MNIST:
  docs/methods.md, "nf"); a number sets it at any batch; 0 or null disables it. Scope as
  DeepMind's experiment_nfnets.py: every parameter except the classifier's weight
  (gains, biases and SkipInit scalars are clipped; timm excludes the whole head). Units
  as in agc_optax.unitwise_norm: a conv filter over its whole fan-in, a linear row, and
  a vector or scalar parameter as one unit; the 1e-3 floor on the weight norm lets
  zero-initialised parameters move, at most lambda * 1e-3 per step at first. The
  trainer's clipper applies it (``clipping()``, msr_train.clipping).
- Weight decay is off for vector and scalar parameters (gains, biases, SkipInit), as in
  experiment_nfnets.py.
- Stochastic depth (``stochastic_depth`` = the rate of a notional block past the last;
  block i of n drops with rate * i / n, as nf_resnet.py) drops the whole residual branch
  per sample in training. The kept branches are scaled by 1 / keep so evaluation needs no
  rescaling (the authors' StochDepth leaves them unscaled, which makes evaluation see a
  slightly larger residual than training did).
- ``dropout`` before the classifier defaults to 0, for the short small-data runs this
  project makes; the authors' ImageNet models use 0.2-0.5 (nfnets/base.py).
- Init: conv weights N(0, 1/fan_in) (the authors' VarianceScaling; WS makes the scale
  irrelevant), WS gains 1, conv biases 0; classifier N(0, 0.01^2) with zero bias
  (nf_resnet.py's default).
- VGG has no residual blocks: it gets the Scaled WS convs (and AGC), nothing else.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..clipping import Clipping
from ..rules import added_later, choice, either, flag, number
from .base import Method

#: The activations docs/methods.md lists, with gamma = 1 / sqrt(Var[act(z)]) for z ~ N(0, 1).
ACTIVATIONS = {
    "relu": (nn.ReLU, 1.7139588594436646),
    "silu": (nn.SiLU, 1.7881293296813965),
    "gelu": (nn.GELU, 1.7015043497085571),
    "identity": (nn.Identity, 1.0),
}


class ScaledWeightStandardization(torch.autograd.Function):
    """W_hat = const * gain * (W - mean) / sqrt(max(N var, eps)) per output channel over the
    fan-in N, as one autograd node with a closed-form backward. With c = W - mean, s =
    1 / sqrt(max(sum c^2, eps)) and f = const * gain * s (per channel), W_hat = c f and

        dL/dgain = const * s * sum(G c)
        dL/dW    = f (G - mean G) - c f s^2 sum(G c)   (the last term only where unclamped)

    (the projection of a normalised vector's gradient, then the centring's). Autograd's
    graph of the same formula is about a dozen nodes per conv, rebuilt every step: at
    small batches, where a step is mostly per-op overhead, that was a large share of nf's
    step (docs/benchmarks.md). Tested against autograd's gradients in float64."""

    @staticmethod
    def forward(ctx, weight, gain, const, eps: float):
        # Every constant is an operand of its own type (``const`` a 0-dim tensor, see
        # WSConv2d) or an operator's argument (clamp_min, alpha, value): on the CPU a Python
        # number as an operand costs four more operators for its conversion, per conv.
        dims = tuple(range(1, weight.dim()))
        _, mean = torch.var_mean(weight, dim=dims, correction=0, keepdim=True)
        centred = weight - mean
        norm = torch.linalg.vector_norm(centred, dim=dims, keepdim=True)  # sqrt(N var)
        floored = norm.clamp_min(eps ** 0.5)
        inv_norm = floored.reciprocal()
        factor = inv_norm * (gain.view_as(inv_norm) * const)
        ctx.const = const
        ctx.save_for_backward(centred, inv_norm, factor, floored == norm)
        return centred * factor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        centred, inv_norm, factor, unclamped = ctx.saved_tensors
        dims = tuple(range(1, grad.dim()))
        dot = (grad * centred).sum(dims, keepdim=True)
        grad_gain = (dot * inv_norm).flatten() * ctx.const if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[0]:
            radial = factor * inv_norm * inv_norm * dot * unclamped
            centred_grad = grad.sub(grad.sum(dims, keepdim=True), alpha=1 / centred[0].numel())
            grad_weight = torch.addcmul(centred_grad * factor, centred, radial, value=-1)
        return grad_weight, grad_gain, None, None


class WSConv2d(nn.Conv2d):
    """Conv with Scaled Weight Standardization, a learnable gain and a bias:
    W_hat = gain * gamma * input_scale * (W - mean) / sqrt(max(N * var, eps)), per output
    channel over the fan-in N. ``input_scale`` is a constant its ``NFJoin`` may move into
    it (``NFJoin.fold_input_scale``); 1 otherwise."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, *,
                 gamma: float, eps: float = 1e-4):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=True)
        self.gamma, self.eps = gamma, eps
        # gamma * input_scale as a tensor (ScaledWeightStandardization.forward says why);
        # not saved: it is rebuilt from the constants.
        self.register_buffer("ws_const", torch.tensor(float(gamma)), persistent=False)
        self.input_scale = 1.0
        self.gain = nn.Parameter(torch.ones(out_ch))
        nn.init.normal_(self.weight, std=self.weight[0].numel() ** -0.5)
        nn.init.zeros_(self.bias)

    @property
    def input_scale(self) -> float:
        return self._input_scale

    @input_scale.setter
    def input_scale(self, value: float) -> None:
        self._input_scale = value
        self.ws_const.fill_(self.gamma * value)

    def _apply(self, fn, recurse=True):
        # After .double() / .half() / .to(device): the constant again from its exact value,
        # not the old dtype's rounding of it.
        module = super()._apply(fn, recurse)
        self.ws_const.fill_(self.gamma * self._input_scale)
        return module

    def standardized_weight(self) -> torch.Tensor:
        return ScaledWeightStandardization.apply(self.weight, self.gain, self.ws_const, self.eps)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, gamma={self.gamma}, input_scale={self.input_scale:.4f}"


def leading_ws_conv(module: nn.Module) -> WSConv2d | None:
    """The Scaled WS conv a branch or shortcut starts with, if it starts with one."""
    first = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    return first if isinstance(first, WSConv2d) else None


class NFJoin(nn.Module):
    """h + alpha * g * branch(act(h) / beta), g the SkipInit gain (a learnable scalar, init
    0; 1 with ``skipinit`` off); at a transition the shortcut reads act(h) / beta too.
    ``beta`` and ``drop_rate`` (stochastic depth) depend on the block's position
    (``NormalizerFree.residual_join``).

    Written for speed on activations, with the same math: the merge's factors (alpha, g,
    and stochastic depth's mask / keep) multiply into one scalar or per-sample factor
    applied by a single ``addcmul``, and ``fold_input_scale`` moves 1 / beta into the convs
    that read act(h) / beta. Unfused, they were five extra passes over every block's
    activation forward and backward (docs/benchmarks.md, "Every method against the
    unnormalised network")."""

    def __init__(self, act: nn.Module, alpha: float, transition: bool, beta: float = 1.0,
                 drop_rate: float = 0.0, skipinit: bool = False):
        super().__init__()
        self.act, self.alpha, self.transition = act, alpha, transition
        self.beta, self.drop_rate = beta, drop_rate
        self.skip_gain = nn.Parameter(torch.zeros(())) if skipinit else None
        self.input_scale_folded = False

    def fold_input_scale(self, branch: nn.Module, shortcut: nn.Module) -> None:
        """Move 1 / beta into the Scaled WS convs that read act(h) / beta (exact in real
        arithmetic: a conv is linear in its input and adds its bias after), if every
        reader is one."""
        readers = [leading_ws_conv(branch)] + ([leading_ws_conv(shortcut)] if self.transition else [])
        if all(r is not None for r in readers):
            for r in readers:
                r.input_scale = 1.0 / self.beta
            self.input_scale_folded = True

    def branch_factor(self, out: torch.Tensor) -> torch.Tensor | None:
        """alpha * g * mask / keep: a scalar tensor, per-sample (N, 1, ...) under stochastic
        depth, or None where it is the constant alpha."""
        # In the activations' dtype: under autocast a float32 factor would promote the
        # whole residual stream to float32.
        factor = None if self.skip_gain is None else (self.skip_gain * self.alpha).to(out.dtype)
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = out.new_empty((out.shape[0],) + (1,) * (out.dim() - 1)).bernoulli_(keep)
            mask.mul_(self.alpha / keep)
            factor = mask if factor is None else mask * self.skip_gain
        return factor

    def forward(self, x, branch: nn.Module, shortcut: nn.Module):
        pre = self.act(x)
        if not self.input_scale_folded:
            pre = pre / self.beta
        out = branch(pre)
        stream = shortcut(pre) if self.transition else x
        factor = self.branch_factor(out)
        if factor is None:
            return torch.add(stream, out, alpha=self.alpha)
        return torch.addcmul(stream, out, factor)

    def extra_repr(self):
        return (f"alpha={self.alpha}, beta={self.beta:.4f}, transition={self.transition}, "
                f"drop_rate={self.drop_rate:.4f}, input_scale_folded={self.input_scale_folded}")


def rename_branch_end_gains(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook of the whole model: checkpoints written before SkipInit's
    gain moved into the join (``NFJoin.skip_gain``) keep it as the scalar ``gain`` of the
    branch's last module, e.g. ``stages.0.0.branch.5.gain``."""
    for key in [k for k, v in state_dict.items() if v.dim() == 0]:
        match = re.fullmatch(r"(.*\.)branch\.\d+\.gain", key)
        if match and match[1] + "join.skip_gain" not in state_dict:
            state_dict[match[1] + "join.skip_gain"] = state_dict.pop(key)


class Classifier(nn.Sequential):
    """Dropout, then the linear layer producing logits."""


class NormalizerFree(Method):
    name = "nf"
    preactivation = True
    needs_projection_shortcut = True

    rules = {
        **Method.rules,
        "activation": choice(*ACTIVATIONS),
        "alpha": number(0, 10, lo_open=True, note="NF-ResNets use 0.2"),
        "skipinit": flag(),
        "stem": added_later(choice("ws", "plain", note="ws: Scaled WS like every conv (the paper); plain: an ordinary "
                                   "conv"), "ws"),
        "agc_clip": either(choice("auto", note="0.01 at batch >= 1024, off below"),
                           number(0, 1e3, null=True, note="lambda; 0 or null disables AGC")),
        "stochastic_depth": number(0, 1, hi_open=True, note="0 disables it"),
        "dropout": number(0, 1, hi_open=True, note="0 disables it"),
    }

    #: NFNets' lambda and the smallest batch it was used at (arXiv 2102.06171).
    AGC_LAMBDA, AGC_MIN_BATCH = 0.01, 1024

    @property
    def agc_clip(self) -> float | None:
        """The AGC lambda this run uses; None: no clipping."""
        clip = self.cfg.agc_clip
        if clip == "auto":
            return self.AGC_LAMBDA if (self.batch_size or 0) >= self.AGC_MIN_BATCH else None
        return clip or None

    def clipping(self):
        return Clipping(agc=self.agc_clip)

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        if role == "stem" and self.cfg.stem == "plain":
            conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=True)
            nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)  # as WSConv2d's, then left alone
            nn.init.zeros_(conv.bias)
            return conv
        gamma = 1.0 if role == "stem" else ACTIVATIONS[self.cfg.activation][1]
        return WSConv2d(in_ch, out_ch, kernel_size, stride, gamma=gamma)

    def act(self):
        # Not in place: the join needs h itself after computing act(h).
        return ACTIVATIONS[self.cfg.activation][0]()

    def head(self, in_features, num_classes):
        linear = nn.Linear(in_features, num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        return Classifier(nn.Dropout(self.cfg.dropout), linear)

    def residual_join(self, position):
        # The stream's expected variance: 1 where it starts, + alpha^2 per branch added.
        expected_var = 1.0 + self.cfg.alpha ** 2 * position.stream_depth
        return NFJoin(self.act(), self.cfg.alpha, position.transition, beta=math.sqrt(expected_var),
                      drop_rate=self.cfg.stochastic_depth * position.index / position.count,
                      skipinit=self.cfg.skipinit)

    def convert_refusal(self):
        return ("NF-ResNets change the architecture (alpha/beta residual joins with the expected variance, "
                "SkipInit gains, projection shortcuts)")

    def initialize(self, model):
        for block in model.modules():  # residual blocks: a join with its branch and shortcut
            if isinstance(getattr(block, "join", None), NFJoin):
                block.join.fold_input_scale(block.branch, block.shortcut)
        if self.cfg.skipinit:
            model.register_load_state_dict_pre_hook(rename_branch_end_gains)

    def param_groups(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() > 1]},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
