"""The training loop: build everything from the config, train, evaluate, log, checkpoint.

Read it top to bottom; the method hooks (see methods.base) are the only places where
training methods differ. A run is resumable at every checkpoint: re-running the same
command into the same output dir continues where it stopped, with the same data order,
random numbers and logs as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import BEST, BEST_PREVIOUS, atomic_write, find_checkpoint, remove_torn_writes, save_checkpoint
from .checks import check_batchnorm_trainable, check_parallel, check_writable, select_devices, validate_config
from .data import build_data
from .distributed import Context, init_group, launched_group, spawn
from .errors import ConfigError
from .methods import build_method
from .models import build_model
from .optim import build_optimizer, build_scheduler
from .precision import FULL, Precision
from .run_log import RunLog, flat_hparams, truncate_jsonl
from .signal_prop import FILENAME as SIGNAL_PROP_FILE
from .signal_prop import conv_mean_shift, record_signal_prop

#: Settings a resumed run may change: where things are and how the run is watched.
RESUMABLE_CHANGES = ("trainer.", "dataset.root", "dataset.download", "dataset.num_workers")


def train_step(model, method, optimizer, x, y, accumulate: int = 1, precision: Precision = FULL):
    """One optimizer step over ``accumulate`` equal micro-batches, with the method's hooks.
    With BatchNorm each micro-batch is normalised with its own statistics. ``model`` may be
    a DistributedDataParallel wrapper: gradients are all-reduced once, in the last
    micro-batch's backward, so the hooks see the reduced (and unscaled) gradients. Returns
    the summed data loss and the number of correct predictions, as tensors (no device sync)."""
    loss_sum = correct = 0
    for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
        last = i == accumulate - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with precision.autocast():
                logits = model(xm)
                loss = F.cross_entropy(logits.float(), ym)
            precision.backward(loss / accumulate)
        loss_sum = loss_sum + loss.detach() * len(ym)
        correct = correct + (logits.argmax(1) == ym).sum()
    precision.unscale_(optimizer)
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
    model.train()
    loss, correct, correct5, n = ctx.sum(sums).tolist()
    out = {f"{split}_loss": loss / n, f"{split}_acc": correct / n}
    if num_classes > 10:
        out[f"{split}_top5"] = correct5 / n
    return out


class BestModel:
    """The model selected on validation: the weights of the evaluation with the highest
    validation accuracy so far (the earliest on ties), kept in memory for the final test
    and, when ``path`` is set, in ``checkpoints/best.pt``. The file it replaces stays as
    ``best_prev.pt`` until the next checkpoint, so a kill between writing best.pt and
    last.pt leaves the best model of the checkpoint a resumed run continues from."""

    def __init__(self, path: Path | None):
        self.path, self.state = path, None

    def update(self, model: torch.nn.Module, step: int, val_acc: float) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.path is not None:
            atomic_write(self.path, lambda f: torch.save({"model": self.state, "step": step, "val_acc": val_acc}, f),
                         keep_previous_as=self.path.with_name(BEST_PREVIOUS))

    def restore(self, folder: Path, step: int | None, device: torch.device) -> None:
        """Load the best model of a resumed run: the file that holds ``step``'s weights."""
        for name in (BEST, BEST_PREVIOUS):
            path = folder / name
            if step is not None and path.exists():
                saved = torch.load(path, map_location=device, weights_only=True)
                if saved["step"] == step:
                    self.state = saved["model"]
                    return
        if step is not None:
            raise ConfigError(f"{folder} has no {BEST} for the best validation step {step} that its last "
                              "checkpoint names; move the folder away to start afresh")


def note(message: str) -> None:
    """A message for the person watching, on stderr and clear of the progress bar."""
    tqdm.write(message, file=sys.stderr)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StopSignal:
    """SIGTERM and SIGINT ask the loop to finish its step, checkpoint and exit cleanly. The
    first signal puts the previous handler back, so a second one acts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_state(cfg, ckpt_dir: Path, tidy: bool = True) -> dict | None:
    """The checkpoint to continue from, or None to start afresh. ``tidy``: first remove
    the leftovers of a write that a kill interrupted (one process of a group does it)."""
    if tidy:
        remove_torn_writes(ckpt_dir)
    found = find_checkpoint(ckpt_dir)
    if found is None:
        return None
    state, path = found
    if cfg.trainer.resume == "never":
        raise ConfigError(f"{ckpt_dir.parent} already holds a run ({path.name}); continue it with "
                          "trainer.resume=auto or choose another hydra.run.dir")
    saved, now = flat_hparams(OmegaConf.create(state["config"])), flat_hparams(cfg)
    changed = sorted(k for k in saved.keys() | now.keys()
                     if not k.startswith(RESUMABLE_CHANGES) and saved.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed[:5])
        raise ConfigError(f"{path} belongs to a run with other settings ({diff}); re-run it with its "
                          "own settings to resume, or choose another hydra.run.dir")
    return state


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def select_and_test(model, best: BestModel, data, loop: dict, step: int, record: dict, ctx: Context,
                    precision: Precision) -> dict:
    """Test metrics of the model selected on validation (``test_acc``, ``test_loss``, ...):
    the best validation evaluation's weights, or the final model without a validation
    split. The test set plays no part in the choice."""
    final = {k: v for k, v in record.items() if k.startswith("test_")}
    if best.state is None or loop["best_val_step"] == step:
        return final
    model.load_state_dict(best.state)
    return evaluate(model, data.test, data.info.num_classes, ctx, precision, split="test")


def train(cfg, out_dir: Path, job_num: int | None = None) -> dict:
    """Train one run into ``out_dir`` (or continue it); returns the summary written there.
    On several devices it starts one process per device and waits for them; in a process
    group that torchrun or SLURM started it trains as this process's rank (see
    ``msr_train.distributed``). ``job_num``: the Hydra multirun job, which picks the GPU
    of a ``trainer.devices=auto`` run."""
    out_dir = Path(out_dir)
    validate_config(cfg)
    check_writable(out_dir)
    devices = select_devices(cfg.trainer, job_num)
    group = launched_group()
    if group is not None:
        rank, world_size, local_rank = group
        device = torch.device("cuda", local_rank) if devices[0].type == "cuda" else devices[0]
        check_parallel(cfg, world_size, device)
        ctx = init_group(device, rank, world_size)
        try:
            return train_process(cfg, out_dir, device=device, ctx=ctx)
        finally:
            dist.destroy_process_group()
    check_parallel(cfg, len(devices), devices[0])
    if len(devices) == 1:
        return train_process(cfg, out_dir, device=devices[0], ctx=Context())
    remove_torn_writes(out_dir / "checkpoints")
    spawn(train_process, devices, (cfg, out_dir))
    return json.loads((out_dir / "summary.json").read_text())


def train_process(cfg, out_dir: Path, *, device: torch.device, ctx: Context) -> dict:
    """The training of one process: the whole run, or rank ``ctx.rank``'s part of it."""
    ckpt_dir = out_dir / "checkpoints"
    t = cfg.trainer
    if device.type == "cpu":
        # Small batches run fastest on one thread, and parallel jobs or processes must not
        # oversubscribe the cores.
        threads = t.cpu_threads or (max(1, (os.cpu_count() or 1) // ctx.world_size) if ctx.parallel else None)
        if threads:
            torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    accumulate = t.accumulate
    method = build_method(cfg.method, cfg.batch_size)
    data = build_data(cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=t.eval_batch_size, seed=cfg.seed,
                      device=device, shard=(ctx.rank, ctx.world_size))
    info, train_batches = data.info, data.train
    model = build_model(cfg.model.name, method, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, small_input=cfg.model.get("small_input", "auto")).to(device)
    input_shape = (info.in_channels, info.image_size, info.image_size)
    micro_batch = cfg.batch_size // (accumulate * ctx.world_size)
    method.check_micro_batch(micro_batch)
    check_batchnorm_trainable(model, micro_batch, input_shape)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    if ctx.parallel and cfg.method.get("sync_bn"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), cfg.batch_size)
    precision = Precision(t.precision, device)
    # ``net`` is what the training step calls; ``model`` is the plain module that is
    # evaluated, measured and checkpointed.
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if ctx.parallel else model
    if t.compile:
        net = torch.compile(net)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    loop = {"step": 0, "best_val_acc": None, "best_val_step": None, "train_time": 0.0, "wall_time": 0.0,
            "window_loss": 0.0, "window_correct": 0.0, "window_n": 0}
    best = BestModel(ckpt_dir / BEST if ctx.is_main and t.checkpoint else None)
    resumed = resume_state(cfg, ckpt_dir, tidy=not ctx.parallel)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        precision.load_state_dict(resumed.get("precision", {}))
        loop.update(resumed["loop"])
        if not ctx.is_main:  # the saved training window's sums are global: rank 0 carries them
            loop.update(window_loss=0.0, window_correct=0.0)
        set_rng_state(resumed["rng"], device)
        best.restore(ckpt_dir, loop["best_val_step"], device)
        if ctx.is_main:
            note(f"Resuming {out_dir} at step {loop['step']} of {total_steps}")
    # Only rank 0 writes; the other ranks still take part in every measurement, whose
    # forward passes may hold collectives (SyncBatchNorm).
    log = RunLog(out_dir, cfg, tensorboard=t.tensorboard, resume_step=None if resumed is None else loop["step"]) \
        if ctx.is_main else None
    writer = log.writer if log is not None else None
    signal_prop_path = out_dir if ctx.is_main else None
    if t.signal_prop:
        if ctx.is_main:
            # Records of epochs the resumed run will redo are dropped, like metrics.jsonl's.
            truncate_jsonl(out_dir / SIGNAL_PROP_FILE, lambda r: r["epoch"] * steps_per_epoch <= loop["step"])
        if resumed is None:
            record_signal_prop(model, signal_prop_path, 0, writer, input_shape, device)
    # A fixed test batch on which each evaluation logs the per-layer mean shift.
    probe = next(iter(data.test))[0][:64] if t.tensorboard else None

    step, status = loop["step"], "completed"
    started, earlier_wall_time = time.perf_counter(), loop["wall_time"]

    def wall_time() -> float:  # across resumptions
        return earlier_wall_time + time.perf_counter() - started

    # Training loss and accuracy since the last evaluation, summed on the device.
    window_loss = torch.tensor(loop["window_loss"], device=device)
    window_correct = torch.tensor(loop["window_correct"], device=device)

    def window() -> tuple[float, float, bool]:
        """The training window's loss and correct sums over all ranks, and whether any
        rank was asked to stop: the ranks agree on every decision made from them."""
        flags = torch.stack([window_loss.double(), window_correct.double(),
                             torch.tensor(float(bool(stop.received)), dtype=torch.float64, device=device)])
        total_loss, total_correct, stops = ctx.sum(flags).tolist()
        return total_loss, total_correct, stops > 0

    def checkpoint() -> None:
        if not t.checkpoint:
            return
        total_loss, total_correct, _ = window()
        if not ctx.is_main:
            return
        loop.update(step=step, wall_time=wall_time(), window_loss=total_loss, window_correct=total_correct)
        save_checkpoint(ckpt_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "precision": precision.state_dict(), "step": step,
            "epoch": step / steps_per_epoch, "config": OmegaConf.to_container(cfg, resolve=True),
            "loop": dict(loop), "rng": rng_state(device),
        })

    def evaluate_and_log() -> None:
        ctx.broadcast_buffers(model)  # every shard is evaluated with rank 0's running statistics
        metrics = {}
        if data.val is not None:
            metrics.update(evaluate(model, data.val, info.num_classes, ctx, precision, split="val"))
            if loop["best_val_acc"] is None or metrics["val_acc"] > loop["best_val_acc"]:
                loop.update(best_val_acc=metrics["val_acc"], best_val_step=step)
                best.update(model, step, metrics["val_acc"])
            metrics["best_val_acc"] = loop["best_val_acc"]
        # The test set: the final model, or every evaluation if asked (to watch, never to select).
        if step == total_steps or t.test_every_eval:
            metrics.update(evaluate(model, data.test, info.num_classes, ctx, precision, split="test"))
        n = max(loop["window_n"], 1)
        total_loss, total_correct, _ = window()
        shift = conv_mean_shift(model, probe) if probe is not None else {}
        if t.signal_prop and step % steps_per_epoch == 0:
            record_signal_prop(model, signal_prop_path, step // steps_per_epoch, writer, input_shape, device)
        window_loss.zero_()
        window_correct.zero_()
        loop["window_n"] = 0
        if log is None:
            return
        log.log({
            "step": step, "epoch": step / steps_per_epoch, "examples_seen": step * cfg.batch_size,
            "train_loss": total_loss / n, "train_acc": total_correct / n,
            **metrics, "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": step * cfg.batch_size / max(loop["train_time"], 1e-9),
            "wall_time_s": wall_time(),
        })
        if shift:
            log.scalars({f"mean_shift/{name}": v for name, v in shift.items()}, step * cfg.batch_size)

    model.train()
    with StopSignal() as stop:
        while step < total_steps and status == "completed":
            epoch, first_batch = divmod(step, steps_per_epoch)
            train_batches.set_epoch(epoch, first_batch)
            bar = tqdm(total=min(steps_per_epoch, total_steps - epoch * steps_per_epoch), initial=first_batch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (t.progress_bar and ctx.is_main),
                       dynamic_ncols=True, leave=False)
            tick = time.perf_counter()
            for x, y in train_batches:
                loss_sum, correct = train_step(net, method, optimizer, x.contiguous(memory_format=memory_format),
                                               y, accumulate, precision)
                window_loss += loss_sum
                window_correct += correct
                loop["window_n"] += len(y) * ctx.world_size
                scheduler.step()
                step += 1
                bar.update()

                evaluate_now = step % steps_per_epoch == 0 or step == total_steps or bool(
                    t.eval_every and step % t.eval_every == 0)
                # A single process answers a stop signal at once; a group at the next
                # log point, where its ranks agree on it.
                stopping = bool(stop.received) and not ctx.parallel
                if step % t.log_every == 0 or evaluate_now or stopping:
                    # Reading the loss syncs with the device: done every log_every steps only,
                    # and always before a checkpoint, so diverged weights are never saved.
                    total_loss, total_correct, stopping = window()
                    running = total_loss / loop["window_n"]
                    loop["train_time"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    bar.set_postfix(loss=f"{running:.3f}", acc=f"{total_correct / loop['window_n']:.3f}",
                                    img_s=f"{step * cfg.batch_size / loop['train_time']:.0f}")
                    if not math.isfinite(running):
                        status = "diverged"
                        if ctx.is_main:
                            note(f"Training diverged at step {step}: the loss is {running}. "
                                 "Lower optimizer.lr or add warmup (scheduler.warmup_epochs).")
                        break
                if evaluate_now:
                    evaluate_and_log()
                if evaluate_now or stopping:
                    checkpoint()
                    tick = time.perf_counter()
                if stopping:
                    status = "interrupted"
                    if ctx.is_main:
                        note(f"{stop.received or 'a stop signal'}: stopped at step {step} with a checkpoint; "
                             "re-run the same command to continue.")
                    break
                if step >= total_steps:
                    break
            bar.close()

    record = log.records[-1] if log is not None and log.records else {}
    selected = select_and_test(model, best, data, loop, step, record, ctx, precision) \
        if status == "completed" else {}
    if log is not None and "test_acc" in selected:
        log.scalars({"test/selected_acc": selected["test_acc"]}, step * cfg.batch_size)
    summary = {
        "status": status, "model": cfg.model.name, "method": cfg.method.name, "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.name, "scheduler": cfg.scheduler.name, "batch_size": cfg.batch_size,
        "lr": cfg.optimizer.lr, "epochs": cfg.epochs, "seed": cfg.seed, "step": step,
        "examples_seen": step * cfg.batch_size, "final_train_loss": record.get("train_loss"),
        "final_val_acc": record.get("val_acc"), "best_val_acc": loop["best_val_acc"],
        "best_val_step": loop["best_val_step"],
        "best_val_epoch": None if loop["best_val_step"] is None else loop["best_val_step"] / steps_per_epoch,
        "selection": "best validation accuracy" if data.val is not None else "final model (no validation split)",
        **{f"selected_{k}": v for k, v in selected.items()},
        **{f"final_{k}": record.get(k) for k in ("test_acc", "test_loss", "test_top5") if k in record},
        "total_time_s": wall_time(), "train_time_s": loop["train_time"],
        "img_per_s": step * cfg.batch_size / max(loop["train_time"], 1e-9),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": peak_memory_mb(device), "device": str(device), "processes": ctx.world_size,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if log is not None:
        log.close(summary)
    return summary
