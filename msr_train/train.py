"""The training loop: build everything from the config, train, evaluate, log, checkpoint.

Read it top to bottom; the method hooks (see methods.base) are the only places where
training methods differ. A run is resumable at every checkpoint: re-running the same
command into the same output dir continues where it stopped, with the same data order,
random numbers and logs as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import BEST, LAST, save_checkpoint, tidy_checkpoints, what_next
from .checks import check_batchnorm_trainable, check_writable, compile_mode, validate_config
from .clipping import Clipping, GradientClipping
from .data import build_data
from .distributed import Context, launched_group, process_group, spawn
from .ema import WeightEMA
from .entry import RECEIVED
from .errors import ConfigError, RunFailed, describe
from .launch import accept
from .models import build_model
from .optim import build_optimizer, build_scheduler, scaled_lr
from .param_norms import ParamNormProbe
from .precision import FULL, Precision
from .report import end_report, epoch_line, start_banner
from .run_files import CHECKPOINTS, SIGNAL_PROP, SUMMARY
from .rules import shown
from .run_lock import RunLock
from .run_log import RunLog, examples_seen
from .safe_files import remove_torn_writes, size_text, truncate_jsonl, write_fix, write_json
from .signal_prop import conv_mean_shift, record_signal_prop
from .state import (BestModel, LoopState, TrainingWindow, WindowReading, finished_summary, resumable_checkpoints,
                    rng_state, run_about, set_rng_state, window_state)


#: Test sets at least this large get a note before they are evaluated (it takes a while).
SLOW_TEST_SET = 10_000


def train_step(model, method, optimizer, x, y, accumulate: int = 1, precision: Precision = FULL,
               on_gradients: Callable[[], None] | None = None, label_smoothing: float = 0.0):
    """One optimizer step over ``accumulate`` equal micro-batches, with the method's hooks.
    With BatchNorm each micro-batch is normalised with its own statistics. ``model`` may be
    a DistributedDataParallel wrapper: gradients are all-reduced once, in the last
    micro-batch's backward, so the hooks see the reduced (and unscaled) gradients:
    ``on_gradients`` (the loop's norm probe and clipping) first, then the method's. Returns
    the summed data loss (with ``label_smoothing``, the smoothed loss that is trained on)
    and the number of correct predictions, as tensors (no device sync)."""
    loss_sum = correct = 0
    for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
        last = i == accumulate - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with precision.autocast():
                logits = model(xm)
                loss = F.cross_entropy(logits.float(), ym, label_smoothing=label_smoothing)
            precision.backward(loss / accumulate)
        loss_sum = loss_sum + loss.detach() * len(ym)
        correct = correct + (logits.argmax(1) == ym).sum()
    precision.unscale_(optimizer)
    if on_gradients is not None:
        on_gradients()
    method.ensure_bound(model)
    method.before_step(model, optimizer)
    precision.step(optimizer)
    method.after_step(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, correct


@torch.no_grad()
def evaluate(model, batches, num_classes: int, ctx: Context = Context(), precision: Precision = FULL,
             split: str = "test") -> dict:
    """Loss and accuracy on ``batches`` as ``{split}_loss``, ``{split}_acc`` (and top-5 for
    more than 10 classes); with several processes each takes its shard of the set and the
    sums are all-reduced, so every rank returns the whole set's metrics."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, correct top-5, n
    for x, y in batches:
        with precision.autocast():
            logits = model(x).float()
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(),
                             (logits.topk(min(5, num_classes), 1).indices == y[:, None]).any(1).sum().double(),
                             torch.tensor(len(y), dtype=torch.float64, device=device)])
    model.train(was_training)
    loss, correct, correct5, n = ctx.sum(sums).tolist()
    out = {f"{split}_loss": loss / n, f"{split}_acc": correct / n}
    if num_classes > 10:
        out[f"{split}_top5"] = correct5 / n
    return out


#: The console's copy in the run dir's log (conf/config.yaml's hydra.job_logging).
CONSOLE_COPY = logging.getLogger("msr_train.console")


def note(message: str) -> None:
    """A message for the person watching, on stderr and clear of the progress bar."""
    tqdm.write(message, file=sys.stderr)
    CONSOLE_COPY.info(message)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StopSignal:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 ask the loop to finish its step, checkpoint and
    exit cleanly. The first signal puts the previous handler back, so a second one acts at
    once. A cluster's preemption or time-limit signal (SIGUSR1/2, SIGTERM) whose previous
    handler is a function, e.g. submitit's (Hydra's submitit launcher) that requeues the
    job, is handed to it by ``hand_over`` once the checkpoint and summary are written: the
    requeued job continues from them in the same output dir."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: str | None = None
        self._signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if RECEIVED:  # a stop signal before the loop began, whose KeyboardInterrupt was swallowed
            self.received = RECEIVED[-1]
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received, self._signum = signal.Signals(signum).name, signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def hand_over(self) -> None:
        previous = self._previous.get(self._signum)
        if self._signum != signal.SIGINT and callable(previous) and not getattr(previous, "not_handed_over", False):
            previous(self._signum, None)


def train(cfg, out_dir: Path, job_num: int | None = None) -> dict:
    """Train one run into ``out_dir`` (or continue it); returns the summary written there.
    On several devices it starts one process per device and waits for them; in a process
    group that torchrun or SLURM started it trains as this process's rank (see
    ``msr_train.distributed``). ``job_num``: the Hydra multirun job, which picks the GPU
    of a ``trainer.devices=auto`` run."""
    out_dir = Path(out_dir)
    plan = validate_config(cfg, job_num, launched_group())
    check_writable(out_dir)
    # One run per folder: the process that writes (rank 0) holds the lock for its group.
    with RunLock(out_dir) if plan.is_writer else contextlib.nullcontext():
        finished = finished_summary(out_dir, cfg)
        if finished is not None:
            if plan.is_writer:
                note(f"msr-train: {out_dir} has already finished ({finished['status']} at step {finished['step']:,}) "
                     "with these settings: nothing to do (msr-eval evaluates its checkpoints again)")
            return finished
        if plan.is_writer:
            remove_torn_writes(out_dir)  # summary.json's, metrics.jsonl's
        if plan.group is not None:
            rank, world_size, _ = plan.group
            with process_group(plan.device, rank, world_size) as ctx:
                return train_process(cfg, out_dir, plan.method, device=plan.device, ctx=ctx)
        if len(plan.devices) == 1:
            return train_process(cfg, out_dir, plan.method, device=plan.device, ctx=Context())
        tidy_checkpoints(out_dir / CHECKPOINTS)
        try:
            spawn(train_process, plan.devices, (cfg, out_dir, plan.method))
        except RunFailed as e:  # a worker died: rank 0 could not say so itself
            record_failure(out_dir, cfg, str(e))
            raise
        return json.loads((out_dir / SUMMARY).read_text())


@contextlib.contextmanager
def cpu_settings(trainer_cfg, device: torch.device, ctx: Context):
    """The CPU's threads (from here on) and, while the run lasts, its treatment of
    denormal floats, for a run on the CPU."""
    if device.type != "cpu":
        yield
        return
    # Small batches run fastest on one thread, and parallel jobs or processes must not
    # oversubscribe the cores.
    threads = trainer_cfg.cpu_threads or (
        max(1, (os.cpu_count() or 1) // ctx.world_size) if ctx.parallel else None)
    if threads:
        torch.set_num_threads(threads)
    # Arithmetic on denormals (|x| < 1.2e-38 in float32) is many times slower on x86 CPUs,
    # and they appear once gradients are tiny, e.g. on examples the network fits well
    # (docs/benchmarks.md); flushed, such values are zero, which no result can tell apart.
    # The setting is the thread's, Python's own floats included: restored after the run.
    flushing = float(torch.tensor([1e-39]) * 1.0) == 0.0  # (torch has no getter)
    torch.set_flush_denormal(trainer_cfg.flush_denormal)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)


def train_process(cfg, out_dir: Path, method, *, device: torch.device, ctx: Context) -> dict:
    """The training of one process: the whole run, or rank ``ctx.rank``'s part of it, with
    the run plan's ``method`` (not yet applied to a model)."""
    try:
        with cpu_settings(cfg.trainer, device, ctx):
            run = Run(cfg, out_dir, method, device, ctx)
            summary, stop = fit_and_summarise(run, ctx)
        if ctx.is_main:
            note(end_report(summary, Path(out_dir)))
        stop.hand_over()
        return summary
    except OSError as e:  # a full disk, a folder gone read-only: nothing saved so far is touched
        raise write_failed(e, Path(out_dir), cfg) from e


def fit_and_summarise(run: Run, ctx: Context) -> tuple[dict, StopSignal]:
    """The run trained and its summary written, and the signal handler it ran under."""
    # A signal during the final test waits for the summary (the status reached stands).
    with StopSignal() as stop:
        try:
            return run.summarise(run.fit(stop)), stop
        except KeyboardInterrupt:  # a second signal: stop at once, say where things stand
            if ctx.is_main:
                run.summarise("interrupted")
            raise


def record_failure(out_dir: Path, cfg, reason: str) -> None:
    """summary.json of a run that failed (status ``failed`` and why), where the disk still
    takes it; the run resumes from its last checkpoint."""
    with contextlib.suppress(OSError):
        write_json(Path(out_dir) / SUMMARY, {"status": "failed", "reason": reason,
                                             "config": OmegaConf.to_container(cfg, resolve=True)})


def write_failed(error: OSError, out_dir: Path, cfg) -> RunFailed:
    """The error for a write that failed mid-run, after recording the failure in
    summary.json where the disk still takes it."""
    folder = Path(error.filename).parent if error.filename else out_dir
    try:
        free = f"{size_text(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = "its free space is unknown"
    reason = f"could not write to {folder} ({error.strerror or error}; {free})"
    record_failure(out_dir, cfg, reason)
    return RunFailed(f"{reason}. Everything saved before is intact: {write_fix(error)} and resume the run "
                     "(same settings, same output dir) to continue from its last checkpoint.")


class Run:
    """One process's run, in the order it happens: build everything from the config
    (``__init__``), continue from a checkpoint if there is one, ``fit`` (``train_epoch``
    -> ``after_step`` -> ``evaluate_and_log`` / ``checkpoint``), ``summarise``. Only rank
    0 writes; the other ranks still take part in every measurement, whose forward passes
    may hold collectives (SyncBatchNorm)."""

    def __init__(self, cfg, out_dir: Path, method, device: torch.device, ctx: Context):
        self.cfg, self.trainer_cfg, self.out_dir, self.device, self.ctx = cfg, cfg.trainer, Path(out_dir), device, ctx
        self.method = method
        self.ckpt_dir = self.out_dir / CHECKPOINTS
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=self.trainer_cfg.eval_batch_size,
                               seed=cfg.seed, device=device, shard=(ctx.rank, ctx.world_size))
        if self.trainer_cfg.stop_at_val_acc is not None and self.data.val is None:
            raise ConfigError(f"trainer.stop_at_val_acc={self.trainer_cfg.stop_at_val_acc} needs a validation "
                              f"split, but this run has none (dataset.val_size={cfg.dataset.get('val_size')}); set "
                              "dataset.val_size > 0")
        self.build_model()
        # With trainer.ema_decay, the average of the weights is what is evaluated, selected and tested.
        self.ema = WeightEMA(self.model, self.trainer_cfg.ema_decay) if self.trainer_cfg.ema_decay else None
        self.eval_model = self.model if self.ema is None else self.ema.module
        self.optimizer = build_optimizer(cfg.optimizer, self.method.param_groups(self.model), cfg.batch_size)
        # One clipper: the trainer's settings and the clipping the method trains with by default.
        self.clip = GradientClipping(self.model, Clipping(self.trainer_cfg.grad_clip_norm, self.trainer_cfg.agc_clip)
                                     .combined(self.method.clipping()))
        self.norms = ParamNormProbe(self.model) if self.trainer_cfg.log_norms else None
        self.precision = Precision(self.trainer_cfg.precision, device)
        # ``net`` is what the training step calls; ``model`` is the plain module that is
        # evaluated, measured and checkpointed.
        self.net = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None) \
            if ctx.parallel else self.model
        if compile_mode(self.trainer_cfg.compile) is not None:
            # Random ops in compiled code would otherwise use Inductor's own generator: MSR's
            # noise would differ from the eager run's and from the checkpointed RNG state, so
            # a resumed compiled run would not draw what an uninterrupted one draws.
            import torch._inductor.config as inductor_config  # loaded only where compile is used
            inductor_config.fallback_random = True
            self.net = torch.compile(self.net, mode=compile_mode(self.trainer_cfg.compile))
            self.method.compile_step_hooks(compile_mode(self.trainer_cfg.compile))
            self.clip.compile(compile_mode(self.trainer_cfg.compile))
        self.steps_per_epoch = len(self.data.train)
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, self.trainer_cfg.max_steps or math.inf)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=self.total_steps)
        self.state = LoopState()
        self.window = TrainingWindow(device, ctx.is_main)
        self.best = BestModel(self.ckpt_dir / BEST if ctx.is_main and self.trainer_cfg.checkpoint else None,
                              run_about(cfg, self.data.info))
        resumed = self.resume()
        if ctx.is_main:
            accept(self.out_dir)  # every check has passed: this launch's config is the run's record
        self.log = RunLog(self.out_dir, cfg, resume_step=None if resumed is None else self.state.step) \
            if ctx.is_main else None
        self.start_signal_prop(resumed is None)
        # A fixed test batch on which each evaluation logs the per-layer mean shift.
        watched = "tensorboard" in cfg.logger and self.trainer_cfg.mean_shift
        self.probe = next(iter(self.data.test))[0][:64] if watched else None

    def build_model(self) -> None:
        info, ctx = self.data.info, self.ctx
        self.input_shape = (info.in_channels, info.image_size, info.image_size)
        self.model = build_model(self.cfg.model.name, self.method, in_channels=info.in_channels,
                                 num_classes=info.num_classes, image_size=info.image_size,
                                 small_input=self.cfg.model.get("small_input", "auto")).to(self.device)
        self.method.check_micro_batch(self.method.micro_batch)
        check_batchnorm_trainable(self.model, self.method.micro_batch, self.input_shape)
        if ctx.parallel:
            self.model = self.method.convert_for_processes(self.model)
        self.memory_format = torch.channels_last if self.trainer_cfg.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)

    def resume(self) -> dict | None:
        """Continue from the output dir's newest usable checkpoint, if there is one; returns
        it. One that loads but does not fit (missing keys, wrong shapes) is skipped for the
        previous one, like one that does not load."""
        for state, path, problems in resumable_checkpoints(self.cfg, self.ckpt_dir, tidy=not self.ctx.parallel):
            try:
                self.apply_checkpoint(state)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                problems.append(f"{path.name}: {describe(e)}")
                note(f"msr-train: checkpoint {path} does not fit this run ({problems[-1]}); {what_next(path)}")
                continue
            if self.ctx.is_main:
                note(f"Resuming {self.out_dir} at step {self.state.step} of {self.total_steps}"
                     f"{'' if path.name == LAST else f' (from {path.name})'}")
            return state
        return None

    def apply_checkpoint(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("precision", {}))
        self.state.load_state_dict(state["loop"])
        self.window.load_state_dict(window_state(state))
        set_rng_state(state["rng"], self.device)
        self.best.restore(self.ckpt_dir, state.get("best"), self.state.best_val_step, self.device)

    def start_signal_prop(self, fresh: bool) -> None:
        if not self.trainer_cfg.signal_prop:
            return
        if self.ctx.is_main:
            # Records of epochs the resumed run will redo are dropped, like metrics.jsonl's.
            truncate_jsonl(self.out_dir / SIGNAL_PROP,
                           lambda r: r["epoch"] * self.steps_per_epoch <= self.state.step)
        if fresh:
            self.record_signal_prop(0)

    def record_signal_prop(self, epoch: int) -> None:
        record_signal_prop(self.model, self.out_dir if self.ctx.is_main else None, epoch,
                           self.log.writer if self.log is not None else None, self.input_shape, self.device)

    def wall_time(self) -> float:
        """Seconds since the run first started, across resumptions."""
        return self.earlier_wall_time + time.perf_counter() - self.started

    def fit(self, stop: StopSignal) -> str:
        """Train to the end (or a divergence, or a stop signal); returns the status."""
        self.stop, self.started, self.earlier_wall_time = stop, time.perf_counter(), self.state.wall_time
        if self.ctx.is_main:
            note(start_banner(self.cfg, self.out_dir, self.device, self.ctx, self.data.info,
                              sum(p.numel() for p in self.model.parameters()), self.total_steps,
                              self.steps_per_epoch))
            if compile_mode(self.trainer_cfg.compile) is not None:
                note(f"Compiling the model (trainer.compile={shown(self.trainer_cfg.compile)}): the first steps take "
                     "a while.")
        self.model.train()
        status = "completed" if self.state.step >= self.total_steps else self.target_status()
        while status is None:
            status = self.train_epoch()
        return status

    def train_epoch(self) -> str | None:
        """Train to the end of the current epoch; the run's status if the run ended."""
        epoch, first_batch = divmod(self.state.step, self.steps_per_epoch)
        self.data.train.set_epoch(epoch, first_batch)
        bar = tqdm(total=min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch),
                   initial=first_batch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True,
                   disable=not (self.trainer_cfg.progress_bar and self.ctx.is_main), leave=False)
        self.tick = time.perf_counter()
        try:
            for x, y in self.data.train:
                loss_sum, correct = train_step(self.net, self.method, self.optimizer,
                                               x.contiguous(memory_format=self.memory_format), y,
                                               self.trainer_cfg.accumulate, self.precision, self.gradients_ready,
                                               self.trainer_cfg.label_smoothing)
                self.window.add(loss_sum, correct, len(y) * self.ctx.world_size)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.state.step)
                self.state.step += 1
                bar.update()
                status = self.after_step(bar)
                if status is not None:
                    return status
        finally:
            bar.close()
        return None

    def gradients_ready(self) -> None:
        """The step's final gradients, before the method's hooks: the norms the next
        evaluation logs, then the trainer's clipping."""
        if self.norms is not None and self.evaluates_at(self.state.step + 1):
            self.norms.record()
        if self.clip.active:
            self.clip()

    def evaluates_at(self, step: int) -> bool:
        """Whether the run evaluates after optimizer step ``step``."""
        return step % self.steps_per_epoch == 0 or step == self.total_steps or bool(
            self.trainer_cfg.eval_every and step % self.trainer_cfg.eval_every == 0)

    def after_step(self, bar) -> str | None:
        """Log, evaluate, checkpoint or stop where this step calls for it; the run's
        status if it ends here."""
        step, t = self.state.step, self.trainer_cfg
        evaluate_now = self.evaluates_at(step)
        # A single process answers a stop signal at once; a group at the next log point,
        # where its ranks agree on it.
        stopping = bool(self.stop.received) and not self.ctx.parallel
        if step % t.log_every == 0 or evaluate_now or stopping:
            # Always before a checkpoint, so diverged weights are never saved.
            reading = self.read_window(bar)
            stopping = reading.stop_requested
            if self.diverged(reading.mean_loss):
                return "diverged"
        reached = None
        if evaluate_now:
            self.evaluate_and_log(reading)
            reached = self.target_status()
            stopping = stopping or reached is not None
        if evaluate_now or stopping:
            self.checkpoint()
            self.tick = time.perf_counter()
        if reached is not None:
            return reached
        if stopping:
            if self.ctx.is_main:
                note(f"{self.stop.received or 'a stop signal'}: stopped at step {step} with a checkpoint; "
                     "resume it with the same settings in the same output dir.")
            return "interrupted"
        return "completed" if step >= self.total_steps else None

    def target_status(self) -> str | None:
        """"reached_target" once validation accuracy has reached trainer.stop_at_val_acc
        (time-to-accuracy runs; rank 0's best_val_acc is every rank's: the sums are all-reduced)."""
        target, best = self.trainer_cfg.stop_at_val_acc, self.state.best_val_acc
        return "reached_target" if target is not None and best is not None and best >= target else None

    def diverged(self, running_loss: float) -> bool:
        """A NaN or infinite loss, or one far above chance level (ln(num_classes)): a
        finite explosion (e.g. 5e12) is as lost as a NaN, and must not pass as completed."""
        factor = self.trainer_cfg.divergence_factor
        limit = math.inf if factor is None else factor * math.log(self.data.info.num_classes)
        if math.isfinite(running_loss) and running_loss <= limit:
            return False
        if self.ctx.is_main:
            why = "" if not math.isfinite(running_loss) else \
                f", above {factor} x ln({self.data.info.num_classes}) = {limit:.3g} (trainer.divergence_factor)"
            note(f"Training diverged at step {self.state.step}: the running loss is {running_loss:.4g}{why}. "
                 "Lower optimizer.lr or add warmup (scheduler.warmup_epochs).")
        return True

    def read_window(self, bar) -> WindowReading:
        """The training window's one reading at this log point (all ranks); books the
        training time, updates the progress bar and logs the loss since the last reading."""
        reading = self.window.read(self.ctx, bool(self.stop.received))
        self.state.train_time += time.perf_counter() - self.tick
        self.tick = time.perf_counter()
        bar.set_postfix(loss=f"{reading.mean_loss:.3f}", acc=f"{reading.accuracy:.3f}",
                        img_s=f"{self.examples_seen / self.state.train_time:.0f}")
        interval = self.window.interval_loss(reading)
        if self.log is not None and interval is not None:  # read anyway: no extra device sync
            self.log.scalars({"train/loss": interval, "lr": self.base_lr()}, self.state.step)
        return reading

    @property
    def examples_seen(self) -> int:
        return examples_seen(self.state.step, self.cfg.batch_size)

    def base_lr(self) -> float:
        """The scheduled learning rate every method shares (optimizer.lr scaled to the
        batch, times the schedule's factor now), without a method's per-group multipliers
        (MSR's convs train at 4x it): the ``lr`` that is logged."""
        group = next((g for g in self.optimizer.param_groups if g["initial_lr"]), None)
        factor = 0.0 if group is None else group["lr"] / group["initial_lr"]
        return scaled_lr(self.cfg.optimizer, self.cfg.batch_size) * factor

    def training_batches(self, count: int):
        """The current epoch's first ``count`` micro-batches (precise BN's calibration data),
        read from a replay of the epoch: the iteration in progress is untouched."""
        epoch = min(self.state.step // self.steps_per_epoch, self.cfg.epochs - 1)
        micro = (x.contiguous(memory_format=self.memory_format).chunk(self.trainer_cfg.accumulate)
                 for x, _ in self.data.train.replay(epoch))
        return itertools.islice((x for chunks in micro for x in chunks), count)

    def evaluate_splits(self) -> dict:
        """Validation (and the best model's update), and the test set at the end or, if
        asked, at every evaluation (to watch, never to select)."""
        step, info, ctx = self.state.step, self.data.info, self.ctx
        metrics = {}
        if self.data.val is not None:
            metrics.update(evaluate(self.eval_model, self.data.val, info.num_classes, ctx, self.precision,
                                    split="val"))
            if self.state.best_val_acc is None or metrics["val_acc"] > self.state.best_val_acc:
                self.state.best_val_acc, self.state.best_val_step = metrics["val_acc"], step
                self.best.update(self.eval_model, step, metrics["val_acc"])
            metrics["best_val_acc"] = self.state.best_val_acc
            if self.ema is not None:  # the trained weights on the same trajectory: what the average adds
                metrics.update(evaluate(self.model, self.data.val, info.num_classes, ctx, self.precision,
                                        split="val_raw"))
        if step == self.total_steps or self.trainer_cfg.test_every_eval:
            if step == self.total_steps and ctx.is_main and info.test_size >= SLOW_TEST_SET:
                note(f"Testing the final model on {info.test_size:,} images.")
            metrics.update(evaluate(self.eval_model, self.data.test, info.num_classes, ctx, self.precision,
                                    split="test"))
        return metrics

    def evaluate_and_log(self, reading: WindowReading) -> None:
        step, ctx = self.state.step, self.ctx
        # With an EMA both the average and the trained weights are evaluated, alike.
        for model in (self.eval_model,) if self.ema is None else (self.eval_model, self.model):
            self.method.before_evaluation(model, self.training_batches, ctx)
            ctx.broadcast_buffers(model)  # every shard is evaluated with rank 0's running statistics
        metrics = self.evaluate_splits()
        shift = conv_mean_shift(self.model, self.probe) if self.probe is not None else {}
        norms = self.norms.read() if self.norms is not None else {}
        if self.trainer_cfg.signal_prop and step % self.steps_per_epoch == 0:
            self.record_signal_prop(step // self.steps_per_epoch)
        self.window.reset()
        if self.log is None:
            return
        record = {
            "step": step, "epoch": step / self.steps_per_epoch, "examples_seen": self.examples_seen,
            "train_loss": reading.mean_loss, "train_acc": reading.accuracy, **metrics, "lr": self.base_lr(),
            "img_per_s": self.examples_seen / max(self.state.train_time, 1e-9), "wall_time_s": self.wall_time(), **norms,
        }
        self.log.log(record)
        if step % self.steps_per_epoch == 0:  # the bar is erased at the epoch's end: one line stays
            note(epoch_line(record, self.cfg.epochs))
        if shift:
            self.log.scalars({f"mean_shift/{name}": v for name, v in shift.items()}, step)

    def checkpoint(self) -> None:
        if not (self.trainer_cfg.checkpoint and self.ctx.is_main):
            return
        self.state.wall_time = self.wall_time()
        save_checkpoint(self.ckpt_dir, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict(),
            "step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
            **run_about(self.cfg, self.data.info), "loop": self.state.state_dict(), "window": self.window.state_dict(),
            "rng": rng_state(self.device), **({} if self.ema is None else {"ema": self.ema.state_dict()}),
            "best": self.best.state_dict(),
        })

    def select_and_test(self, record: dict) -> dict:
        """Test metrics of the model selected on validation (``test_acc``, ...): the best
        validation evaluation's weights, or the final model without a validation split.
        The test set plays no part in the choice."""
        final = {k: v for k, v in record.items() if k.startswith("test_")}
        if self.best.state is None or self.state.best_val_step == self.state.step:
            return final
        self.eval_model.load_state_dict(self.best.state)
        return evaluate(self.eval_model, self.data.test, self.data.info.num_classes, self.ctx, self.precision,
                        split="test")

    def summarise(self, status: str) -> dict:
        """The run's summary (summary.json, written by rank 0), after the final test."""
        cfg, state, step = self.cfg, self.state, self.state.step
        record = self.log.records[-1] if self.log is not None and self.log.records else {}
        selected = self.select_and_test(record) if status == "completed" else {}
        if self.log is not None and "test_acc" in selected:
            self.log.scalars({"test/selected_acc": selected["test_acc"]}, step)
        summary = {
            "status": status, "model": cfg.model.name, "method": cfg.method.name, "dataset": cfg.dataset.name,
            "optimizer": cfg.optimizer.name, "scheduler": cfg.scheduler.name, "batch_size": cfg.batch_size,
            "lr": cfg.optimizer.lr, "epochs": cfg.epochs, "seed": cfg.seed, "step": step,
            "examples_seen": self.examples_seen, "final_train_loss": record.get("train_loss"),
            "final_val_acc": record.get("val_acc"), "best_val_acc": state.best_val_acc,
            "best_val_step": state.best_val_step,
            "best_val_epoch": None if state.best_val_step is None else state.best_val_step / self.steps_per_epoch,
            "selection": "best validation accuracy" if self.data.val is not None
            else "final model (no validation split)",
            **{f"selected_{k}": v for k, v in selected.items()},
            **{f"final_{k}": record.get(k) for k in ("test_acc", "test_loss", "test_top5") if k in record},
            "total_time_s": self.wall_time(), "train_time_s": state.train_time,
            "img_per_s": self.examples_seen / max(state.train_time, 1e-9),
            "params": sum(p.numel() for p in self.model.parameters()),
            "peak_memory_mb": peak_memory_mb(self.device), "device": str(self.device),
            "processes": self.ctx.world_size, "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if self.log is not None:
            self.log.close(summary)
        return summary
