"""Up-front validation: every problem is reported, with its fix, before any work starts."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import ListConfig, OmegaConf
from torch import nn

from .data import dataset_rules
from .errors import ConfigError
from .methods import METHODS, build_method
from .methods.base import Method
from .models import MODEL_RULES
from .optim import check_optimizer_links, check_schedule_fits, optimizer_rules, scheduler_rules
from .precision import PRECISIONS
from .rules import (CONFIG_GROUPS, Rule, added_later, check_group, choice, either, flag, integer, is_int, number,
                    optional_key, resumable, text)
from .safe_files import size_text
from .trackers import check_installed


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: The run's own settings; the config groups below it are checked by their own tables.
RUN_RULES = {
    "batch_size": integer(1, note="the global batch of one optimizer step, e.g. batch_size=128"),
    "epochs": integer(1, note="use trainer.max_steps to stop earlier"),
    "seed": integer(0, 2**31 - 1),
}
#: The loggers (conf/logger/, the trackers in msr_train/trackers.py): how a run is
#: watched, so each may change on resume. A selected logger is a key of ``logger``.
LOGGER_RULES = {
    "mlflow.tracking_uri": optional_key(resumable(text(note="null: sqlite:///outputs/mlflow.db", null=True))),
    "mlflow.experiment": optional_key(resumable(text(note="null: the sweep's or the dataset's name", null=True))),
    "wandb.project": optional_key(resumable(text(note="null: the sweep's or the dataset's name", null=True))),
    "wandb.entity": optional_key(resumable(text(note="null: W&B's default", null=True))),
    "wandb.mode": optional_key(resumable(choice("online", "offline", "disabled", None,
                                                note="null: offline unless WANDB_MODE or WANDB_API_KEY is set"))),
}
#: Settings that no longer exist, resumable in their time: a checkpoint that has them
#: resumes (the replacement says what took over).
RETIRED_SETTINGS = {"trainer.tensorboard": "logger=tensorboard (or logger=none)"}

#: torch.compile's modes (trainer.compile=true is "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_mode(value) -> str | None:
    """torch.compile's mode for ``trainer.compile`` (None: eager); true and default are one
    setting, also on resume."""
    return None if value is False else "default" if value is True else value


TRAINER_RULES = {
    "accelerator": choice("auto", "cpu", "cuda"),
    "devices": either(choice("auto"), integer(1, note="processes"), Rule(
        lambda v: isinstance(v, list) and len(v) > 0 and all(is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v),
        "a list of distinct GPU ids, e.g. [0,2]")),
    "max_steps": integer(1, null=True, note="a cap on optimizer steps; the schedule ends there"),
    "eval_every": integer(1, null=True),
    "test_every_eval": flag(),
    "accumulate": integer(1),
    "eval_batch_size": resumable(integer(1)),
    "log_every": resumable(integer(1)),
    "progress_bar": resumable(flag()),
    "mean_shift": resumable(flag(note="one TensorBoard chart per conv at every evaluation")),
    "signal_prop": flag(),
    "cpu_threads": resumable(integer(1, os.cpu_count(), null=True,
                                     note="null: PyTorch's default; this machine's cores at most")),
    "flush_denormal": resumable(flag(note="on the CPU: values below 1.2e-38 are zero (denormal arithmetic is slow)")),
    "checkpoint": flag(),
    "grad_clip_norm": added_later(number(0, 1e6, lo_open=True, null=True, note="null: off"), None),
    "agc_clip": added_later(number(0, 1e3, lo_open=True, null=True, note="lambda; null: off"), None),
    "log_norms": resumable(flag(note="per-parameter gradient and weight norms at every evaluation")),
    "label_smoothing": added_later(number(0, 1, hi_open=True,
                                          note="of the training loss (evaluation losses are plain); 0: off"), 0.0),
    "ema_decay": added_later(number(0, 1, lo_open=True, hi_open=True, null=True,
                                    note="e.g. 0.999: evaluate an average of the weights; null: off"), None),
    # When the run ends, not its trajectory: a higher target continues it.
    "stop_at_val_acc": resumable(number(0, 1, lo_open=True, null=True,
                                        note="a fraction, e.g. 0.9: stop once validation accuracy reaches it; null: off")),
    "divergence_factor": number(0, lo_open=True, null=True, note="x ln(num_classes); null: NaN/inf only"),
    "resume": resumable(choice("auto", "never")),
    # 32 and '32' are one setting: a resume compares them as text.
    "precision": Rule(lambda v: not isinstance(v, bool) and str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS),
                      canonical=str),
    "channels_last": flag(),
    "compile": replace(either(flag(), choice(*COMPILE_MODES, note="true: default; reduce-overhead uses CUDA graphs on "
                                                               "a GPU")), canonical=compile_mode),
}



@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What validate_config worked out for a run, once, for the rest of it to use: the
    method (built and checked for this run's micro-batch), the devices (one process each)
    and the process group torchrun or SLURM started, if any."""

    method: Method
    devices: list[torch.device]
    #: (rank, world size, local rank) of a launched group (distributed.launched_group).
    group: tuple[int, int, int] | None = None

    @property
    def world_size(self) -> int:
        return processes(self.devices, self.group)

    @property
    def device(self) -> torch.device:
        """This process's device (in a launched group on GPUs, the one of its local rank)."""
        device = self.devices[0]
        return torch.device("cuda", self.group[2]) if self.group is not None and device.type == "cuda" else device

    @property
    def is_writer(self) -> bool:
        """This process writes the run's files (alone, or rank 0 of its group)."""
        return self.group is None or self.group[0] == 0


def processes(devices: list[torch.device], group: tuple[int, int, int] | None) -> int:
    """The run's process count: one per device, or the launched group's world size."""
    return len(devices) if group is None else group[1]


def validate_config(cfg, job_num: int | None = None, group: tuple[int, int, int] | None = None) -> RunPlan:
    """Every setting of the run, the trainer, the model, the optimizer, the scheduler and
    the dataset against its group's table, then the rules that tie settings together,
    and the devices (``job_num``: the Hydra multirun job, ``group``: a launched process
    group). The method's table is its class's; it comes before the optimizer's, whose lr
    is the method's by default. Returns the run's plan, with the method built once."""
    check_group("", cfg, RUN_RULES, skip=CONFIG_GROUPS)
    check_group("trainer", cfg.trainer, TRAINER_RULES)
    check_group("model", cfg.model, MODEL_RULES)
    check_group("logger", cfg.get("logger") or OmegaConf.create({}), LOGGER_RULES)
    check_installed(cfg.get("logger") or {})
    devices = select_devices(cfg.trainer, job_num)
    world_size = processes(devices, group)
    check_batch_shares(cfg, world_size)
    method = build_method(cfg.method, cfg.batch_size, micro_batch=cfg.batch_size // (world_size * cfg.trainer.accumulate))
    check_clipping_once(cfg, method)
    check_group("optimizer", cfg.optimizer, optimizer_rules(cfg.optimizer.name))
    check_group("scheduler", cfg.scheduler, scheduler_rules(cfg.scheduler.name))
    check_group("dataset", cfg.dataset, dataset_rules(cfg.dataset))
    check_optimizer_links(cfg.optimizer)
    check_schedule_fits(cfg.scheduler, cfg.epochs)
    plan = RunPlan(method, devices, group)
    method.check_processes(plan.world_size, plan.device)
    return plan


def check_batch_shares(cfg, world_size: int) -> None:
    """The global batch splits into equal micro-batches: ``trainer.accumulate`` per step
    in each of ``world_size`` processes."""
    share = world_size * cfg.trainer.accumulate
    if cfg.batch_size % share == 0:
        return
    if world_size == 1:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by trainer.accumulate="
                          f"{cfg.trainer.accumulate}: each step splits the batch into that many equal micro-batches")
    raise ConfigError(f"batch_size={cfg.batch_size} is the global batch; {world_size} processes (trainer.devices) x "
                      f"trainer.accumulate={cfg.trainer.accumulate} micro-batches must divide it: use a batch_size "
                      f"that is a multiple of {share}")


def check_clipping_once(cfg, method: Method) -> None:
    """The trainer's clipping and the method's default (Method.clipping()) are one
    clipper: the same kind in both would clip every gradient twice."""
    clipping = method.clipping()
    _require(not (cfg.trainer.agc_clip and clipping.agc),
             f"trainer.agc_clip={cfg.trainer.agc_clip} and method.agc_clip={cfg.method.get('agc_clip')} (on at "
             f"batch_size={cfg.batch_size}) would clip every gradient twice; set method.agc_clip=0 to use the "
             "trainer's, or drop trainer.agc_clip")
    _require(not (cfg.trainer.grad_clip_norm and clipping.max_norm),
             f"trainer.grad_clip_norm={cfg.trainer.grad_clip_norm} and method.grad_clip_norm="
             f"{cfg.method.get('grad_clip_norm')} would clip every gradient twice; set one of them to null")


def setting_rules(cfg) -> dict[str, Rule]:
    """Every setting of the run's config as a flat key (``trainer.cpu_threads``,
    ``method.lr_mult.conv``) -> its rule, from the tables validate_config checks; the
    resume check reads each rule's resume policy (msr_train.rules)."""
    tables = {"": RUN_RULES, "trainer": TRAINER_RULES, "model": MODEL_RULES, "method": METHODS[cfg.method.name].rules,
              "optimizer": optimizer_rules(cfg.optimizer.name), "scheduler": scheduler_rules(cfg.scheduler.name),
              "dataset": dataset_rules(cfg.dataset), "logger": LOGGER_RULES}
    return {f"{group}.{key}" if group else key: rule for group, table in tables.items() for key, rule in table.items()}


def select_devices(trainer_cfg, job_num: int | None = None) -> list[torch.device]:
    """The devices this run trains on, one process each, checked against the machine.
    ``devices``: ``auto`` is one device (in a Hydra multirun, GPU ``job_num`` modulo the
    GPU count, so parallel jobs spread over the GPUs), a number N is N devices (N CPU
    processes with accelerator=cpu), a list names GPU ids."""
    acc, devices = trainer_cfg.accelerator, trainer_cfg.devices
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
    _require(devices == "auto" or (is_int(devices) and devices >= 1) or isinstance(devices, (list, ListConfig)),
             f"trainer.devices={devices!r} must be auto, a number of devices (e.g. 2) or a list of GPU ids (e.g. [0,2])")
    if acc == "cpu":
        _require(not isinstance(devices, (list, ListConfig)),
                 f"trainer.devices={list(devices) if isinstance(devices, ListConfig) else devices} names GPU ids, "
                 "but the run is on the CPU (no CUDA device here, or trainer.accelerator=cpu); give a number of "
                 "CPU processes (trainer.devices=2) or use trainer.accelerator=cuda on a machine with GPUs")
        _require(trainer_cfg.accelerator == "cpu" or devices == "auto" or devices == 1,
                 f"trainer.devices={devices} on a machine without CUDA would start {devices} CPU processes "
                 "(data-parallel on the CPU); set trainer.accelerator=cpu to do that on purpose")
        return [torch.device("cpu")] * (1 if devices == "auto" else devices)
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible here; "
                          "use trainer.accelerator=cpu (or auto)")
    if devices == "auto":
        ids = [0 if job_num is None else job_num % count]
    elif is_int(devices):
        _require(devices <= count, f"trainer.devices={devices} but this machine has {count} CUDA device(s)")
        ids = list(range(devices))
    else:
        ids = list(devices)
    have = ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
    for i in ids:
        _require(is_int(i) and 0 <= i < count,
                 f"trainer.devices={ids}: CUDA device {i} does not exist; this machine has {have}")
    _require(len(set(ids)) == len(ids), f"trainer.devices={ids} names a device twice")
    return [torch.device("cuda", i) for i in ids]


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
    free = stat.f_bavail * stat.f_frsize
    _require(free >= need_mb * 2**20, f"output dir {out_dir} has {size_text(free)} free, need at least {need_mb} MB; "
             "free some space or set hydra.run.dir elsewhere")


def check_batchnorm_trainable(model: nn.Module, micro_batch: int, input_shape: tuple) -> None:
    """A BatchNorm layer that sees one value per channel cannot train ("Expected more
    than 1 value per channel"). Find such layers with a dry run and say so now, instead
    of crashing mid-run. A ghost BN layer's statistics come from ``ghost_size`` examples."""
    groups = {name: min(micro_batch, getattr(m, "ghost_size", micro_batch)) for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if all(size > 1 for size in groups.values()):
        return
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.__setitem__(name, inp[0].shape))
             for name, m in model.named_modules() if groups.get(name) == 1]
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
             f"BatchNorm cannot train with 1 example per {'micro-batch' if micro_batch == 1 else 'virtual batch'}: "
             f"layer(s) {', '.join(single[:3])}{' ...' if len(single) > 3 else ''} see a single value per channel "
             "(1x1 feature maps or logits). Use batch_size/trainer.accumulate >= 2"
             f"{'' if micro_batch == 1 else ' and method.ghost_batch_size >= 2'}, larger images, or a "
             "normalization-free method such as method=msr.")
