"""The training loop: build everything from the config, train, evaluate, log, checkpoint.

Read it top to bottom; the method hooks (see methods.base) are the only places where
training methods differ.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .checks import check_batchnorm_trainable, check_writable, select_device, validate_config
from .data import build_data
from .methods import build_method
from .models import build_model
from .optim import build_optimizer, build_scheduler
from .run_log import RunLog


@torch.no_grad()
def evaluate(model, batches, num_classes: int) -> dict:
    model.eval()
    loss = correct = correct5 = n = 0
    for x, y in batches:
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        if num_classes > 10:
            correct5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum()
        n += len(y)
    model.train()
    out = {"test_loss": float(loss) / n, "test_acc": float(correct) / n}
    if num_classes > 10:
        out["test_top5"] = float(correct5) / n
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg, out_dir: Path) -> dict:
    """Train one run into ``out_dir``; returns the summary that is also written there."""
    out_dir = Path(out_dir)
    validate_config(cfg)
    check_writable(out_dir)
    device = select_device(cfg.trainer)
    t = cfg.trainer
    if device.type == "cpu" and t.cpu_threads:
        # Small batches run fastest on one thread, and parallel jobs must not oversubscribe cores.
        torch.set_num_threads(t.cpu_threads)
    torch.manual_seed(cfg.seed)
    accumulate = t.accumulate
    method = build_method(cfg.method)
    info, train_batches, test_batches = build_data(
        cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=t.eval_batch_size, seed=cfg.seed, device=device)
    model = build_model(cfg.model.name, method, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, small_input=cfg.model.get("small_input", "auto")).to(device)
    check_batchnorm_trainable(model, cfg.batch_size // accumulate,
                              (info.in_channels, info.image_size, info.image_size))
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), cfg.batch_size)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    n_params = sum(p.numel() for p in model.parameters())
    log = RunLog(out_dir, cfg, tensorboard=t.tensorboard)

    step, status, best_acc, record = 0, "completed", 0.0, {}
    start = time.perf_counter()
    train_time = 0.0  # seconds spent in training steps, excluding evaluation
    window = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device), "n": 0}

    def evaluate_and_log(epoch: float) -> None:
        nonlocal best_acc, record
        metrics = evaluate(model, test_batches, info.num_classes)
        best_acc = max(best_acc, metrics["test_acc"])
        n = max(window["n"], 1)
        record = {
            "step": step, "epoch": epoch, "examples_seen": step * cfg.batch_size,
            "train_loss": float(window["loss"]) / n, "train_acc": float(window["correct"]) / n,
            **metrics, "best_test_acc": best_acc, "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": step * cfg.batch_size / max(train_time, 1e-9),
            "wall_time_s": time.perf_counter() - start,
        }
        log.log(record)
        window.update(loss=torch.zeros((), device=device), correct=torch.zeros((), device=device), n=0)

    model.train()
    epoch = 0
    while step < total_steps and status == "completed":
        train_batches.set_epoch(epoch)
        bar = tqdm(total=min(steps_per_epoch, total_steps - step), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not t.progress_bar, dynamic_ncols=True, leave=False)
        tick = time.perf_counter()
        for x, y in train_batches:
            # One optimizer step over `accumulate` equal micro-batches. With BatchNorm each
            # micro-batch is normalised with its own statistics.
            for xm, ym in zip(x.chunk(accumulate), y.chunk(accumulate)):
                logits = model(xm)
                loss = F.cross_entropy(logits, ym)
                reg = method.regularization(model)
                ((loss if reg is None else loss + reg) / accumulate).backward()
                window["loss"] += loss.detach() * len(ym)
                window["correct"] += (logits.argmax(1) == ym).sum()
            window["n"] += len(y)
            method.before_step(model, optimizer)
            optimizer.step()
            method.after_step(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update()
            if step % t.log_every == 0 or step == total_steps:
                # Reading the loss syncs with the device: done every log_every steps only.
                running = float(window["loss"]) / window["n"]
                train_time += time.perf_counter() - tick
                tick = time.perf_counter()
                bar.set_postfix(loss=f"{running:.3f}", acc=f"{float(window['correct']) / window['n']:.3f}",
                                img_s=f"{step * cfg.batch_size / train_time:.0f}")
                if not math.isfinite(running):
                    status = "diverged"
                    tqdm.write(f"Training diverged at step {step}: the loss is {running}. "
                               "Lower optimizer.lr or add warmup (scheduler.warmup_epochs).")
                    break
            if t.eval_every and step % t.eval_every == 0 and step % steps_per_epoch:
                train_time += time.perf_counter() - tick
                evaluate_and_log(epoch + (step % steps_per_epoch) / steps_per_epoch)
                tick = time.perf_counter()
            if step >= total_steps:
                break
        train_time += time.perf_counter() - tick
        bar.close()
        epoch += 1
        if status != "completed":
            break
        evaluate_and_log(step / steps_per_epoch)
        if t.checkpoint:
            save_checkpoint(out_dir / "checkpoints" / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                "config": OmegaConf.to_container(cfg, resolve=True),
            })

    summary = {
        "status": status, "model": cfg.model.name, "method": cfg.method.name, "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.name, "scheduler": cfg.scheduler.name, "batch_size": cfg.batch_size,
        "lr": cfg.optimizer.lr, "epochs": cfg.epochs, "seed": cfg.seed, "step": step,
        "examples_seen": step * cfg.batch_size, "final_test_acc": record.get("test_acc"),
        "best_test_acc": best_acc if record else None, "final_train_loss": record.get("train_loss"),
        "total_time_s": time.perf_counter() - start, "train_time_s": train_time,
        "img_per_s": step * cfg.batch_size / max(train_time, 1e-9), "params": n_params,
        "peak_memory_mb": peak_memory_mb(device), "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    log.close(summary)
    return summary
