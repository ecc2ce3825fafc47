"""Helpers several test modules share (a module of its own, so no test file imports
another)."""

import subprocess
import sys
import time

import torch
from torch import nn


def slice_drift(model) -> float:
    """max |slice mean| / |slice| over every k x k conv but the stem (the first conv)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)][1:]
    assert convs
    w = torch.cat([c.weight.detach().flatten(0, 1).flatten(1) for c in convs])
    return (w.mean(1).abs() / w.norm(dim=1)).max().item()


def batches(n=5, channels=3, size=32, classes=10, batch=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, channels, size, size, generator=g) + 0.5,
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


# A run to kill and resume (test_resume, test_trackers). Augmentation and MSR noise both
# draw random numbers: resuming must restore them exactly.
# 128 of the 640 images are held out for validation: selection (best.pt) must survive a resume too,
# and so must the EMA of the weights, which is what is evaluated and selected.
RUN = ["debug=quick", "dataset.synthetic_train=640", "dataset.val_size=128", "dataset.image_size=12",
       "dataset.augment=crop_flip", "method=msr", "method.noise_at=conv", "trainer.eval_every=5", "logger=tensorboard",
       "trainer.ema_decay=0.8"]


def cli(*args, cwd):
    return [sys.executable, "-m", "msr_train.cli", *args], dict(cwd=cwd, capture_output=True, text=True, timeout=300)


def run(*args, cwd):
    cmd, kw = cli(*args, cwd=cwd)
    return subprocess.run(cmd, **kw)


def wait_for_checkpoint(proc, run_dir, min_step):
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        try:
            if torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] >= min_step:
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    raise TimeoutError
