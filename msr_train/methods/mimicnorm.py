"""MimicNorm (Fei et al., AAAI 2021, arXiv 2010.09278): weight mean and one last
BatchNorm in place of BatchNorm layers.

MimicNorm keeps two of BN's effects with two light operations: zero-mean filters, which
(by the paper's neural-tangent-kernel argument) whiten the activations and put the
network in BN's chaotic regime, and one BatchNorm on the logits, which autotunes the
effective learning rate. The network is otherwise unnormalised, which saves the memory of
the per-layer BN activations.

Follows docs/methods.md ("mimicnorm") and the authors' code (Kid-key/MimicNorm,
Cifar100/main.py ``meanweigh``, Cifar100/models/resnet_nobn.py, vgg_nobn.py). Choices
made here where the sources leave room, each configurable in conf/method/mimicnorm.yaml:

- Weight mean W <- W - mean_(in,kh,kw) W per output channel, once at init and after every
  optimizer step, for convs with groups = 1 and fan-in in*kh*kw > ``min_fan_in`` = 50,
  as the authors' CIFAR code (its ``meanweigh``): a stem conv on 1-3 input channels is
  left alone (the code does not say why; a zero-mean stem filter would be blind to the
  image's brightness and colour level). 0 projects every conv. Linear layers are never
  projected (the authors' line for them is commented out).
- Conv init N(0, (``init_gain`` * sqrt(2 / fan_in))^2) with ``init_gain`` = 1, the
  authors' CIFAR code (resnet_nobn.py); the paper motivates a 1.2 ~ 1/sqrt(1 - 1/pi)
  gain, which their ImageNet code applies only as a learnable scalar on the downsampling
  shortcut. Linear layers: N(0, 2/fan_in) (the authors' code). All biases start at 0.
- Convs have a bias (``conv_bias``), as in the authors' code: with BN gone nothing else
  offsets a channel.
- Residual branch l (1-based, counted over the whole network in forward order) ends in
  a learnable scalar initialised to ``branch_gain`` ** (convs in the branch) / l: 1.2^2/l
  for basic blocks as docs/methods.md states, 1.2^3/l for bottlenecks as the authors' code.
- The last BN (BatchNorm1d on the logits, affine=False) uses batch statistics in
  training and running statistics in evaluation, like any BN. It is not
  batch-independent: at a micro-batch of 2 it maps every logit to +-1 and the network
  does not learn (5% on Fashion-MNIST, docs/results.md). Micro-batches below
  ``min_micro_batch`` are refused before training, the way BN at batch 1 is.
- The paper recommends 1-2 epochs of learning-rate warmup: set scheduler.warmup_epochs.
- Shortcuts: msr-train's CIFAR ResNets keep He et al.'s option A (stride-2 subsample,
  zero-padded channels) for MimicNorm as for every method that does not need a
  projection; the authors' resnet_nobn.py uses a 1x1 conv with a bias at each
  transition. Not measured here: a comparison with it needs an architecture option.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..rules import flag, integer, number
from .base import BranchGain, Method


class MimicNorm(Method):
    name = "mimicnorm"

    rules = {
        **Method.rules,
        "init_gain": number(0, 100, lo_open=True, note="default 1.0, the authors' CIFAR code"),
        "branch_gain": number(0, 100, lo_open=True, note="default 1.2"),
        "min_fan_in": number(0, note="0 projects every conv; default 50"),
        "conv_bias": flag(),
        "min_micro_batch": integer(2, note="BatchNorm on the logits needs two examples at the very least"),
    }

    def check_micro_batch(self, micro_batch):
        if micro_batch < self.cfg.min_micro_batch:
            raise ConfigError(
                f"method=mimicnorm does not learn from {micro_batch} example(s) per micro-batch: its BatchNorm on "
                f"the logits maps every logit to about +-1 below {self.cfg.min_micro_batch} (method.min_micro_batch). "
                "Use batch_size/trainer.accumulate >= "
                f"{self.cfg.min_micro_batch}, or a batch-independent method such as method=msr.")

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=self.cfg.conv_bias)

    def head(self, in_features, num_classes):
        return nn.Sequential(nn.Linear(in_features, num_classes), nn.BatchNorm1d(num_classes, affine=False))

    def branch_end(self, position):
        # Branch l (1-based, in forward order) starts at branch_gain^(convs in the branch) / l.
        return BranchGain(self.cfg.branch_gain ** position.branch_convs / (position.index + 1))

    def convert_refusal(self):
        return "MimicNorm changes the architecture (a gain ending every residual branch, a BatchNorm on the logits)"

    def initialize(self, model):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=self.cfg.init_gain * math.sqrt(2.0 / m.weight[0].numel()))
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.bind(model)
        self._centre_weights()

    def bind(self, model):
        self._centred = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1
                         and m.weight[0].numel() > self.cfg.min_fan_in]

    @torch.no_grad()
    def _centre_weights(self):
        for w in self._centred:
            w.sub_(w.mean(dim=(1, 2, 3), keepdim=True))

    def after_step(self, model, optimizer):
        self._centre_weights()
