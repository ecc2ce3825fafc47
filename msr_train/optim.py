"""Optimizers, learning-rate scaling with batch size, and schedules with linear warmup."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
LR_SCALINGS = ("linear", "sqrt", "sqrt_linear", "none")


def scaled_lr(cfg, batch_size: int) -> float:
    """``optimizer.lr`` is the rate at ``optimizer.base_batch_size``; scale it to the
    batch actually used (Goyal et al. 2017 for linear, Krizhevsky 2014 for sqrt).
    ``sqrt_linear`` takes sqrt below the base batch and linear above it: linear scaling
    (with warmup) is the large-batch rule, and at batch 1 it would give lr/128, far too
    small to learn in a fixed number of epochs (measured in docs/results.md)."""
    ratio = batch_size / cfg.base_batch_size
    rules = {"linear": ratio, "sqrt": math.sqrt(ratio), "sqrt_linear": ratio if ratio > 1 else math.sqrt(ratio),
             "none": 1.0}
    return cfg.lr * rules[cfg.lr_scaling]


def build_optimizer(cfg, param_groups: list[dict], batch_size: int) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, batch_size)
    groups = []
    for g in param_groups:
        g = dict(g)
        g["lr"] = lr * g.pop("lr_mult", 1.0)
        g["initial_lr"] = g["lr"]
        groups.append(g)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.get("nesterov", False))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer={cfg.name} is unknown; choose one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(cfg, optimizer, *, steps_per_epoch: int, total_steps: int):
    """A per-step LambdaLR: linear warmup over ``warmup_epochs``, then the schedule.
    Milestones are given in epochs (the way recipes state them) and counted in steps."""
    warmup = round(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if cfg.name == "cosine":
        def decay(step):
            t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif cfg.name == "multistep":
        milestones = [round(m * steps_per_epoch) for m in cfg.milestones]

        def decay(step):
            return cfg.gamma ** sum(step >= m for m in milestones)
    elif cfg.name == "constant":
        def decay(step):
            return 1.0
    else:
        raise ConfigError(f"scheduler={cfg.name} is unknown; choose one of: {', '.join(SCHEDULERS)}")

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return decay(step)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
