#!/usr/bin/env python
"""Speed and memory of the trainer on this machine: the runner, the methods, their hooks, the data.

Everything is measured in one run and reported as ratios between things measured side by
side, because absolute numbers on a shared CPU drift. Things that are compared are
interleaved (A, B, C, A, B, C, ... with the order rotated every round) and each number is
the median over ``--repeats`` rounds. Nothing is asserted: the script only reports.

Sections (``--sections``):

1. Runner overhead. ``train(cfg, out_dir)`` on a config composed like the CLI's
   (``trainer.max_steps=N``, ``logger=none``, checkpoints and progress bar off, a 1000-image
   test set so the closing evaluation stays short) against a bare hand-written loop: the
   same model built the same way, the same batches from the same in-memory TensorBatches,
   forward / cross-entropy / backward / before_step /
   optimizer step / after_step / zero_grad, nothing else. Both start from a freshly built
   model and time their first N steps, at ``optimizer.lr=0.01`` (at the default lr msr
   diverges at batch 1 within 20 steps, and the runner stops on divergence). Startup (config, data loading, model building) and
   the final evaluation would dominate a short run, so the runner's rate is N divided by
   its own ``train_time_s`` (the loop from the first batch to the last step, evaluation and
   checkpoints excluded); the bare loop is timed over the same span.
2. Methods. For every (model, method): the optimizer step (``train.train_step``) on one
   fixed Fashion-MNIST batch (1x28x28, 10 classes), repeated, all methods of a model
   interleaved: img/s. Peak memory: a CPU has no allocator statistic, so each
   (model, method) runs in a fresh subprocess that builds everything, resets the kernel's
   peak-RSS counter (``/proc/self/clear_refs``), runs two steps and reports the rise of
   VmHWM over the RSS before the steps: activations, gradients, optimizer state and the
   allocator's slack, but not the weights or the data. At the small batch sizes the
   steps/s of every method on the first model.
3. Hook shares, on the first model at the largest batch size. Hooks that run between
   backward and the optimizer step are timed in place (a wrapper around the method's
   before_step / after_step inside the real train_step): ZMG (msr before_step), AGC (nf
   before_step), BNP preconditioning (bnp before_step), weight mean (mimicnorm
   after_step). Work spread through forward and backward is measured by difference
   against an otherwise identical model (same seed, same weights) without it: MSR noise
   (off by default: ``method.noise_at=conv`` against the default), MSR norm anchors
   (``method.anchor_weight=0``), BNP statistics tracking (tracking switched off on the
   layers), and what nf's closed-form Scaled WS node saves (the formula through autograd
   against it). Each share is a percentage of the full step of that method.
4. Data path. Iterating TensorBatches over Fashion-MNIST at the largest batch size, with
   ``augment=none`` and ``augment=crop_flip``: img/s of the batches alone.
5. Methods in the real loop, the numbers that count: steps/s of ``train()`` (as in
   section 1: the runner's own training time over its first N steps) for every method on
   the first model at ``--loop-batch-sizes`` (default 1, 8, 128, 1024), the methods
   interleaved, with each round's ratio to ``none`` (the unnormalised network: the
   limit for every method without BN) and to ``bn``, each median with the rounds' range.
   Before the rounds each setting runs once untimed for one step (warm caches; a method
   that refuses the batch size is reported with its reason). Validation is off
   (``dataset.val_size=0``) so the closing evaluation stays short; it is outside the
   timed span anyway.
6. Operator calls per step (not in the default ``--sections``): aten calls (nested ones
   included) and autograd nodes per ``train_step`` on one fixed batch, for every method
   on the first model at ``--batch-sizes``, counted with torch.profiler. At small batches
   a step is mostly per-op overhead, so the counts say where it goes; they do not depend
   on the machine's load. With ``--compile``, the model and the method's hooks compiled
   as ``trainer.compile=true`` compiles them, and two more counts: calls into compiled
   code (each a guard check, Dynamo's cache lookup) and inductor's fused kernels.
7. Evaluation (not in the default ``--sections``): img/s of the loop's ``evaluate`` over
   5,000 images (the default validation split) at ``--eval-batch-sizes``, under no_grad
   (as the loop runs it) and under inference_mode.

A Markdown summary (machine, command, tables) ends the output; ``--out FILE`` writes it.

    python scripts/bench.py --out docs/benchmarks.md.tables
    python scripts/bench.py --quick --sections 1,3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from msr_train.checks import check_batchnorm_trainable
from msr_train.data import build_data
from msr_train.distributed import Context
from msr_train.errors import ConfigError
from msr_train.methods import METHODS, build_method
from msr_train.methods.bnp import Preconditioned
from msr_train.methods.msr import MSRConv2d
from msr_train.methods.nf import WSConv2d
from msr_train.models import build_model
from msr_train.optim import build_optimizer
from msr_train.train import cpu_settings, evaluate, train, train_step

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST


# ----------------------------------------------------------------------------- building
def make_cfg(*overrides: str):
    """The full run config for these command-line overrides, composed as the CLI does."""
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def build(model_name: str, method_name: str, batch_size: int, *overrides: str):
    """(cfg, model, method, optimizer) built as train() builds them, in training mode."""
    cfg = make_cfg(f"model={model_name}", f"method={method_name}", f"batch_size={batch_size}",
                   "dataset=fashion_mnist", *overrides)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, batch_size)
    model = build_model(cfg.model.name, method, in_channels=INPUT_SHAPE[0], num_classes=cfg.dataset.num_classes,
                        image_size=INPUT_SHAPE[-1], small_input=cfg.model.get("small_input", "auto"))
    check_batchnorm_trainable(model, batch_size, INPUT_SHAPE)
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), batch_size)
    model.train()
    return cfg, model, method, optimizer


_batches: dict[tuple[int, str], object] = {}


def train_batches(batch_size: int, augment: str = "none"):
    """Fashion-MNIST training batches (TensorBatches, in memory), loaded once per setting."""
    key = (batch_size, augment)
    if key not in _batches:
        cfg = make_cfg(f"batch_size={batch_size}", f"dataset.augment={augment}")
        _batches[key] = build_data(cfg.dataset, batch_size=batch_size, eval_batch_size=1000, seed=cfg.seed,
                                   device=torch.device("cpu")).train
    return _batches[key]


def fixed_batch(batch_size: int):
    batches = train_batches(batch_size)
    batches.set_epoch(0)
    return next(iter(batches))


# ----------------------------------------------------------------------------- timing
def interleaved(runs: dict, repeats: int) -> dict[str, list]:
    """Call every run once per round, rotating the order each round; returns each run's
    results, one per round. A run is a callable returning its measurement."""
    names = list(runs)
    results = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(runs[name]())
    return results


def timed_steps(model, method, optimizer, x, y, steps: int) -> float:
    """Seconds per train_step, over ``steps`` steps."""
    tick = time.perf_counter()
    for _ in range(steps):
        train_step(model, method, optimizer, x, y)
    return (time.perf_counter() - tick) / steps


class HookTimer:
    """Replaces a method's hook by itself plus a stopwatch; ``take()`` returns the seconds
    spent in the hook since the last call."""

    def __init__(self, method, hook: str):
        self.inner, self.spent = getattr(method, hook), 0.0
        setattr(method, hook, self)

    def __call__(self, *args):
        tick = time.perf_counter()
        self.inner(*args)
        self.spent += time.perf_counter() - tick

    def take(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent


# ----------------------------------------------------------------------------- 1. runner
#: At the default lr, msr at batch 1 diverges within ~20 steps and the runner stops there;
#: a smaller lr keeps both loops on finite numbers (NaN arithmetic has its own speed).
RUNNER_OVERRIDES = ("optimizer.lr=0.01",)


def runner_rate(model_name: str, method_name: str, batch_size: int, steps: int, threads: int) -> float:
    """Steps/s of train() over its own training time (see the module docstring)."""
    cfg = make_cfg(f"model={model_name}", f"method={method_name}", f"batch_size={batch_size}",
                   "dataset=fashion_mnist", "dataset.test_size=1000", f"trainer.max_steps={steps}",
                   "trainer.accelerator=cpu", f"trainer.cpu_threads={threads}", "logger=none",
                   "trainer.checkpoint=false", "trainer.progress_bar=false", "trainer.resume=never", *RUNNER_OVERRIDES)
    with tempfile.TemporaryDirectory() as out_dir:
        summary = train(cfg, Path(out_dir))
    return summary["step"] / summary["train_time_s"]


def bare_rate(model_name: str, method_name: str, batch_size: int, steps: int) -> float:
    """Steps/s of a hand-written loop over the same model, batches and hooks."""
    _, model, method, optimizer = build(model_name, method_name, batch_size, *RUNNER_OVERRIDES)
    batches = train_batches(batch_size)
    batches.set_epoch(0)
    tick = time.perf_counter()
    for _, (x, y) in zip(range(steps), batches):
        F.cross_entropy(model(x), y).backward()
        method.before_step(model, optimizer)
        optimizer.step()
        method.after_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - tick)


def section_runner(args) -> list[dict]:
    rows = []
    model_name, method_name = args.models[0], args.runner_method
    for batch_size in args.batch_sizes:
        steps = args.runner_steps_small if batch_size < 32 else args.runner_steps_large
        train_batches(batch_size)  # load the data before timing anything
        res = interleaved({
            "runner": lambda: runner_rate(model_name, method_name, batch_size, steps, args.threads),
            "bare": lambda: bare_rate(model_name, method_name, batch_size, steps),
        }, args.repeats)
        ratios = [r / b for r, b in zip(res["runner"], res["bare"])]
        rows.append({"model": model_name, "method": method_name, "batch": batch_size, "steps": steps,
                     "runner": statistics.median(res["runner"]), "bare": statistics.median(res["bare"]),
                     "ratio": statistics.median(ratios)})
        log(f"[1] {model_name}/{method_name} batch {batch_size}: runner {rows[-1]['runner']:.2f} steps/s, "
            f"bare {rows[-1]['bare']:.2f} steps/s, ratio {rows[-1]['ratio']:.3f}")
    return rows


# ----------------------------------------------------------------------------- 2. methods
def memory_probe(model_name: str, method_name: str, batch_size: int, threads: int) -> None:
    """Run in a fresh subprocess: prints the peak RSS rise (MiB) over two training steps."""
    torch.set_num_threads(threads)
    _, model, method, optimizer = build(model_name, method_name, batch_size)
    x, y = fixed_batch(batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_kib("VmRSS")
    for _ in range(2):
        train_step(model, method, optimizer, x, y)
    print(json.dumps({"peak_mib": (proc_status_kib("VmHWM") - before) / 1024}))


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(model_name: str, method_name: str, batch_size: int, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", model_name, method_name, str(batch_size),
                          "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])["peak_mib"]


def method_steppers(model_name: str, methods: list[str], batch_size: int, steps: int) -> tuple[dict, dict]:
    """Per method a run timing ``steps`` train_steps on one fixed batch (after one warm-up
    step), and the methods that cannot train at this batch size, with the reason."""
    x, y = fixed_batch(batch_size)
    runs, skipped = {}, {}
    for name in methods:
        try:
            _, model, method, optimizer = build(model_name, name, batch_size)
        except ConfigError as e:
            skipped[name] = str(e).split(";")[0]
            continue
        train_step(model, method, optimizer, x, y)
        runs[name] = lambda m=model, me=method, o=optimizer: timed_steps(m, me, o, x, y, steps)
    return runs, skipped


def section_methods(args) -> tuple[list[dict], list[dict]]:
    large = max(args.batch_sizes)
    rows = []
    for model_name in args.models:
        steps = max(1, round(args.method_images / large / STEP_COST.get(model_name, 1)))
        runs, skipped = method_steppers(model_name, args.methods, large, steps)
        times = {k: statistics.median(v) for k, v in interleaved(runs, args.repeats).items()}
        for name in args.methods:
            row = {"model": model_name, "method": name, "batch": large}
            if name in times:
                row["img_s"] = large / times[name]
                row["mem"] = peak_memory(model_name, name, large, args.threads)
            else:
                row["skipped"] = skipped[name]
            rows.append(row)
            log(f"[2] {model_name}/{name} batch {large}: " + (
                f"{row['img_s']:.0f} img/s, peak +{row['mem']:.0f} MiB" if "img_s" in row else row["skipped"]))
    small_rows = []
    for batch_size in sorted(b for b in args.batch_sizes if b != large):
        runs, skipped = method_steppers(args.models[0], args.methods, batch_size, args.small_batch_steps)
        times = {k: statistics.median(v) for k, v in interleaved(runs, args.repeats).items()}
        for name in args.methods:
            row = {"model": args.models[0], "method": name, "batch": batch_size}
            if name in times:
                row["steps_s"] = 1 / times[name]
            else:
                row["skipped"] = skipped[name]
            small_rows.append(row)
            log(f"[2] {args.models[0]}/{name} batch {batch_size}: " + (
                f"{row['steps_s']:.1f} steps/s" if "steps_s" in row else row["skipped"]))
    return rows, small_rows


#: Rough step time relative to resnet20, to give every model about the same timing budget.
STEP_COST = {"resnet18": 8.0, "vgg11": 2.0}


# ----------------------------------------------------------------------------- 3. hooks
def _skip_tracking(h, sample_dims):
    """Stands in for Preconditioned._track to switch BNP's statistics off."""


def _ws_through_autograd(conv: WSConv2d) -> torch.Tensor:
    """Scaled WS written as the formula, differentiated by autograd: the reference that
    nf's closed-form node (``ScaledWeightStandardization``) replaced."""
    w = conv.weight
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=conv.eps))
    return (w - mean) * scale * (conv.gain * (conv.gamma * conv.input_scale)).view(-1, 1, 1, 1)


def section_hooks(args) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        steps = args.hook_steps if batch_size > 1 else args.small_batch_steps
        rows += hook_shares(args.models[0], batch_size, steps, args.repeats)
    return rows


#: Untimed steps on the fixed batch before the denormal rows: enough for resnet20 + msr to
#: fit one batch until its softmax underflows (loss 0.0 in float32), where denormals appear.
FIT_STEPS = 30


HOOK_VARIANTS = {  # name -> (method, overrides); the patches are in hook_variant
    "msr": ("msr", ()),
    "msr without noise": ("msr", ("method.noise_at=off",)),
    "msr without anchors": ("msr", ("method.anchor_weight=0",)),
    "msr, scale always on the weight": ("msr", ()),
    # fitted to the fixed batch first (FIT_STEPS untimed steps), with and without
    # trainer.flush_denormal (set per round in hook_shares)
    "msr, fitted batch": ("msr", ()),
    "msr, fitted batch, denormals kept": ("msr", ()),
    "nf": ("nf", ()),
    "nf, WS through autograd": ("nf", ()),
    "bnp": ("bnp", ()),
    "bnp without tracking": ("bnp", ()),
    "mimicnorm": ("mimicnorm", ()),
}
TIMED_HOOKS = {"msr without anchors": "before_step", "nf": "before_step", "bnp": "before_step",
               "mimicnorm": "after_step"}


def hook_variant(model_name: str, name: str, batch_size: int, x, y):
    """(model, method, optimizer, timer or None) of one HOOK_VARIANTS entry, stepped once
    untimed (FIT_STEPS times for the fitted ones); ConfigError where it cannot train."""
    method_name, overrides = HOOK_VARIANTS[name]
    _, model, method, optimizer = build(model_name, method_name, batch_size, *overrides)
    if name == "nf, WS through autograd":
        for conv in model.modules():
            if isinstance(conv, WSConv2d):
                conv.standardized_weight = _ws_through_autograd.__get__(conv)
    if name == "msr, scale always on the weight":  # the former form: folded in at every layer
        for conv in model.modules():
            if isinstance(conv, MSRConv2d):
                conv.scales_output = lambda x: False
    if name == "bnp without tracking":
        for layer in model.modules():
            if isinstance(layer, Preconditioned):
                layer._track = _skip_tracking
    timer = HookTimer(method, TIMED_HOOKS[name]) if name in TIMED_HOOKS else None
    for _ in range(FIT_STEPS if "fitted batch" in name else 1):
        train_step(model, method, optimizer, x, y)
    if timer:
        timer.take()  # drop the untimed steps' time
    return model, method, optimizer, timer


def hook_shares(model_name: str, batch_size: int, steps: int, repeats: int) -> list[dict]:
    x, y = fixed_batch(batch_size)
    runs = {}
    for name in HOOK_VARIANTS:
        try:
            model, method, optimizer, timer = hook_variant(model_name, name, batch_size, x, y)
        except ConfigError as e:  # BatchNorm-based methods at batch 1
            log(f"[3] {name} at batch {batch_size}: skipped ({e})")
            continue

        def run(name=name, model=model, method=method, optimizer=optimizer, timer=timer):
            # process-wide, so set for each timed run
            torch.set_flush_denormal(not name.endswith("denormals kept"))
            step = timed_steps(model, method, optimizer, x, y, steps)
            return step, timer.take() / steps if timer else 0.0

        runs[name] = run
    res = interleaved(runs, repeats)
    torch.set_flush_denormal(make_cfg().trainer.flush_denormal)  # as before the rounds, for the next sections
    rows = hook_rows(res, batch_size)
    for row in rows:
        log(f"[3] batch {batch_size} {row['hook']}: {row['ms']:.2f} ms of {row['step_ms']:.1f} ms "
            f"({100 * row['share']:.1f}%)")
    return rows


def hook_rows(res: dict, batch_size: int) -> list[dict]:
    """Section 3's rows from each variant's (step, hook) times over the rounds."""
    step = {k: [s for s, _ in v] for k, v in res.items()}

    def in_place(name, hook):
        shares = [h / s for s, h in res[name]]
        return {"hook": hook, "method": name, "batch": batch_size, "how": f"timed in {TIMED_HOOKS[name]}",
                "ms": 1e3 * statistics.median(h for _, h in res[name]),
                "step_ms": 1e3 * statistics.median(step[name]), "share": statistics.median(shares)}

    def by_difference(hook, name, without):
        shares = [(a - b) / a for a, b in zip(step[name], step[without])]
        return {"hook": hook, "method": name, "batch": batch_size, "how": f"step minus '{without}' step",
                "ms": 1e3 * statistics.median(a - b for a, b in zip(step[name], step[without])),
                "step_ms": 1e3 * statistics.median(step[name]), "share": statistics.median(shares)}

    rows = [in_place("msr without anchors", "ZMG (gradient projection)"),
            by_difference("MSR noise (noise_at=conv, the default; forward + backward)", "msr", "msr without noise"),
            by_difference("norm anchors (in before_step)", "msr", "msr without anchors"),
            by_difference("MSR scale: always on the weight over the smaller of weight and output",
                          "msr, scale always on the weight", "msr"),
            by_difference("denormals kept (trainer.flush_denormal=false) over flushed, on a fitted batch",
                          "msr, fitted batch, denormals kept", "msr, fitted batch"),
            in_place("nf", "AGC"),
            by_difference("Scaled WS: autograd's graph over nf's closed-form node",
                          "nf, WS through autograd", "nf"),
            in_place("bnp", "BNP preconditioning"),
            by_difference("BNP statistics tracking", "bnp", "bnp without tracking")]
    if "mimicnorm" in res:
        rows.append(in_place("mimicnorm", "weight mean"))
    return rows


# ----------------------------------------------------------------------------- 4. data
def section_data(args) -> list[dict]:
    batch_size = max(args.batch_sizes)

    def run(batches):
        batches.set_epoch(0)
        tick = time.perf_counter()
        n = sum(len(y) for _, (x, y) in zip(range(args.data_batches), batches))
        return n / (time.perf_counter() - tick)

    sources = {augment: train_batches(batch_size, augment) for augment in ("none", "crop_flip")}
    res = interleaved({k: (lambda b=b: run(b)) for k, b in sources.items()}, args.repeats)
    rows = [{"augment": k, "batch": batch_size, "img_s": statistics.median(v)} for k, v in res.items()]
    for row in rows:
        log(f"[4] TensorBatches augment={row['augment']} batch {batch_size}: {row['img_s']:.0f} img/s")
    return rows


# ----------------------------------------------------------------------------- 5. loop
#: Optimizer steps per timed run in section 5: about 2-6 s each on 2 CPU cores (resnet20).
LOOP_STEPS = {1: 200, 8: 100, 128: 10, 1024: 2}


def section_loop(args) -> list[dict]:
    model_name, rows = args.models[0], []
    for batch_size in args.loop_batch_sizes:
        steps = max(1, round(LOOP_STEPS.get(batch_size, max(2, 1280 // batch_size)) * args.loop_scale))
        runs, skipped = {}, {}
        for name in args.methods:
            try:
                loop_rate(model_name, name, batch_size, 1, args.threads)  # refused? (eager: no compile)
            except ConfigError as e:
                skipped[name] = str(e).split(";")[0]
                continue
            runs[name] = lambda n=name: loop_rate(model_name, n, batch_size, steps, args.threads, args.compile)
        res = interleaved(runs, args.repeats)
        for name in args.methods:
            row = {"model": model_name, "method": name, "batch": batch_size, "steps": steps}
            if name in res:
                row["steps_s"] = statistics.median(res[name])
                for base in ("none", "bn"):
                    if base in res:
                        ratios = [a / b for a, b in zip(res[name], res[base])]
                        row[f"vs_{base}"], row[f"vs_{base}_range"] = statistics.median(ratios), (min(ratios), max(ratios))
            else:
                row["skipped"] = skipped[name]
            rows.append(row)
            log(f"[5] {model_name}/{name} batch {batch_size}: " + (
                f"{row['steps_s']:.2f} steps/s, x{row.get('vs_none', float('nan')):.3f} none"
                if "steps_s" in row else row["skipped"]))
    return rows


def loop_rate(model_name: str, method_name: str, batch_size: int, steps: int, threads: int,
              compile: bool = False) -> float:
    """Steps/s of train() with the method's own defaults (its lr included). Compiled
    (``trainer.compile=true``), a run compiles in its first steps: the rate is that of its
    steps after a warm-up, read from two log points of the same run (the loop's own
    training time at each, from metrics.jsonl), so the compile and any difference between
    two runs' compiles stay out of it."""
    if not compile:
        summary, _ = loop_run(model_name, method_name, batch_size, steps, threads)
        return summary["step"] / summary["train_time_s"]
    warm = max(2, steps // 4)
    # Each run compiles from scratch (the on-disk cache helps all alike): dynamo stops
    # compiling a function after 8 recompiles in one process and silently runs it eagerly.
    torch._dynamo.reset()
    _, records = loop_run(model_name, method_name, batch_size, warm + steps, threads, "trainer.compile=true",
                          f"trainer.eval_every={warm}")
    (s0, t0), (s1, t1) = [(r["step"], r["examples_seen"] / r["img_per_s"]) for r in (records[0], records[-1])]
    rate = (s1 - s0) / (t1 - t0)
    log(f"[5] {model_name}/{method_name} batch {batch_size}: the first {s0} steps (the compile) took {t0:.1f} s, "
        f"{t0 - s0 / rate:.1f} s more than at the rate after them")
    return rate


def loop_run(model_name: str, method_name: str, batch_size: int, steps: int, threads: int,
             *overrides: str) -> tuple[dict, list[dict]]:
    """One train() run: its summary (steps done, fewer if it diverged to NaN; the loop's
    own time, train_time_s) and its metrics.jsonl records."""
    cfg = make_cfg(f"model={model_name}", f"method={method_name}", f"batch_size={batch_size}",
                   "dataset=fashion_mnist", "dataset.val_size=0", "dataset.test_size=1000",
                   f"trainer.max_steps={steps}", "trainer.accelerator=cpu", f"trainer.cpu_threads={threads}",
                   "logger=none", "trainer.checkpoint=false", "trainer.progress_bar=false",
                   "trainer.resume=never", "trainer.divergence_factor=null", *overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        summary = train(cfg, Path(out_dir))
        metrics = Path(out_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return summary, records


# ----------------------------------------------------------------------------- 6. ops
#: Steps profiled per (method, batch) in section 6; the counts do not vary between steps.
OPS_STEPS = 3


def section_ops(args) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        x, y = fixed_batch(batch_size)
        for name in args.methods:
            try:
                _, model, method, optimizer = build(args.models[0], name, batch_size)
            except ConfigError as e:
                rows.append({"method": name, "batch": batch_size, "skipped": str(e).split(";")[0]})
                continue
            if args.compile:
                model = torch.compile(model)
                method.compile_step_hooks()
            rows.append({"method": name, "batch": batch_size, **op_counts(model, method, optimizer, x, y)})
            log(f"[6] {name} batch {batch_size}: {rows[-1]['aten']:.0f} aten calls, "
                f"{rows[-1]['nodes']:.0f} autograd nodes per step")
    return rows


#: What section 6 counts, by the profiler event's name.
OP_KINDS = {"aten": lambda key: key.startswith("aten::"),
            "nodes": lambda key: key.startswith("autograd::engine::evaluate_function"),
            "compiled_calls": lambda key: key == "TorchDynamo Cache Lookup",
            "fused_kernels": lambda key: "cpp_fused" in key or key.startswith("triton_")}


def op_counts(model, method, optimizer, x, y) -> dict:
    """``OP_KINDS`` run per optimizer step (aten calls nested ones included: each is a
    dispatch), counted by torch.profiler over a few steps after two untimed (the first
    compiles, where the model is compiled). Inductor's kernels are visible to the
    profiler only with its kernel profiling on, which is set here."""
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True
    for _ in range(2):
        train_step(model, method, optimizer, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(OPS_STEPS):
            train_step(model, method, optimizer, x, y)
    events = prof.key_averages()
    return {kind: sum(e.count for e in events if belongs(e.key)) / OPS_STEPS for kind, belongs in OP_KINDS.items()}


def ops_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        base = next((b for b in rows if b["batch"] == r["batch"] and b["method"] == "none" and "aten" in b), None)
        if "skipped" in r:
            body.append([r["method"], r["batch"], "n/a", "n/a", "", r["skipped"]])
            continue
        body.append([r["method"], r["batch"], f"{r['aten']:.0f}", f"{r['nodes']:.0f}",
                     f"{r['aten'] - base['aten']:+.0f}" if base else "", f"{r['compiled_calls']:.0f}",
                     f"{r['fused_kernels']:.0f}", ""])
    return table(["method", "batch", "aten calls per step", "autograd nodes per step", "aten calls - none's",
                  "calls into compiled code", "fused kernels", "note"], body)


# ----------------------------------------------------------------------------- 7. evaluation
def section_eval(args) -> list[dict]:
    """img/s of the loop's ``evaluate`` over ``args.eval_images`` Fashion-MNIST images
    (5,000: the default validation split) at each eval batch size, as the loop runs it
    (under no_grad) and under inference_mode; interleaved rounds."""
    _, model, _, _ = build(args.models[0], args.runner_method, 128)
    x, y = fixed_batch(args.eval_images)
    runs = {}
    for eval_batch in args.eval_batch_sizes:
        batches = list(zip(x.split(eval_batch), y.split(eval_batch)))
        for mode in ("no_grad", "inference_mode"):
            runs[eval_batch, mode] = lambda b=batches, m=mode: eval_rate(model, b, m)
    res = interleaved(runs, args.repeats)
    rows = []
    for (eval_batch, mode), rates in res.items():
        plain = res[eval_batch, "no_grad"]
        rows.append({"batch": eval_batch, "mode": mode, "img_s": statistics.median(rates),
                     "vs_no_grad": statistics.median(a / b for a, b in zip(rates, plain))})
        log(f"[7] evaluate, eval batch {eval_batch}, {mode}: {rows[-1]['img_s']:.0f} img/s")
    return rows


def eval_rate(model, batches, mode: str) -> float:
    tick = time.perf_counter()
    with torch.inference_mode() if mode == "inference_mode" else contextlib.nullcontext():
        evaluate(model, batches, num_classes=10)
    return sum(len(y) for _, y in batches) / (time.perf_counter() - tick)


# ----------------------------------------------------------------------------- report
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_cell(row: dict, base: str) -> str:
    """The median ratio over rounds, with the rounds' range: the spread a reader judges it by."""
    if f"vs_{base}" not in row:
        return ""
    lo, hi = row[f"vs_{base}_range"]
    return f"{row[f'vs_{base}']:.3f} ({lo:.3f}-{hi:.3f})"


def markdown(args, results: dict, command: str, elapsed: float) -> str:
    out = [f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
           f"{args.threads} threads (torch.set_num_threads); Python {platform.python_version()}.",
           f"Command: `{command}` ({elapsed / 60:.1f} min). Medians of {args.repeats} interleaved rounds.", ""]
    if "runner" in results:
        out += ["### 1. Runner overhead", "", table(
            ["model", "method", "batch", "steps timed", "runner steps/s", "bare loop steps/s", "runner / bare"],
            [[r["model"], r["method"], r["batch"], r["steps"], f"{r['runner']:.2f}", f"{r['bare']:.2f}",
              f"{r['ratio']:.3f}"] for r in results["runner"]]), ""]
    if "methods" in results:
        rows, small_rows = results["methods"]
        body = []
        for r in rows:
            base = next((b for b in rows if b["model"] == r["model"] and b["method"] == "bn" and "img_s" in b), None)
            if "skipped" in r:
                body.append([r["model"], r["method"], r["batch"], "n/a", "n/a", "", "", r["skipped"]])
                continue
            body.append([r["model"], r["method"], r["batch"], f"{r['img_s']:.0f}", f"{r['mem']:.0f}",
                         f"{r['img_s'] / base['img_s']:.2f}" if base else "",
                         f"{r['mem'] / base['mem']:.2f}" if base else "", ""])
        out += ["### 2. Methods", "", table(
            ["model", "method", "batch", "img/s", "peak memory (MiB, RSS rise)", "img/s / bn", "memory / bn",
             "note"], body), ""]
        if small_rows:
            body = []
            for r in small_rows:
                base = next((b for b in small_rows if b["batch"] == r["batch"] and b["method"] == "bn"
                             and "steps_s" in b), None)
                body.append([r["model"], r["method"], r["batch"],
                             f"{r['steps_s']:.1f}" if "steps_s" in r else "n/a",
                             f"{r['steps_s'] / base['steps_s']:.2f}" if base and "steps_s" in r else "",
                             r.get("skipped", "")])
            out += [table(["model", "method", "batch", "steps/s", "steps/s / bn", "note"], body), ""]
    if "hooks" in results:
        out += ["### 3. Hook shares of the step", "", table(
            ["hook", "method", "batch", "measured as", "ms per step", "full step (ms)", "share of step"],
            [[r["hook"], r["method"], r["batch"], r["how"], f"{r['ms']:.2f}", f"{r['step_ms']:.1f}", f"{100 * r['share']:.1f}%"]
             for r in results["hooks"]]), ""]
    if "data" in results:
        out += ["### 4. Data path (TensorBatches, Fashion-MNIST)", "", table(
            ["augment", "batch", "img/s"], [[r["augment"], r["batch"], f"{r['img_s']:.0f}"] for r in results["data"]]),
            ""]
    if "ops" in results:
        out += ["### 6. Operator calls per step (torch.profiler)" + (" (compiled)" if args.compile else ""), "",
                ops_table(results["ops"]), ""]
    if "eval" in results:
        out += [f"### 7. Evaluation ({args.eval_images:,} images, the loop's evaluate())", "", table(
            ["eval batch", "mode", "img/s", "/ no_grad (as the loop runs)"],
            [[r["batch"], r["mode"], f"{r['img_s']:.0f}", f"{r['vs_no_grad']:.3f}"] for r in results["eval"]]), ""]
    if "loop" in results:
        out += ["### 5. Methods in the real loop" + (" (trainer.compile=true)" if args.compile else ""), "", table(
            ["model", "method", "batch", "steps timed", "steps/s", "img/s", "/ none (range over rounds)",
             "/ bn (range)", "note"],
            [[r["model"], r["method"], r["batch"], r["steps"], f"{r['steps_s']:.2f}" if "steps_s" in r else "n/a",
              f"{r['steps_s'] * r['batch']:.0f}" if "steps_s" in r else "n/a",
              ratio_cell(r, "none"), ratio_cell(r, "bn"),
              r.get("skipped", "")] for r in results["loop"]]), ""]
    return "\n".join(out)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=int_list, default=[5, 1, 2, 3, 4],
                   help="which sections to run, in this order (default 5,1,2,3,4)")
    p.add_argument("--models", default="resnet20,resnet18,vgg11",
                   help="models for section 2; the first one is used by sections 1 and 3 (default %(default)s)")
    p.add_argument("--methods", default=",".join(["bn", "msr", "nf", "mimicnorm", "bnp", "none"]),
                   help="methods for section 2 (default: every registered method)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 128],
                   help="section 1 runs each; sections 2-4 use the largest, section 2 also gives steps/s of the "
                        "others on the first model (default 1,128)")
    p.add_argument("--loop-batch-sizes", type=int_list, default=[1, 8, 128, 1024],
                   help="section 5's batch sizes (default 1,8,128,1024)")
    p.add_argument("--eval-batch-sizes", type=int_list, default=[100, 1000, 5000],
                   help="section 7's eval batch sizes (default 100,1000,5000)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    p.add_argument("--runner-method", default="msr", help="method of section 1 (default: msr, the config default)")
    p.add_argument("--loop-scale", type=float, default=1.0,
                   help="section 5: steps timed x this (default 1; compiled runs want more)")
    p.add_argument("--compile", action="store_true",
                   help="sections 5 and 6 with trainer.compile=true (5: the rate after each run's compile)")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20 only, 2 rounds, a few steps")
    p.add_argument("--out", type=Path, help="also write the Markdown summary to this file")
    p.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models, args.methods = args.models.split(","), args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    # Step counts: per round, per timed run.
    args.runner_steps_large, args.runner_steps_small = 12, 150
    args.method_images, args.small_batch_steps, args.hook_steps, args.data_batches = 768, 30, 5, 100
    args.eval_images = 5000
    if args.quick:
        args.eval_images = 500
        args.loop_scale = 0.1
        args.models, args.repeats = args.models[:1], 2
        args.runner_steps_large, args.runner_steps_small = 4, 40
        args.method_images, args.small_batch_steps, args.hook_steps, args.data_batches = 256, 10, 1, 20
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        model_name, method_name, batch_size = args.memory_probe
        memory_probe(model_name, method_name, int(batch_size), args.threads)
        return
    command = shlex.join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    sections = {1: ("runner", section_runner), 2: ("methods", section_methods), 3: ("hooks", section_hooks),
                4: ("data", section_data), 5: ("loop", section_loop), 6: ("ops", section_ops),
                7: ("eval", section_eval)}
    results = {}
    # The steps timed here on fixed batches treat denormals as train() does (trainer.flush_denormal)
    with cpu_settings(make_cfg().trainer, torch.device("cpu"), Context()):
        for number in args.sections:
            key, run = sections[number]
            results[key] = run(args)
    text = markdown(args, results, command, time.perf_counter() - started)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
