"""The methods in one's own code: a method from its config, its optimizer parameter groups,
and its step hooks on any torch optimizer (README, "Use it in your own code").

    import msr_train, torch, torchvision
    model = msr_train.convert(torchvision.models.resnet18(num_classes=10), "msr")
    optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.1), momentum=0.9, weight_decay=5e-4)
    handle = msr_train.attach(optimizer, model)   # MSR's anchors and ZMG around every optimizer.step()

The CLI builds its methods, groups and hooks with the same functions (build_method, the
method's param_groups and train_step's calls), so a method used here is the one msr-train
trains.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import conversion
from .clipping import GradientClipping
from .errors import ConfigError
from .methods import METHODS, build_method
from .methods.base import FINALIZED, Method
from .optim import resolve_lr_mult


def method(name: str, *, batch_size: int | None = None, **overrides: Any) -> Method:
    """The method configured by ``conf/method/<name>.yaml`` (presets such as msr_paper
    included), with ``overrides`` on top (``noise_at="conv"``, ``lr_mult={"conv": 2.0}``).
    Every setting is checked by the method's rules, as the CLI checks them: an unknown key
    or a bad value is a ConfigError naming it. ``batch_size``: the global batch of one
    optimizer step, for the defaults that depend on it (nf's AGC, bnp's clip)."""
    cfg = method_config(name)
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"method {name!r} has no setting {key!r}; its settings: {', '.join(cfg)}")
        merged = OmegaConf.merge(cfg[key], value) if isinstance(cfg[key], DictConfig) else value
        OmegaConf.update(cfg, key, merged, merge=False)
    return build_method(cfg, batch_size)


def method_config(name: str) -> DictConfig:
    """A method config file as the CLI composes it (its defaults list resolved)."""
    try:
        with initialize_config_module("msr_train.conf", version_base="1.3"):
            cfg = compose("config", [f"method={name}"]).method
    except MissingConfigException:
        raise ConfigError(f"method {name!r} has no config conf/method/{name}.yaml; the methods: "
                          f"{', '.join(METHODS)} (and their presets, e.g. msr_paper, msr_authors)") from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def _method_of(model: nn.Module, method_or_name) -> Method:
    if isinstance(method_or_name, Method):
        return method_or_name
    if isinstance(method_or_name, str):
        return method(method_or_name)
    found = getattr(model, FINALIZED, None)
    if found is None:
        raise ValueError("this model has no msr-train method: build it with msr_train.build_model or "
                         "msr_train.convert, or pass the method")
    return found


def convert(model: nn.Module, method_or_name: Method | str, **overrides: Any) -> nn.Module:
    """``model`` with ``method``'s layers, initialisation and hooks (msr_train.conversion
    module: what converts and what is refused); ``overrides`` as for ``method()``."""
    chosen = method(method_or_name, **overrides) if isinstance(method_or_name, str) else method_or_name
    return conversion.convert(model, chosen)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float | None = None,
                 method: Method | None = None) -> list[dict]:
    """torch.optim parameter groups of ``model`` with the method's learning-rate
    multipliers applied (MSR's convs at 4 x ``lr``) and its per-group weight decay (nf's
    gains and biases: none); ``weight_decay`` fills the groups that set none."""
    groups = resolve_lr_mult(_method_of(model, method).param_groups(model), lr)
    if weight_decay is not None:
        for g in groups:
            g.setdefault("weight_decay", weight_decay)
    return groups


class HookHandle:
    """What ``attach`` returns: ``remove()`` takes the method's hooks off the optimizer."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def check_optimizer_holds(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """A clear error where the optimizer no longer updates the model's parameters (after
    ``load_state_dict(assign=True)`` or a deepcopy it holds the old tensors, and the
    trained model would silently not train)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stale = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if stale:
        raise RuntimeError(f"the optimizer does not hold {len(stale)} of the model's parameters ({', '.join(stale[:3])}"
                           f"{', ...' if len(stale) > 3 else ''}): the model's parameters were replaced (e.g. by "
                           "load_state_dict(assign=True) or a deepcopy). Build the optimizer from "
                           "msr_train.param_groups(model, ...) of this model and attach again")


def check_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module, method: Method) -> None:
    """A clear error where the optimizer's groups lost the method's learning-rate
    multipliers or per-group weight decay (an optimizer built from ``model.parameters()``
    trains MSR's convs at 1x instead of 4x, silently a different method). The check is on
    ratios (``initial_lr`` where a scheduler has set one), so any base rate passes."""
    wanted = {id(p): g for g in method.param_groups(model) for p in g["params"]}
    rates, offenders = [], []
    for group in optimizer.param_groups:
        lr = group.get("initial_lr", group["lr"])
        for p in group["params"]:
            spec = wanted.get(id(p))
            if spec is None:
                continue
            rates.append((lr / spec.get("lr_mult", 1.0), p))
            if "weight_decay" in spec and group.get("weight_decay") != spec["weight_decay"]:
                offenders.append(f"weight decay {group.get('weight_decay')} where the method sets {spec['weight_decay']}")
    base = rates[0][0] if rates else 0.0
    if any(not math.isclose(r, base, rel_tol=1e-6) for r, _ in rates):
        offenders.append("learning rates not in the method's ratios (lr_mult)")
    if offenders:
        raise ValueError(f"the optimizer's parameter groups are not {method.name}'s: {offenders[0]}. Build it from "
                         "msr_train.param_groups(model, lr=..., weight_decay=...), or pass check_groups=False to "
                         "train with groups of your own on purpose")


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, method: Method | None = None, *,
           check_groups: bool = True) -> HookHandle:
    """Run the method's default clipping (``Method.clipping()``: nf's AGC, bnp's global
    norm) and its ``before_step`` on the final gradients and ``after_step`` after the
    update of every ``optimizer.step()``, as msr-train's loop does. With a closure
    (LBFGS, Lightning's automatic optimisation) ``before_step`` runs inside it, after its
    backward, every time the optimizer calls it. With a GradScaler, ``scaler.step``
    unscales before ``optimizer.step``, so the hooks see unscaled gradients. Each step
    first checks the hooks are bound to the model's current parameters and that the
    optimizer holds them; ``check_groups`` first checks the optimizer's groups are the
    method's (check_param_groups)."""
    method = _method_of(model, method)
    if check_groups:
        check_param_groups(optimizer, model, method)
    clip = GradientClipping(model, method.clipping())

    @torch.no_grad()
    def on_final_gradients(opt):
        clip.ensure_bound(model)
        if clip.active:
            clip()
        method.before_step(model, opt)

    def before(opt, args, kwargs):
        method.ensure_bound(model)
        check_optimizer_holds(opt, model)
        # torch passes the step's own arguments, the optimizer first: (self, closure=None).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            on_final_gradients(opt)
            return None

        def closure_then_hook():
            loss = closure()
            on_final_gradients(opt)
            return loss
        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_hook}
        return (args[0], closure_then_hook, *args[2:]), kwargs

    def after(opt, args, kwargs):
        method.after_step(model, opt)

    return HookHandle([optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)])
