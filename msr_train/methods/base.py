"""The contract between architectures, the training loop and a training method.

A method (BatchNorm, Mean Shift Rejection, NF-ResNets, ...) decides which layers an
architecture is built from and what happens around the optimizer step. Architectures
only call the layer factories below (the way timm models take conv / norm / act layers),
and the loop only calls the hooks, so a new method is one subclass and one config file:
neither the models nor the loop change.

Every factory has a default that gives the unnormalised network; a method overrides what
it changes.
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from ..checks import is_number
from ..errors import ConfigError


class BranchGain(nn.Module):
    """A learnable scalar that ends a residual branch (SkipInit, MimicNorm's branch scale)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.gain


class PostActivationJoin(nn.Module):
    """The original ResNet merge (He et al. 2016): out = act(branch(x) + shortcut(x))."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x, branch: nn.Module, shortcut: nn.Module):
        return self.act(branch(x) + shortcut(x))


class Method:
    """Base class: the unnormalised network with PyTorch's default initialisation."""

    name = "base"
    #: The residual stream carries pre-activations: the stem has no activation and the
    #: network applies one before pooling (pre-activation ResNets, NF-ResNets).
    preactivation = False
    #: Transitions need a (1x1 conv) projection shortcut even where the architecture
    #: would use a parameter-free one (CIFAR ResNets' option A).
    needs_projection_shortcut = False
    #: method.<key> -> (test, what is allowed): numbers that check() validates.
    number_rules: dict[str, tuple[Callable[[float], bool], str]] = {}
    #: method.<key> that must be true or false.
    flag_keys: tuple[str, ...] = ()

    def __init__(self, cfg=None, batch_size: int | None = None):
        self.cfg = cfg
        #: The global batch of one optimizer step, for defaults that depend on it (None: unknown).
        self.batch_size = batch_size

    # ------------------------------------------------------------------ layer factories
    def conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, *,
             role: str = "body", bias: bool = False) -> nn.Module:
        """A 'same'-padded conv. ``role`` is 'stem' (sees the input image), 'body' or
        'shortcut'; ``bias`` is what the reference architecture uses (torchvision's
        VGG has conv biases, its ResNets do not). Methods may override both."""
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=bias)

    def norm(self, channels: int) -> nn.Module:
        """What sits where BatchNorm would: after a conv, before the activation."""
        return nn.Identity()

    def act(self) -> nn.Module:
        return nn.ReLU(inplace=True)

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """A hidden fully connected layer (VGG's classifier)."""
        return nn.Linear(in_features, out_features)

    def head(self, in_features: int, num_classes: int) -> nn.Module:
        """The final classifier producing logits."""
        return nn.Linear(in_features, num_classes)

    def branch_end(self) -> nn.Module:
        """Closes every residual branch (a gain for SkipInit-style methods)."""
        return nn.Identity()

    def residual_join(self, transition: bool) -> nn.Module:
        """Combines a residual block's branch and shortcut; ``transition`` is true where
        the block changes stride or width."""
        return PostActivationJoin(self.act())

    # ------------------------------------------------------------------ hooks
    def check(self, cfg) -> None:
        """Reject a configuration this method cannot train, before any work is done."""
        lr = cfg.get("lr")
        if not (is_number(lr) and lr > 0):
            raise ConfigError(f"method.lr={lr!r} must be a positive number: this method's default optimizer.lr "
                              "(SGD, at optimizer.base_batch_size)")
        for key, (ok, allowed) in self.number_rules.items():
            value = OmegaConf.select(cfg, key)
            if not (is_number(value) and ok(value)):
                raise ConfigError(f"method.{key}={value!r} must be {allowed}")
        for key in self.flag_keys:
            if not isinstance(cfg[key], bool):
                raise ConfigError(f"method.{key}={cfg[key]!r} must be true or false")

    def check_micro_batch(self, micro_batch: int) -> None:
        """Reject a micro-batch size (examples per forward pass) this method cannot learn
        from, before any work is done. BatchNorm layers that see one value per channel
        are found for every method by checks.check_batchnorm_trainable."""

    def finalize(self, model: nn.Module) -> None:
        """Called once on the built model: initialisation and per-block constants."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups; a group may carry ``lr_mult`` (scales the lr)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are final here: accumulated, all-reduced and unscaled."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Parameters have just been updated by the optimizer."""

