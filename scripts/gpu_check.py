#!/usr/bin/env python
"""The first thing to run when a GPU is available: every CUDA path msr-train has, in a few
minutes, as one table.

    python scripts/gpu_check.py                       # on the GPU (about 5-8 minutes)
    python scripts/gpu_check.py --device cpu --quick  # the same code paths on the CPU, in CI

Rows (each ``ok``, ``FAIL`` with what failed, or ``note``):

- ``step``: every method at batch 1 and 128 (ResNet-20, 32x32x3 inputs, 10 classes) for a
  few optimizer steps of ``train.train_step``, hooks included: steps/s and its ratio to
  ``none`` at the same batch, peak device memory and its ratio to ``bn`` (MimicNorm's paper
  claims about 20% less than BN). On CUDA the timed steps run under
  ``torch.cuda.set_sync_debug_mode("error")``: a host sync anywhere in a step fails it.
- ``bf16``: ResNet-50 at batch 1024 with ``trainer.precision=bf16`` and channels_last.
- ``compile``: ``trainer.compile=reduce-overhead`` at batch 1 for msr (CUDA graphs on a GPU:
  MSR's noise draws must be graph-safe), against the same steps eager.
- ``resume``: the CLI killed with SIGKILL after a checkpoint and run again, against an
  uninterrupted run; on CUDA two uninterrupted runs are compared too, since kernels that
  are not deterministic would differ without any kill.
- ``ddp``: two processes (``trainer.devices=2``) against one, same global batch; on a
  machine with one GPU the two processes run on the CPU (gloo), which the row says.

``--quick`` shrinks every size (ResNet-8, batch 8 and 32, 16x16 inputs) so the CPU runs it
in about a minute; nothing is asserted, the table says what held (the test suite runs
``--device cpu --quick`` and checks that every row is ok). docs/benchmarks.md says what to
look at in the GPU's table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from msr_train.checkpoint import find_checkpoint
from msr_train.checks import check_batchnorm_trainable
from msr_train.errors import ConfigError
from msr_train.methods import METHODS, build_method
from msr_train.models import build_model
from msr_train.optim import build_optimizer
from msr_train.precision import Precision
from msr_train.train import train_step


@dataclass
class Row:
    check: str
    setting: str
    result: str
    status: str  # ok | FAIL: ... | note: ...


@dataclass
class Sizes:
    model: str
    image: int
    batches: tuple[int, int]
    steps: int
    big_model: str
    big_batch: int
    run_steps: int  # of the CLI runs (resume, ddp)

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls("resnet8", 16, (8, 32), 3, "resnet8", 64, 12)
        return cls("resnet20", 32, (1, 128), 20, "resnet50", 1024, 300)


def method_cfg(name: str):
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", overrides=[f"method={name}"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Turn any host sync inside the block into an error (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def stepper(method_name: str, model_name: str, batch: int, image: int, device: torch.device, *,
            precision: str = "32", channels_last: bool = False, compile_mode: str | None = None):
    """A function that takes one optimizer step of (model, method) on a fixed batch."""
    cfg = method_cfg(method_name)
    torch.manual_seed(0)
    method = build_method(cfg.method, batch)
    model = build_model(model_name, method, in_channels=3, num_classes=10, image_size=image).to(device)
    check_batchnorm_trainable(model, batch, (3, image, image))
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), batch)
    x = torch.randn(batch, 3, image, image, device=device).to(memory_format=memory)
    y = torch.randint(0, 10, (batch,), device=device)
    net = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    if compile_mode is not None:
        method.compile_step_hooks(compile_mode)
    amp = Precision(precision, device)
    return lambda: train_step(net, method, optimizer, x, y, precision=amp)


def measure(step, steps: int, device: torch.device) -> tuple[float, float]:
    """(steps/s, peak device memory in MB; nan on the CPU) after two untimed steps."""
    step(), step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with no_host_sync(device):
        for _ in range(steps):
            step()
    sync(device)
    rate = steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return rate, peak


def step_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    rows = []
    for batch in sizes.batches:
        measured = {}
        for name in sorted(METHODS):
            try:
                measured[name] = measure(stepper(name, sizes.model, batch, sizes.image, device), sizes.steps, device)
            except ConfigError as e:  # BatchNorm on one value per channel: said up front, as the CLI says it
                rows.append(Row("step", f"{name} batch {batch}", "-", f"note: {str(e)[:90]}"))
            except Exception as e:  # a host sync (CUDA sync debug mode), an unsupported op, ...
                rows.append(Row("step", f"{name} batch {batch}", "-", f"FAIL: {type(e).__name__}: {str(e)[:120]}"))
        none_rate, bn_peak = measured.get("none", (float("nan"),) * 2)[0], measured.get("bn", (0, float("nan")))[1]
        for name, (rate, peak) in measured.items():
            rows.append(Row("step", f"{name} batch {batch}", f"{rate:.1f} steps/s ({rate / none_rate:.2f}x none), "
                            f"{memory_text(peak, bn_peak)}", "ok"))
    return rows


def memory_text(peak: float, bn_peak: float | None = None) -> str:
    if peak != peak:  # nan: a CPU has no allocator statistic
        return "peak memory n/a on the CPU"
    return f"{peak:.0f} MB" + (f" ({peak / bn_peak:.2f}x bn)" if bn_peak else "")


def guarded_row(check: str, setting: str, measure_it) -> Row:
    try:
        return Row(check, setting, *measure_it())
    except Exception as e:
        return Row(check, setting, "-", f"FAIL: {type(e).__name__}: {str(e)[:160]}")


def bf16_row(sizes: Sizes, device: torch.device) -> Row:
    def run():
        rate, peak = measure(stepper("msr", sizes.big_model, sizes.big_batch, sizes.image, device, precision="bf16",
                                     channels_last=True), max(3, sizes.steps // 4), device)
        return f"{rate * sizes.big_batch:.0f} img/s, {memory_text(peak)}", "ok"
    return guarded_row("bf16", f"msr {sizes.big_model} batch {sizes.big_batch}, bf16 + channels_last", run)


def compile_row(sizes: Sizes, device: torch.device) -> Row:
    def run():
        batch = sizes.batches[0]
        eager = measure(stepper("msr", sizes.model, batch, sizes.image, device), sizes.steps, device)[0]
        start = time.perf_counter()
        step = stepper("msr", sizes.model, batch, sizes.image, device, compile_mode="reduce-overhead")
        step()  # compiles
        compile_s = time.perf_counter() - start
        compiled = measure(step, sizes.steps, device)[0]
        return f"{compiled:.1f} steps/s, {compiled / eager:.2f}x eager; compiling took {compile_s:.0f} s", "ok"
    return guarded_row("compile", f"msr batch {sizes.batches[0]}, trainer.compile=reduce-overhead", run)


def cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "msr_train.cli", "debug=quick", "trainer.progress_bar=false",
            "dataset.synthetic_train=512", "trainer.cpu_threads=1", *overrides]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def killed_then_resumed(args: list[str], run_dir: Path, kill_after: int) -> str:
    """Run the CLI, SIGKILL it once a checkpoint past ``kill_after`` is on disk, run it
    again; returns how the kill went."""
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        found = find_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
        if found is not None and found[0]["step"] >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    killed = proc.wait() == -signal.SIGKILL
    subprocess.run([*args, f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
    return "killed" if killed else "finished before the kill"


def resume_row(sizes: Sizes, device: torch.device, work: Path) -> Row:
    def run():
        steps, every = sizes.run_steps, max(2, sizes.run_steps // 4)
        args = cli(f"trainer.accelerator={device.type}", f"trainer.max_steps={steps}", f"trainer.eval_every={every}")
        for name in ("a", "b"):
            subprocess.run([*args, f"hydra.run.dir={work / name}"], check=True, capture_output=True)
        how = killed_then_resumed(args, work / "killed", kill_after=every)
        noise, diff = largest_difference(work / "a", work / "b"), largest_difference(work / "a", work / "killed")
        ok = how == "killed" and diff <= noise
        return (f"{how} after step {every}; max |w - w_uninterrupted| = {diff:.3g} (two uninterrupted runs: "
                f"{noise:.3g})", "ok" if ok else "FAIL: the resumed run differs" if how == "killed" else "note: no kill")
    return guarded_row("resume", f"msr, {sizes.run_steps} steps, SIGKILL after a checkpoint", run)


def ddp_row(sizes: Sizes, device: torch.device, work: Path) -> Row:
    def run():
        on_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
        accelerator = "cuda" if on_gpus else "cpu"
        args = cli(f"trainer.accelerator={accelerator}", f"trainer.max_steps={sizes.run_steps}", "batch_size=16")
        subprocess.run([*args, f"hydra.run.dir={work / 'one'}"], check=True, capture_output=True)
        subprocess.run([*args, "trainer.devices=2", f"hydra.run.dir={work / 'two'}"], check=True, capture_output=True)
        diff = largest_difference(work / "one", work / "two")
        where = "2 GPUs (nccl)" if on_gpus else "the CPU (gloo; this machine has fewer than 2 GPUs)"
        return f"on {where}: max |w_2 - w_1| = {diff:.3g}", "ok" if diff < 1e-4 else "FAIL: 2 processes differ from 1"
    return guarded_row("ddp", f"msr, 2 processes against 1, {sizes.run_steps} steps", run)


def table(rows: list[Row], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"gpu_check on {name} (torch {torch.__version__})", "", "| check | setting | result | status |",
             "|---|---|---|---|"]
    return "\n".join([*lines, *(f"| {r.check} | {r.setting} | {r.result} | {r.status} |" for r in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: the same code paths in about a minute")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu runs the same checks on the CPU")
    if device.type == "cpu":
        torch.set_num_threads(1)  # small steps: more threads only spin-wait (docs/benchmarks.md, "CPU threads")
    sizes = Sizes.of(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [*step_rows(sizes, device), bf16_row(sizes, device), compile_row(sizes, device),
                resume_row(sizes, device, Path(tmp) / "resume"), ddp_row(sizes, device, Path(tmp) / "ddp")]
    print(table(rows, device))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 1 if any(r.status.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
