"""Per-parameter gradient and weight norms (``trainer.log_norms``): the signal for tuning
gradient clipping (a clipped unit's gradient norm against its weight norm) and for
diagnosing methods whose steps explode in a few layers (BN Preconditioning).

The loop records the final gradients (accumulated, all-reduced, unscaled, before any
clipping) of the last step before each evaluation; the norms stay on the device (two
foreach norms, one stack) until the evaluation reads them, which syncs anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ParamNormProbe:
    def __init__(self, model: nn.Module):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.pending: torch.Tensor | None = None

    @torch.no_grad()
    def record(self) -> None:
        """Keep this step's gradient and weight norms (a parameter without a gradient
        counts as a zero gradient)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.pending = torch.stack(torch._foreach_norm(grads) + torch._foreach_norm(self.params)).float()

    def read(self) -> dict[str, float]:
        """The recorded norms as ``grad_norm/<parameter>``, ``weight_norm/<parameter>``
        and ``grad_norm/total`` (the global norm that trainer.grad_clip_norm clips);
        empty if nothing was recorded since the last read."""
        if self.pending is None:
            return {}
        values, self.pending = self.pending.tolist(), None
        grads, weights = values[:len(self.names)], values[len(self.names):]
        out = {f"grad_norm/{n}": g for n, g in zip(self.names, grads)}
        out.update({f"weight_norm/{n}": w for n, w in zip(self.names, weights)})
        out["grad_norm/total"] = math.sqrt(sum(g * g for g in grads))
        return out
