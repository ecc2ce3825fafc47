"""BatchNorm baseline (Ioffe & Szegedy 2015, arXiv 1502.03167).

Standard ResNet/VGG: BatchNorm2d after every conv, before the ReLU, batch statistics in
training and running statistics in evaluation; torchvision's initialisation (Kaiming
normal, fan-out). ResNet convs have no bias; VGG keeps torchvision's conv bias so the
parameter counts equal torchvision's ``vggXX_bn`` exactly (the bias is redundant before
BN, and harmless). ``sync_bn`` turns the layers into SyncBatchNorm when the run is
distributed.

BatchNorm's own remedies, each off by default (conf/method/bn.yaml):

- ``momentum`` and ``eps``: the running statistics' update rate (PyTorch's convention:
  new = (1 - momentum) * old + momentum * batch) and the variance floor.
- Ghost batch norm (``ghost_batch_size``; Hoffer, Hubara, Soudry 2017, arXiv 1705.08741):
  in training every micro-batch is cut into virtual batches of that many examples, each
  normalised by its own statistics, exactly as BatchNorm2d applied to each in turn
  (running statistics included), in one vectorised pass. The large-batch remedy: the
  normalisation noise of a small batch at the step size of a large one. Independent of
  trainer.accumulate; it must divide the micro-batch.
- Precise BN (``precise_bn_batches``; Wu & Johnson 2021, "Rethinking 'Batch' in
  BatchNorm", arXiv 2105.07576; fvcore's update_bn_stats): before every evaluation the
  running statistics are recomputed from N training micro-batches (the current epoch's
  first, as training sees them, each layer normalising by its batch statistics as in
  training): every BN layer's mean and unbiased variance over all those inputs, summed
  over the processes of a distributed run. The EMA of a small batch's statistics lags
  the weights and is noisy; this replaces it by the population statistics of the
  current weights. (fvcore averages the per-batch variances instead, which leaves out
  the spread of the batch means; here it is the variance over all the inputs.) The
  calibration forward passes run without autocast, in the weights' dtype.
- Per-example statistics at test time (``eval_statistics=example``): in evaluation every
  example is normalised by its own channel statistics over (H, W), as instance norm does,
  with BN's learnt affine; training is unchanged. BN trained at batch 1 (or with ghost
  batches of 1) normalised every example by its own statistics, so this is its training
  graph at test time, where the running averages of per-example statistics are not.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..rules import added_later, choice, flag, integer, number
from .base import Method


class BatchNorm(Method):
    name = "bn"

    rules = {
        **Method.rules,
        "sync_bn": flag(note="SyncBatchNorm across processes, CUDA only"),
        "momentum": added_later(number(0, 1, lo_open=True, note="running statistics: new = (1 - m) old + m batch"),
                                0.1),
        "eps": added_later(number(0, 1, lo_open=True), 1e-5),
        "ghost_batch_size": added_later(integer(1, null=True, note="examples per virtual batch; null: the micro-batch"),
                                        None),
        "precise_bn_batches": added_later(integer(0, note="training micro-batches that recompute the running "
                                                  "statistics before each evaluation; 0: off"), 0),
        "eval_statistics": added_later(choice("running", "example", note="what evaluation normalises by"), "running"),
    }

    def check(self, cfg):
        super().check(cfg)
        if cfg.sync_bn and cfg.ghost_batch_size is not None:
            raise ConfigError("method.ghost_batch_size and method.sync_bn=true contradict each other "
                              "(virtual batches smaller than a process's batch, statistics across processes); "
                              "choose one")

    def check_micro_batch(self, micro_batch):
        ghost = self.cfg.ghost_batch_size
        if ghost is not None and micro_batch % ghost != 0:
            raise ConfigError(
                f"method.ghost_batch_size={ghost} must divide the micro-batch of {micro_batch} examples "
                "(batch_size / (trainer.accumulate x processes)): every virtual batch has the same size. "
                "Choose a divisor, or null for plain BatchNorm.")

    def check_processes(self, world_size, device):
        if self.cfg.sync_bn and device.type != "cuda":
            raise ConfigError("method.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                              "drop it on the CPU")

    def convert_for_processes(self, model):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.cfg.sync_bn else model

    def norm(self, channels, *, role="body"):
        example = self.cfg.eval_statistics == "example"
        if self.cfg.ghost_batch_size is not None:
            return (ExampleEvalGhostBatchNorm2d if example else GhostBatchNorm2d)(
                channels, self.cfg.ghost_batch_size, eps=self.cfg.eps, momentum=self.cfg.momentum)
        return (ExampleEvalBatchNorm2d if example else nn.BatchNorm2d)(channels, eps=self.cfg.eps,
                                                                       momentum=self.cfg.momentum)

    def initialize(self, model):
        kaiming_init_(model)

    def before_evaluation(self, model, training_batches, ctx):
        if self.cfg.precise_bn_batches:
            recompute_bn_statistics_(model, training_batches(self.cfg.precise_bn_batches), ctx)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over virtual batches of ``ghost_size`` examples in training (see the
    module docstring); evaluation uses the running statistics as usual."""

    def __init__(self, channels: int, ghost_size: int, **kwargs):
        super().__init__(channels, **kwargs)
        self.ghost_size = ghost_size

    def forward(self, x):
        k = x.shape[0] // self.ghost_size
        if not self.training or k <= 1:
            return super().forward(x)
        v = x.view(k, self.ghost_size, *x.shape[1:])
        var, mean = torch.var_mean(v, dim=(1, 3, 4), keepdim=True, correction=0)
        y = (v - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, 1, -1, 1, 1) + self.bias.view(1, 1, -1, 1, 1)
        self._update_running_stats(mean.flatten(1), var.flatten(1) * (v[0].numel() / (v[0].numel() - x.shape[1])))
        return y.view_as(x)

    @torch.no_grad()
    def _update_running_stats(self, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
        """k momentum updates in one: r <- (1-m)^k r + sum_i m (1-m)^(k-1-i) s_i."""
        k, m = len(means), self.momentum
        weights = m * (1 - m) ** torch.arange(k - 1, -1, -1, device=means.device, dtype=means.dtype)
        self.running_mean.mul_((1 - m) ** k).add_(weights @ means.detach())
        self.running_var.mul_((1 - m) ** k).add_(weights @ unbiased_vars.detach())
        self.num_batches_tracked.add_(k)

    def extra_repr(self):
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"


class ExampleStatisticsInEval:
    """Mixin for a BatchNorm2d: in eval mode each example is normalised by its own
    statistics over (H, W) (``eval_statistics=example``); training is the base class's."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class ExampleEvalBatchNorm2d(ExampleStatisticsInEval, nn.BatchNorm2d):
    pass


class ExampleEvalGhostBatchNorm2d(ExampleStatisticsInEval, GhostBatchNorm2d):
    pass


@torch.no_grad()
def recompute_bn_statistics_(model: nn.Module, batches, ctx) -> None:
    """Precise BN: every BatchNorm layer's running mean and unbiased variance become those
    of all its inputs over ``batches`` (input tensors), the model in training mode (each
    layer normalising by its batch statistics), summed over the processes with ``ctx``."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sums = {m: torch.zeros(3, m.num_features, dtype=torch.float64, device=m.running_mean.device) for m in layers}

    def collect(module, inputs):
        x = inputs[0].double().transpose(0, 1).flatten(1)  # (channels, values)
        sums[module] += torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])])
    hooks = [m.register_forward_pre_hook(collect) for m in layers]
    was_training = model.training
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not layers:
        return
    totals = ctx.sum(torch.cat([sums[m] for m in layers], 1)).split([m.num_features for m in layers], 1)
    for m, (s1, s2, n) in zip(layers, totals):
        mean = s1 / n
        m.running_mean.copy_(mean)
        m.running_var.copy_((s2 - n * mean * mean) / (n - 1))


def kaiming_init_(model: nn.Module) -> None:
    """torchvision's ResNet/VGG init: convs Kaiming normal (fan-out), conv biases 0, BN
    gains 1 and biases 0 (other norms keep the gain they were built with)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
