"""Optimizers, learning-rate scaling with batch size, and schedules with linear warmup."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .rules import Rule, choice, flag, integer, is_number, number, unknown

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
LR_SCALINGS = ("linear", "sqrt", "sqrt_linear", "none")

#: Settings every optimizer has; then each one's own.
_OPTIMIZER_COMMON = {
    "name": choice(*OPTIMIZERS),
    "lr": number(0, 1e6, lo_open=True, note="at optimizer.base_batch_size, e.g. optimizer.lr=0.1"),
    "weight_decay": number(0, 1),
    "lr_scaling": choice(*LR_SCALINGS),
    "base_batch_size": integer(1),
}
OPTIMIZER_RULES = {
    "sgd": {**_OPTIMIZER_COMMON, "momentum": number(0, 1, hi_open=True), "nesterov": flag()},
    "adamw": {**_OPTIMIZER_COMMON, "betas": Rule(
        lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9,0.999]")},
}
_WARMUP = {"warmup_epochs": number(0, 1e6, note="epochs of linear warmup")}
SCHEDULER_RULES = {
    "cosine": {"name": choice(*SCHEDULERS), **_WARMUP,
               "min_lr_ratio": number(0, 1, note="the final lr as a fraction of the peak")},
    "multistep": {"name": choice(*SCHEDULERS), **_WARMUP,
                  "milestones": Rule(lambda v: isinstance(v, list) and len(v) > 0 and v == sorted(v)
                                     and all(is_number(m) and 0 < m <= 1e6 for m in v),
                                     "a non-empty increasing list of epochs > 0, e.g. [100,150] "
                                     "(no milestones: scheduler=constant)"),
                  "gamma": number(0, 1, lo_open=True, note="the lr's factor at each milestone")},
    "constant": {"name": choice(*SCHEDULERS), **_WARMUP},
}


def optimizer_rules(name: str) -> dict[str, Rule]:
    if name not in OPTIMIZER_RULES:
        raise unknown("optimizer", name, OPTIMIZERS)
    return OPTIMIZER_RULES[name]


def scheduler_rules(name: str) -> dict[str, Rule]:
    if name not in SCHEDULER_RULES:
        raise unknown("scheduler", name, SCHEDULERS)
    return SCHEDULER_RULES[name]


def check_schedule_fits(scheduler, epochs: int) -> None:
    """A warmup as long as the run would train at a rising lr to the end, never reaching
    the schedule it was asked for."""
    warmup = scheduler.get("warmup_epochs", 0)
    if warmup >= epochs:
        raise ConfigError(f"scheduler.warmup_epochs={warmup:g} is not shorter than the run (epochs={epochs}): the lr "
                          "would still be warming up when training ends; use fewer warmup epochs or more epochs")


def check_optimizer_links(cfg) -> None:
    """Settings that are valid alone but not together."""
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0 (Nesterov momentum without "
                          "momentum is undefined); set optimizer.momentum=0.9 or optimizer.nesterov=false")


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


def resolve_lr_mult(param_groups: list[dict], lr: float) -> list[dict]:
    """Groups for torch.optim: a method's ``lr_mult`` (which torch would keep and ignore)
    turned into the group's ``lr``."""
    groups = []
    for g in param_groups:
        g = dict(g)
        g["lr"] = lr * g.pop("lr_mult", 1.0)
        groups.append(g)
    return groups


def fused_supported(groups: list[dict]) -> bool:
    """Whether torch's fused kernels take every parameter (floating, on the CPU or a CUDA
    device): one operator per parameter group where the foreach path runs a few per tensor,
    each with a conversion of its Python-number operands on the CPU; at batch 1, where a
    step is mostly per-op overhead, that was the optimizer's whole cost (docs/benchmarks.md)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


def build_optimizer(cfg, param_groups: list[dict], batch_size: int) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, batch_size)
    groups = resolve_lr_mult(param_groups, lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = fused_supported(groups)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)
    raise unknown("optimizer", cfg.name, OPTIMIZERS)


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
        raise unknown("scheduler", cfg.name, SCHEDULERS)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return decay(step)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
