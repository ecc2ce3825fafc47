#!/usr/bin/env python
"""Time to accuracy: how long each method trains before its validation accuracy reaches a target.

Every method trains the same model on the same data with its own defaults (its learning
rate included) and ``trainer.stop_at_val_acc=TARGET``: the run stops at the first
evaluation (every ``--eval-every`` steps and at each epoch's end) whose validation
accuracy reaches the target. The time is the run's own training time (``train_time_s``:
the loop from the first batch to the last step, evaluations and checkpoints excluded, so
that how often we look does not change the answer); the evaluation overhead is reported
beside it. Runs are interleaved: round r trains every method once with ``seed=r``, the
order rotated every round, so drifts of the machine hit every method alike; each ratio to
the reference method (``--reference``, default bn) is taken within a round, then the
median over rounds is reported. A run that ends its schedule (``--epochs``) without
reaching the target is reported as such, with the best validation accuracy it reached.

    python scripts/time_to_accuracy.py --out docs/time_to_accuracy.md.table
    python scripts/time_to_accuracy.py --methods bn,msr --target 0.85 --rounds 1 dataset.train_size=10000

Extra arguments are config overrides for every run (Hydra syntax, as on msr-train's
command line). Nothing is asserted: the script only reports.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu_model, log, make_cfg, table

from msr_train.train import train


def run_to_target(args, method: str, seed: int) -> dict:
    """One run of ``method`` until its validation accuracy reaches ``args.target``."""
    cfg = make_cfg(f"model={args.model}", f"method={method}", f"batch_size={args.batch_size}",
                   f"epochs={args.epochs}", f"seed={seed}", f"trainer.stop_at_val_acc={args.target}",
                   f"trainer.eval_every={args.eval_every}", f"trainer.cpu_threads={args.threads}",
                   "trainer.accelerator=cpu", "logger=none", "trainer.checkpoint=false",
                   "trainer.progress_bar=false", "trainer.resume=never", *args.overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        s = train(cfg, Path(out_dir))
    reached = s["status"] == "reached_target"
    log(f"{method} seed {seed}: {s['status']} at step {s['step']}, {s['train_time_s']:.0f} s of training, "
        f"best val {100 * (s['best_val_acc'] or 0):.2f}%")
    return {"reached": reached, "step": s["step"], "train_s": s["train_time_s"], "total_s": s["total_time_s"],
            "best_val": s["best_val_acc"]}


def summarise(args, rounds: list[dict]) -> list[dict]:
    """Per method: medians over the rounds that reached the target, and the median
    within-round ratio of training time to the reference method's."""
    rows = []
    for method in args.methods:
        runs = [r[method] for r in rounds]
        done = [run for run in runs if run["reached"]]
        row = {"method": method, "reached": len(done), "rounds": len(runs),
               "best_val": max(run["best_val"] or 0 for run in runs)}
        if done:
            row |= {"step": statistics.median(run["step"] for run in done),
                    "train_s": statistics.median(run["train_s"] for run in done),
                    "eval_s": statistics.median(run["total_s"] - run["train_s"] for run in done)}
        ratios = [r[method]["train_s"] / r[args.reference]["train_s"] for r in rounds
                  if r[method]["reached"] and r[args.reference]["reached"]]
        if ratios:
            row["ratio"] = statistics.median(ratios)
        rows.append(row)
    return rows


def markdown(args, rows: list[dict], command: str, elapsed: float) -> str:
    head = [f"Machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} thread(s) per run.",
            f"Command: `{command}` ({elapsed / 60:.1f} min). {args.model}, batch {args.batch_size}, "
            f"{args.epochs}-epoch schedule, target validation accuracy {100 * args.target:g}%, evaluated every "
            f"{args.eval_every} steps; medians over {args.rounds} interleaved round(s) (seed = round).", ""]
    body = [[r["method"], f"{r['reached']}/{r['rounds']}", f"{r['step']:.0f}" if "step" in r else "not reached",
             f"{r['train_s']:.1f}" if "train_s" in r else "", f"{r['eval_s']:.1f}" if "eval_s" in r else "",
             f"{r['ratio']:.2f}" if "ratio" in r else "", f"{100 * r['best_val']:.2f}"] for r in rows]
    return "\n".join(head + [table(["method", "reached", "steps", "training time (s)", "evaluation time (s)",
                                    f"time / {args.reference}", "best val acc (%)"], body)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="bn,msr,nf", help="methods to compare (default %(default)s)")
    p.add_argument("--reference", default="bn", help="the method ratios are taken to (default %(default)s)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10, help="the schedule's length (default %(default)s)")
    p.add_argument("--target", type=float, default=0.9, help="validation accuracy to reach (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, seed = round (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="trainer.cpu_threads of every run (default %(default)s)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. dataset.train_size=10000")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.reference not in args.methods:
        p.error(f"--reference {args.reference} is not one of --methods {','.join(args.methods)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    rounds = []
    for seed in range(args.rounds):
        order = args.methods[seed % len(args.methods):] + args.methods[:seed % len(args.methods)]
        rounds.append({method: run_to_target(args, method, seed) for method in order})
    text = markdown(args, summarise(args, rounds), command, time.perf_counter() - started)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
