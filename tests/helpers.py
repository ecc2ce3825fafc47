"""Helpers several test modules share (a module of its own, so no test file imports
another)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

#: Debian's copy of Fashion-MNIST (apt-get install dataset-fashion-mnist): the real-data tests.
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")


def metrics(run_dir):
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "wall_time_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_agc(grad, weight, clip, eps=1e-3):
    """AGC written out unit by unit: rows of a matrix / filters of a conv kernel, and a
    vector or scalar as a single unit."""
    out = grad.clone()
    units = [...] if grad.dim() <= 1 else range(grad.shape[0])
    for u in units:
        g_norm = math.sqrt(float((grad[u] ** 2).sum()))
        w_norm = max(math.sqrt(float((weight[u] ** 2).sum())), eps)
        if g_norm > clip * w_norm:
            out[u] = grad[u] * (clip * w_norm / g_norm)
    return out


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


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every process on this machine (Linux's /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(pid: int) -> set[int]:
    """Every process whose parent chain leads to ``pid`` now."""
    parents, found = parent_pids(), {pid}
    while grown := {p for p, pp in parents.items() if pp in found and p not in found}:
        found |= grown
    return found - {pid}


def processes_started_with(key: str, value: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose environment at start held key=value."""
    marker, found = f"{key}={value}".encode(), {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and process_alive(int(environ.parent.name)):
                found[int(environ.parent.name)] = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found
