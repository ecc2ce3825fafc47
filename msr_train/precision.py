"""Numeric precision of training (``trainer.precision``): float32, or mixed precision.

- ``32``: everything in float32.
- ``bf16``: forward and loss under ``torch.autocast`` to bfloat16 (float32 weights,
  gradients and optimizer state); bfloat16 has float32's range, so no loss scaling.
- ``16-mixed``: autocast to float16 with a ``GradScaler``: the loss is scaled up before
  backward so small gradients survive float16, and the gradients are unscaled before any
  method hook sees them (ZMG, AGC and BNP act on true gradients, AGC's thresholds compare
  true norms); a step whose gradients overflowed is skipped and the scale lowered.
"""

from __future__ import annotations

import torch

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


class Precision:
    def __init__(self, name, device: torch.device):
        self.name = str(name)
        self.dtype = PRECISIONS[self.name]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "16-mixed" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FULL = Precision("32", torch.device("cpu"))
