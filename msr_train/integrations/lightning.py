"""An msr-train method inside a Lightning ``Trainer`` (``pip install -e ".[lightning]"``).

    import lightning as L, msr_train, torch, torchvision
    from msr_train.integrations.lightning import MethodCallback

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)
        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)
        def configure_optimizers(self):   # the method's groups: MSR's convs at 4x the rate
            return torch.optim.SGD(msr_train.param_groups(self.net, lr=0.1), momentum=0.9, weight_decay=5e-4)

    L.Trainer(callbacks=[MethodCallback("msr", module="net")]).fit(Classifier(), loader)

At ``setup`` (before ``configure_optimizers``, so the optimizer holds the converted
layers) the callback converts ``pl_module.<module>`` with msr_train.convert, unless it is
already an msr-train model (msr_train.build_model or convert: pass ``method=None`` and
the model's own method is used). At the start of fit it attaches the method's step hooks
to every optimizer (msr_train.attach), which first checks that the optimizer's groups
carry the method's multipliers.

Where the hooks run in Lightning's step (automatic optimisation): Lightning calls
``optimizer.step(closure)``; the closure runs the backward, then Lightning's
``on_before_optimizer_step`` and its gradient clipping (``gradient_clip_val``, by norm or
by value); attach runs the method's default clipping (nf's AGC, bnp's bound) and
``before_step`` (MSR's zero-mean gradient projection) after that closure returns, so clipping acts before the projection and the projected gradient is the
one the optimizer uses: the invariant holds with either clipping algorithm. With manual
optimisation every ``opt.step()`` runs the hooks the same way. The method's state is in
the model's parameters and buffers, so Lightning's checkpoints hold it; MSR's noise is
drawn from torch's global generator, whose state Lightning does not save, so the callback
saves it (CPU and CUDA) in its own checkpoint state and restores it: ``fit(ckpt_path=...)``
then draws the noise an uninterrupted run would have drawn.

Not done here: ``before_evaluation`` (BN's precise statistics, ``method.precise_bn_batches``)
needs training batches at evaluation time, so a converted ``bn`` with it set is refused.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('msr_train.integrations.lightning needs Lightning: pip install -e ".[lightning]" '
                      '(or pip install "lightning>=2.2")') from e
import torch
from torch import nn

from .. import api
from ..methods.base import FINALIZED, Method


class MethodCallback(pl.Callback):
    """Apply ``method`` (a name such as ``"msr"`` or ``"msr_paper"``, a Method, or None for
    a model msr-train already built) to ``pl_module.<module>`` (the LightningModule itself
    when ``module`` is None); ``overrides`` as for msr_train.method()."""

    def __init__(self, method: str | Method | None = "msr", module: str | None = None, **overrides: Any):
        if overrides and not isinstance(method, str):
            raise ValueError("overrides go with a method name: MethodCallback('msr', noise_at='conv')")
        self.method = api.method(method, **overrides) if isinstance(method, str) else method
        if self.method is not None and self.method.cfg.get("precise_bn_batches"):
            raise ValueError("method.precise_bn_batches needs training batches before each evaluation, which the "
                             "Lightning callback does not provide; set it to 0")
        self.module = module
        self._handles: list[api.HookHandle] = []

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"MethodCallback(module={self.module!r}): the LightningModule has no submodule "
                             f"{self.module!r}; its children: {', '.join(n for n, _ in pl_module.named_children())}")
        return net

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        done = getattr(net, FINALIZED, None)
        if done is None and self.method is None:
            raise ValueError("MethodCallback(None) needs a model msr-train built (msr_train.build_model or "
                             "msr_train.convert); name a method to convert this one")
        if done is None:
            api.convert(net, self.method)  # in place
        elif self.method is not None and done is not self.method:
            raise ValueError(f"the model is already msr-train's {done.name!r}; pass MethodCallback(None) to use "
                             "its own method, or give the callback an unconverted model")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.network(pl_module)
        self._handles = [api.attach(opt, net) for opt in trainer.optimizers]

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
