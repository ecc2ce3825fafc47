#!/usr/bin/env python
"""Which parameters move in the first steps of a run: every conv's relative weight change
||W_t - W_0|| / ||W_0|| and its filter scales exp(theta) (mean and max over channels, for
MSR), the classifier's change, and the product of the convs' mean scales (what a plain
stack multiplies its signal by), beside the loss and the logits' RMS on a fixed batch, every ``--every``
steps until ``--steps`` or a non-finite loss. Built and trained as msr-train builds and
trains (its config, data, optimizer, schedule and step), one thread.

    python scripts/param_trace.py model=vgg11 method=msr_paper optimizer.lr=0.2 --out docs/img/depth/trace_vgg11_msr_paper.md

The overrides are msr-train's, on top of ``experiment=fashion_mnist_converged epochs=3``
(the depth protocol). The table is markdown; the numbers go to the .json beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from msr_train.data import build_data
from msr_train.methods import build_method
from msr_train.methods.msr import MSRConv2d
from msr_train.models import build_model
from msr_train.optim import build_optimizer, build_scheduler
from msr_train.train import train_step

PROTOCOL = ("experiment=fashion_mnist_converged", "epochs=3")


def build(overrides: list[str]):
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        cfg = compose("config", [*PROTOCOL, *overrides])
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=1000, seed=cfg.seed,
                      device=torch.device("cpu"))
    method = build_method(cfg.method, cfg.batch_size)
    info = data.info
    model = build_model(cfg.model.name, method, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, small_input=cfg.model.get("small_input", "auto"))
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), cfg.batch_size)
    steps_per_epoch = len(data.train)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=steps_per_epoch,
                                total_steps=steps_per_epoch * cfg.epochs)
    return cfg, data, method, model.train(), optimizer, scheduler


def convs_and_head(model) -> tuple[list[tuple[str, torch.nn.Module]], torch.nn.Linear]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return convs, head


@torch.no_grad()
def snapshot(step: int, model, probe: torch.Tensor, convs, head, start: dict) -> dict:
    """The weights as they are before step ``step``, and the logits they give a fixed batch
    in eval mode (no noise drawn: the run's random stream is left as training uses it)."""
    model.eval()
    row = {"step": step, "logits_rms": float(model(probe).pow(2).mean().sqrt())}
    model.train()
    log_product = 0.0
    for i, (name, conv) in enumerate(convs):
        row[f"conv{i}_dw"] = float((conv.weight - start[name]).norm() / start[name].norm())
        if isinstance(conv, MSRConv2d):
            scale = conv.log_scale.exp()
            row[f"conv{i}_scale_mean"], row[f"conv{i}_scale_max"] = float(scale.mean()), float(scale.max())
            log_product += math.log(float(scale.mean()))
    row["head_dw"] = float((head.weight - start["head"]).norm() / start["head"].norm())
    row["scale_product"] = math.exp(log_product) if any(isinstance(c, MSRConv2d) for _, c in convs) else None
    return row


def trace(overrides: list[str], steps: int, every: int) -> tuple[list[dict], list[str]]:
    """Rows every ``every`` steps (and the last, non-finite one): the weights before the
    step and the training loss of that step."""
    cfg, data, method, model, optimizer, scheduler = build(overrides)
    convs, head = convs_and_head(model)
    start = {name: conv.weight.detach().clone() for name, conv in convs} | {"head": head.weight.detach().clone()}
    rows, step, probe = [], 0, None
    while step < steps:
        for x, y in data.train:
            probe = x[:256] if probe is None else probe
            row = snapshot(step, model, probe, convs, head, start) if step % every == 0 else None
            loss_sum, _ = train_step(model, method, optimizer, x, y, label_smoothing=cfg.trainer.label_smoothing)
            scheduler.step()
            loss = float(loss_sum) / len(y)
            if row is not None or not math.isfinite(loss):
                rows.append((row or snapshot(step, model, probe, convs, head, start)) | {"loss": loss})
                print(json.dumps({k: rows[-1][k] for k in ("step", "loss", "logits_rms", "scale_product")}), flush=True)
            step += 1
            if step >= steps or not math.isfinite(loss):
                return rows, [n for n, _ in convs]
    return rows, [n for n, _ in convs]


def markdown(rows: list[dict], names: list[str], overrides: list[str]) -> str:
    cols = [("step", "step"), ("loss", "loss"), ("logits_rms", "logits RMS"), ("scale_product", "prod. mean scale"),
            ("head_dw", "head dW")]
    cols += [(f"conv{i}_dw", f"conv {i} dW") for i in range(len(names))]
    cols += [(f"conv{i}_scale_max", f"conv {i} max scale") for i in range(len(names)) if f"conv{i}_scale_max" in rows[0]]
    lines = [f"First steps of `{' '.join((*PROTOCOL, *overrides))}` (scripts/param_trace.py). loss: the step's "
             "training loss; logits RMS: a fixed batch of 256 training images in eval mode; dW: "
             "||W_t - W_0|| / ||W_0||; scales: exp(theta); all before the step (a non-finite step: after it).", "",
             "| " + " | ".join(title for _, title in cols) + " |", "|---" * len(cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(k) is None else f"{row[k]:.4g}" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="msr-train overrides, e.g. model=vgg11 method=msr_paper")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="the markdown table; the rows go to its .json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, names = trace(args.overrides, args.steps, args.every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, names, args.overrides))
    args.out.with_suffix(".json").write_text(json.dumps({"overrides": args.overrides, "convs": names, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
