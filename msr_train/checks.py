"""Up-front validation: every problem is reported, with its fix, before any work starts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import ListConfig
from torch import nn

from .errors import ConfigError
from .optim import LR_SCALINGS
from .precision import PRECISIONS


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(cfg) -> None:
    _require(_is_int(cfg.batch_size) and cfg.batch_size >= 1,
             f"batch_size={cfg.batch_size!r} must be an integer >= 1, e.g. batch_size=128")
    _require(_is_int(cfg.epochs) and cfg.epochs >= 1,
             f"epochs={cfg.epochs!r} must be an integer >= 1 (use trainer.max_steps to stop earlier)")
    _require(_is_int(cfg.seed) and 0 <= cfg.seed < 2**31, f"seed={cfg.seed!r} must be an integer in [0, 2^31)")
    t = cfg.trainer
    _require(t.accelerator in ("auto", "cpu", "cuda"),
             f"trainer.accelerator={t.accelerator!r} must be one of auto, cpu, cuda")
    _require(t.resume in ("auto", "never"), f"trainer.resume={t.resume!r} must be one of auto, never")
    _require(_is_int(t.accumulate) and t.accumulate >= 1,
             f"trainer.accumulate={t.accumulate!r} must be an integer >= 1")
    _require(cfg.batch_size % t.accumulate == 0,
             f"batch_size={cfg.batch_size} is not divisible by trainer.accumulate={t.accumulate}: "
             "each step splits the batch into that many equal micro-batches")
    for key in ("max_steps", "eval_every"):
        v = t[key]
        _require(v is None or (_is_int(v) and v >= 1), f"trainer.{key}={v!r} must be null or an integer >= 1")
    _require(_is_int(t.eval_batch_size) and t.eval_batch_size >= 1,
             f"trainer.eval_batch_size={t.eval_batch_size!r} must be an integer >= 1")
    _require(t.cpu_threads is None or (_is_int(t.cpu_threads) and 1 <= t.cpu_threads <= os.cpu_count()),
             f"trainer.cpu_threads={t.cpu_threads!r} must be null (PyTorch's default) or an integer from 1 to "
             f"{os.cpu_count()} (this machine's cores)")
    _require(str(t.precision) in PRECISIONS,
             f"trainer.precision={t.precision!r} must be one of {', '.join(PRECISIONS)}")
    for key in ("channels_last", "compile", "test_every_eval", "checkpoint", "tensorboard", "progress_bar",
                "signal_prop"):
        _require(isinstance(t[key], bool), f"trainer.{key}={t[key]!r} must be true or false")
    _require(_is_int(t.log_every) and t.log_every >= 1, f"trainer.log_every={t.log_every!r} must be an integer >= 1")
    o = cfg.optimizer
    _require(is_number(o.lr) and o.lr > 0, f"optimizer.lr={o.lr!r} must be a positive number, e.g. optimizer.lr=0.1")
    _require(is_number(o.weight_decay) and o.weight_decay >= 0,
             f"optimizer.weight_decay={o.weight_decay!r} must be a number >= 0")
    if "momentum" in o:
        _require(is_number(o.momentum) and 0 <= o.momentum < 1,
                 f"optimizer.momentum={o.momentum!r} must be in [0, 1)")
    _require(o.lr_scaling in LR_SCALINGS,
             f"optimizer.lr_scaling={o.lr_scaling!r} must be one of {', '.join(LR_SCALINGS)}")
    _require(_is_int(o.base_batch_size) and o.base_batch_size >= 1,
             f"optimizer.base_batch_size={o.base_batch_size!r} must be an integer >= 1")
    w = cfg.scheduler.get("warmup_epochs", 0)
    _require(is_number(w) and w >= 0, f"scheduler.warmup_epochs={w!r} must be a number >= 0")
    for key in ("train_size", "test_size"):
        v = cfg.dataset.get(key)
        _require(v is None or (_is_int(v) and v >= 1), f"dataset.{key}={v!r} must be null (all) or an integer >= 1")
    v = cfg.dataset.val_size
    _require(_is_int(v) and v >= 0, f"dataset.val_size={v!r} must be an integer >= 0: the number of training "
             "images held out for validation (0: no validation split)")
    v = cfg.dataset.split_seed
    _require(_is_int(v) and 0 <= v < 2**31, f"dataset.split_seed={v!r} must be an integer in [0, 2^31)")


def select_devices(trainer_cfg, job_num: int | None = None) -> list[torch.device]:
    """The devices this run trains on, one process each, checked against the machine.
    ``devices``: ``auto`` is one device (in a Hydra multirun, GPU ``job_num`` modulo the
    GPU count, so parallel jobs spread over the GPUs), a number N is N devices (N CPU
    processes with accelerator=cpu), a list names GPU ids."""
    acc, devices = trainer_cfg.accelerator, trainer_cfg.devices
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
    _require(devices == "auto" or (_is_int(devices) and devices >= 1) or isinstance(devices, (list, ListConfig)),
             f"trainer.devices={devices!r} must be auto, a number of devices (e.g. 2) or a list of GPU ids (e.g. [0,2])")
    if acc == "cpu":
        _require(not isinstance(devices, (list, ListConfig)),
                 f"trainer.devices={devices} names GPU ids, but the run is on the CPU; give a number of "
                 "CPU processes (trainer.devices=2) or use trainer.accelerator=cuda")
        return [torch.device("cpu")] * (1 if devices == "auto" else devices)
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible here; "
                          "use trainer.accelerator=cpu (or auto)")
    if devices == "auto":
        ids = [0 if job_num is None else job_num % count]
    elif _is_int(devices):
        _require(devices <= count, f"trainer.devices={devices} but this machine has {count} CUDA device(s)")
        ids = list(range(devices))
    else:
        ids = list(devices)
    have = ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
    for i in ids:
        _require(_is_int(i) and 0 <= i < count,
                 f"trainer.devices={ids}: CUDA device {i} does not exist; this machine has {have}")
    _require(len(set(ids)) == len(ids), f"trainer.devices={ids} names a device twice")
    return [torch.device("cuda", i) for i in ids]


def check_parallel(cfg, world_size: int, device: torch.device) -> None:
    """What several processes need: a global batch they can share, SyncBatchNorm on CUDA."""
    share = world_size * cfg.trainer.accumulate
    _require(cfg.batch_size % share == 0,
             f"batch_size={cfg.batch_size} is the global batch; {world_size} processes x trainer.accumulate="
             f"{cfg.trainer.accumulate} micro-batches must divide it: use a batch_size that is a multiple of {share}")
    _require(not (cfg.method.get("sync_bn") and device.type != "cuda"),
             "method.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel); drop it on the CPU")


def check_writable(out_dir: Path, need_mb: int = 10) -> None:
    """The output dir must take files and have room for them, before any work is done."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe.{os.getpid()}"  # one per process: ranks probe at once
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output dir {out_dir} is not writable ({e.strerror}); "
                          "set hydra.run.dir to a writable folder") from None
    stat = os.statvfs(out_dir)
    free_mb = stat.f_bavail * stat.f_frsize / 2**20
    _require(free_mb >= need_mb, f"output dir {out_dir} has {free_mb:.0f} MB free, need at least {need_mb} MB; "
             "free some space or set hydra.run.dir elsewhere")


def check_batchnorm_trainable(model: nn.Module, micro_batch: int, input_shape: tuple) -> None:
    """A BatchNorm layer that sees one value per channel cannot train ("Expected more
    than 1 value per channel"). Find such layers with a dry run and say so now, instead
    of crashing mid-run."""
    if micro_batch > 1:
        return
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.__setitem__(name, inp[0].shape))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not hooks:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    single = [name for name, shape in seen.items() if math.prod(shape[2:]) == 1]
    _require(not single,
             f"BatchNorm cannot train with {micro_batch} example per micro-batch: layer(s) "
             f"{', '.join(single[:3])}{' ...' if len(single) > 3 else ''} see a single value per channel "
             "(1x1 feature maps or logits). Use batch_size/trainer.accumulate >= 2, larger images, or a "
             "normalization-free method such as method=msr.")
