"""Gradient clipping for every method: global norm clipping and Adaptive Gradient Clipping.

- Global norm clipping (``trainer.grad_clip_norm``; Pascanu, Mikolov, Bengio 2013, arXiv
  1211.5063): when the norm of all gradients together exceeds the threshold, every
  gradient is scaled by threshold / norm (``torch.nn.utils.clip_grad_norm_``, foreach,
  without a host sync).
- Adaptive Gradient Clipping (``trainer.agc_clip`` = lambda; NFNets, Brock, De, Smith,
  Simonyan 2021, arXiv 2102.06171): per output unit (a conv filter over its whole fan-in,
  a linear row, a vector or scalar parameter as one unit) G is rescaled to
  lambda * max(||W||, 1e-3) where ||G|| exceeds it. Scope as DeepMind's
  experiment_nfnets.py: every parameter except the final classifier's weight.

A method that clips by default says so in ``Method.clipping()`` (nf's AGC, bnp's global
norm); the trainer's settings and the method's are one ``Clipping``, applied by one
``GradientClipping`` (the loop's, and msr_train.attach's in one's own loop) to the final
gradients (accumulated, all-reduced and unscaled), global norm first, before the method's
step hooks (MSR's gradient projection), so a method's invariants hold for the update it
takes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit of a matrix or conv kernel, broadcastable against ``x``:
    over each row's fan-in (dim 0 indexes the units)."""
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def _clip_factor(w_norm: torch.Tensor, g_norm: torch.Tensor, clip: float, eps: float) -> torch.Tensor:
    # A zero gradient gives a huge ratio, clamped to 1: left as is.
    return (w_norm.clamp_min(eps) * clip / g_norm.clamp_min(1e-12)).clamp_max_(1.0)


@torch.no_grad()
def adaptive_clip_(params: list[torch.Tensor], clip: float, eps: float = 1e-3) -> None:
    """AGC in place on the params' gradients: where a unit has ||G|| > clip * max(||W||,
    eps), that unit's G is rescaled to exactly that norm. Vectors and scalars (gains,
    biases, SkipInit) are one unit each and go through foreach norms and one foreach
    multiply: they are most of the parameters, and one op per tensor for them was much of
    AGC's time. Matrices and kernels (one unit per row) stay one tensor at a time:
    flattening them into one segmented vector (``repeat_interleave`` and
    ``segment_reduce``) was slower on CPU. The measurements: docs/benchmarks.md."""
    whole = [p for p in params if p.grad is not None and p.dim() <= 1]
    if whole:
        grads = [p.grad for p in whole]
        factor = _clip_factor(torch.stack(torch._foreach_norm(whole)), torch.stack(torch._foreach_norm(grads)),
                              clip, eps)
        torch._foreach_mul_(grads, list(factor.unbind()))
    for p in params:
        if p.grad is not None and p.dim() > 1:
            p.grad.mul_(_clip_factor(unitwise_norm(p), unitwise_norm(p.grad), clip, eps))


def classifier_weight(model: nn.Module) -> nn.Parameter | None:
    """The final classifier's weight: the last linear layer the model registers (every
    architecture here builds its classifier last)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].weight if linears else None


class BoundToParameters:
    """Something that works on lists it collected from a model (``bind``), kept bound to
    the model's current parameters: after a ``copy.deepcopy``, ``load_state_dict(assign=True)``
    or a call with another model, ``ensure_bound`` binds again. Costs one walk over the
    parameters (no device work); the bound lists keep the old tensors alive, so their ids
    cannot be reused by new ones."""

    def bind(self, model: nn.Module) -> None:
        """Collect what is worked on from ``model``."""

    def ensure_bound(self, model: nn.Module) -> None:
        ids = tuple(map(id, model.parameters()))
        if ids != getattr(self, "_bound_ids", None):
            self.bind(model)
            self._bound_ids = ids


@dataclasses.dataclass(frozen=True)
class Clipping:
    """The clipping of each optimizer step; None: off."""

    #: Global norm clipping's threshold (``trainer.grad_clip_norm``).
    max_norm: float | None = None
    #: AGC's lambda (``trainer.agc_clip``).
    agc: float | None = None

    def combined(self, other: Clipping) -> Clipping:
        """Both clippings as one; a kind set in both would clip every gradient twice, which
        checks.validate_config refuses with the settings' names before this is reached."""
        if (self.max_norm and other.max_norm) or (self.agc and other.agc):
            raise ValueError(f"{self} and {other} would clip every gradient twice")
        return Clipping(self.max_norm or other.max_norm, self.agc or other.agc)


class GradientClipping(BoundToParameters):
    """A ``Clipping`` applied to one model's gradients; called once per optimizer step on
    the final gradients (``ensure_bound`` follows the model's current parameters)."""

    def __init__(self, model: nn.Module, clipping: Clipping):
        self.max_norm, self.agc_clip = clipping.max_norm or None, clipping.agc or None
        self.ensure_bound(model)

    @property
    def active(self) -> bool:
        return self.max_norm is not None or self.agc_clip is not None

    def bind(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        head = classifier_weight(model)
        self.agc_params = [p for p in self.params if p is not head]

    def compile(self, mode: str) -> None:
        """``trainer.compile``: torch.compile the clipping too (AGC is several ops per parameter)."""
        self._clip = torch.compile(self._clip, mode=mode)

    def __call__(self) -> None:
        self._clip()

    def _clip(self) -> None:
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if self.agc_clip is not None:
            adaptive_clip_(self.agc_params, self.agc_clip)
