"""What the person watching a run reads: a start banner (where it writes, on what device,
which data, model, method and learning rate) and an end report (how it ended, the test
accuracy, where the results are and the commands to look at them)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checks import compile_mode
from .distributed import Context
from .models.vgg import ARCHITECTURES as PLAIN_STACKS
from .optim import scaled_lr
from .trackers import mlflow_uri, wandb_mode


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def start_banner(cfg, out_dir: Path, device: torch.device, ctx: Context, info, params: int,
                 total_steps: int, steps_per_epoch: int) -> str:
    where = str(device) + (f" x {ctx.world_size} processes" if ctx.parallel else "")
    if device.type == "cpu":
        where += f", {torch.get_num_threads()} thread(s) each" if ctx.parallel else \
            f", {torch.get_num_threads()} thread(s)"
    o, t = cfg.optimizer, cfg.trainer
    planned = cfg.epochs * steps_per_epoch
    steps = f"{cfg.epochs} epochs = {planned:,} steps" + \
        (f", stopped at step {total_steps:,} (trainer.max_steps)" if total_steps < planned else "")
    return "\n".join([
        f"msr-train: run dir {out_dir}",
        f"  device    {where}",
        f"  data      {info.name} from {info.source}: {info.train_size:,} train / {info.val_size:,} validation / "
        f"{info.test_size:,} test images",
        f"  model     {cfg.model.name} ({params:,} parameters), method {cfg.method.name}",
        f"  training  batch {cfg.batch_size}, lr {scaled_lr(o, cfg.batch_size):.4g} ({o.name}; optimizer.lr "
        f"{o.lr:g} at batch {o.base_batch_size}, {o.lr_scaling} scaling), {steps}"
        + (f"; evaluates an EMA of the weights (decay {t.ema_decay:g})" if t.get("ema_decay") else ""),
        f"  step      precision {t.precision}, {t.accumulate} micro-batch(es) per step (trainer.accumulate), "
        f"{'eager' if t.compile is False else 'compiled, mode ' + compile_mode(t.compile)} (trainer.compile)"
        + precision_note(t.precision, device),
        *compile_note(t, cfg.batch_size, device),
        *size_note(cfg.model.name, params, device),
        *plain_stack_note(cfg.method, cfg.model.name),
    ])


#: Micro-batches up to this size are where a compiled step paid on the CPU (docs/benchmarks.md).
SMALL_BATCH = 8


def compile_note(trainer_cfg, batch_size: int, device: torch.device) -> list[str]:
    if device.type != "cpu" or trainer_cfg.compile is not False or batch_size // trainer_cfg.accumulate > SMALL_BATCH:
        return []
    return ["  note      at batches of 1-8 on the CPU a compiled step (trainer.compile=true) trained most "
            "methods 1.1-1.6x faster, after a compile of seconds to a minute (docs/benchmarks.md)"]


#: Parameters above which a network is ImageNet-size (ResNet-50: 23.5 M): on a CPU such a
#: run takes hours per epoch, which the banner says before the first epoch does.
LARGE_MODEL_PARAMS = 20_000_000


def size_note(model: str, params: int, device: torch.device) -> list[str]:
    if device.type != "cpu" or params < LARGE_MODEL_PARAMS:
        return []
    return [f"  note      {model} ({params / 1e6:.0f} M parameters) is slow on a CPU: time a few steps first "
            "(trainer.max_steps=20), or train it on a GPU (trainer.accelerator=cuda)"]


def plain_stack_note(method, model: str) -> list[str]:
    """MSR on a network without skip connections: at its scale init of 0.8 it did not train
    one in the measured runs, and the variance-preserving init only in short probes
    (docs/results.md, "VGG-11 and VGG-16 at the ResNet-20 rate"), so the banner says what
    was measured before the run is spent."""
    if method.name != "msr" or model not in PLAIN_STACKS:
        return []
    where = '(what was run: docs/results.md, "VGG-11 and VGG-16")'
    if method.scale_init == "preserve_variance":
        return [f"  note      msr with method.scale_init=preserve_variance has trained a plain stack like {model} "
                "only in short VGG-11 probes, at low rates with warmup; it diverged at higher rates and without "
                f"warmup {where}"]
    return [f"  note      msr has not trained a plain stack like {model} at the rates measured: in the paper's "
            "settings at its ResNet-20 rate and half of it (3 epochs, 3 seeds) VGG-16 stayed at chance and VGG-11 "
            "diverged on 5 of 6 runs; a variance-preserving scale init (method=msr_vp) trained VGG-11 in short "
            f"probes at lower rates with warmup {where}"]


def precision_note(precision, device: torch.device) -> str:
    # The CPU has no fast float16 kernels: autocast to float16 there is many times slower.
    if device.type == "cpu" and str(precision) == "16-mixed":
        return "; note: float16 on the CPU is many times slower than 32 (use 32 or bf16 there)"
    return ""


def epoch_line(record: dict, epochs: int) -> str:
    """One line per epoch (the progress bar is erased when the epoch ends)."""
    val = f", val acc {100 * record['val_acc']:.2f}% (best {100 * record['best_val_acc']:.2f}%)" \
        if "val_acc" in record else ""
    return (f"epoch {record['epoch']:g}/{epochs}: train loss {record['train_loss']:.4f}, train acc "
            f"{100 * record['train_acc']:.2f}%{val}, {duration(record['wall_time_s'])} since the start")


def end_report(summary: dict, out_dir: Path) -> str:
    speed = f"{summary['img_per_s']:.0f} img/s in training" if summary.get("img_per_s") else \
        "no training step timed in this launch"
    lines = [f"msr-train: {summary['status']} at step {summary['step']:,} after {duration(summary['total_time_s'])} "
             f"({speed})"]
    selected, final = summary.get("selected_test_acc"), summary.get("final_test_acc")
    if summary["status"] == "completed" and summary.get("best_val_acc") is not None:
        lines.append(f"  test acc  {100 * selected:.2f}% (the model selected on validation: best validation "
                     f"accuracy {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_val_epoch']:g}); "
                     f"final model {100 * final:.2f}%")
    elif summary["status"] == "completed":
        lines.append(f"  test acc  {100 * final:.2f}% (the final model; no validation split)")
    elif summary["status"] == "reached_target":
        lines.append(f"  target    validation accuracy {100 * summary['best_val_acc']:.2f}% (trainer.stop_at_val_acc) "
                     f"after {duration(summary['train_time_s'])} of training; not tested")
    looks = look_commands(summary.get("config", {}).get("logger") or {}, out_dir)
    lines += [f"  results   {out_dir}/ (summary.json, metrics.jsonl, checkpoints/)",
              *(f"  {'look' if i == 0 else '':<10}{cmd}" for i, cmd in enumerate(looks))]
    return "\n".join(lines)


def look_commands(loggers: dict, out_dir: Path) -> list[str]:
    """One command per line that shows the run, for each of its loggers."""
    cmds = [f"tensorboard --logdir {out_dir}"] if "tensorboard" in loggers else []
    if "mlflow" in loggers:
        cmds.append(f"mlflow ui --backend-store-uri {mlflow_uri(loggers['mlflow'])}")
    if "wandb" in loggers and wandb_mode(loggers["wandb"]) == "offline":
        cmds.append(f"wandb sync {out_dir}/wandb/offline-run-*   # then W&B's web page")
    return [*cmds, f"msr-compare {out_dir}"]
