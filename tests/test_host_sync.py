"""The optimizer step never waits for the device: no operator in
``train.train_step`` reads a tensor's value back to the host, for any method (MSR's noise
on and off, nf's AGC on), with accumulation too. On a GPU such a read (``.item()``,
``bool(t)``, ``float(t)``) stalls the launch queue at every step; the loop reads its
losses only at the log points, outside the step. With 16-mixed, ``GradScaler.step``
hands the fused optimizer (msr-train's, where torch has one for the device) the overflow
flag on the device; a foreach optimizer would make it read the flag, once per step.

Counted on the CPU with a dispatch mode: every host read goes through
``aten::_local_scalar_dense`` (or ``aten::is_nonzero``), whatever the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_cfg
from msr_train.methods import METHODS, build_method
from msr_train.models import build_model
from msr_train.optim import build_optimizer
from msr_train.precision import Precision
from msr_train.train import train_step

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


CASES = [(name, ()) for name in sorted(METHODS)] + [
    ("msr", ("method.noise_at=off",)), ("msr", ("method.noise_at=block_input",)),
    ("nf", ("method.agc_clip=0.01",))]


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}{''.join(o)}" for n, o in CASES])
@pytest.mark.parametrize("accumulate,precision", [(1, "32"), (2, "16-mixed")])
def test_no_step_reads_a_value_back_to_the_host(name, overrides, accumulate, precision, one_thread):
    cfg = make_cfg(f"method={name}", *overrides)
    batch = 8
    torch.manual_seed(0)
    method = build_method(cfg.method, batch)
    model = build_model("resnet8", method, in_channels=1, num_classes=10, image_size=16)
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), batch)
    x, y = torch.randn(batch, 1, 16, 16), torch.randint(0, 10, (batch,))
    amp = Precision(precision, torch.device("cpu"))
    train_step(model, method, optimizer, x, y, accumulate, amp)  # first-step work (lazy state) outside the count
    with HostReads() as reads:
        loss, correct = train_step(model, method, optimizer, x, y, accumulate, amp)
    fused = optimizer.defaults["fused"]
    expected = ["aten._local_scalar_dense.default"] if precision == "16-mixed" and not fused else []  # found_inf
    assert reads.seen == expected, f"{name} {overrides}: {len(reads.seen)} host reads in a step"
    assert torch.isfinite(loss) and 0 <= correct <= batch  # the step did its work (read here, after it)
