#!/usr/bin/env python
"""Methods x batch sizes on Fashion-MNIST, same budget for every run; writes a Markdown table.

Each cell is one `msr-train experiment=fashion_mnist_comparison method=M batch_size=B`
run (the exact commands are listed under the table). The table replaces the block
between `<!-- comparison:start -->` and `<!-- comparison:end -->` in --out. Runs already completed in
--runs-dir are reused, so an interrupted comparison picks up where it stopped.

    python scripts/fashion_mnist_comparison.py --methods bn,msr,none --batch-sizes 1,2,8,128,1024 \
        --jobs 2 --out docs/results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def run_command(method: str, batch_size: int, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return ["msr-train", "experiment=fashion_mnist_comparison", f"method={method}", f"batch_size={batch_size}",
            f"seed={seed}", *extra, f"hydra.run.dir={run_dir}", "trainer.progress_bar=false"]


def run(cmd: list[str], run_dir: Path) -> dict:
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["status"] == "completed":
        return json.loads(summary.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as log:
        # The `msr-train` console script of this interpreter's environment.
        res = subprocess.run([sys.executable, "-m", "msr_train.cli", *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
    if summary.exists():
        return json.loads(summary.read_text())
    return {"status": f"failed (exit {res.returncode}, see {run_dir / 'stdout.log'})"}


def cell(summaries: list[dict]) -> str:
    accs = [s["final_test_acc"] * 100 for s in summaries if s["status"] == "completed"]
    if len(accs) < len(summaries):
        return " / ".join(sorted({s["status"].split(" (")[0] for s in summaries}))
    mean = sum(accs) / len(accs)
    if len(accs) == 1:
        return f"{mean:.2f}"
    std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="bn,msr,none")
    p.add_argument("--batch-sizes", default="1,2,8,128,1024")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each on one CPU thread)")
    p.add_argument("--runs-dir", type=Path, default=Path("outputs/comparison"))
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    p.add_argument("extra", nargs="*", help="more overrides for every run, e.g. model=resnet20")
    args = p.parse_args()
    methods = args.methods.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    # Longest runs (small batches) first, so the pool ends with the short ones.
    grid = sorted(((m, b, s) for m in methods for b in batch_sizes for s in seeds), key=lambda k: k[1])
    commands = {k: run_command(*k, args.runs_dir / f"{k[0]}-bs{k[1]}-seed{k[2]}", args.extra) for k in grid}
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {k: pool.submit(run, commands[k], args.runs_dir / f"{k[0]}-bs{k[1]}-seed{k[2]}") for k in grid}
        results = {}
        for k, f in futures.items():
            results[k] = f.result()
            print(f"{k[0]:>10} bs={k[1]:<5} seed={k[2]}: {results[k].get('final_test_acc')} "
                  f"({results[k]['status']})", flush=True)

    lines = [
        "| method | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
        "|---|" + "---|" * len(batch_sizes),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell([results[(m, b, s)] for s in seeds]) for b in batch_sizes) + " |")
    times = ["| method | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |", "|---|" + "---|" * len(batch_sizes)]
    for m in methods:
        times.append(f"| {m} | " + " | ".join(
            f"{sum(results[(m, b, s)].get('train_time_s', 0) for s in seeds) / len(seeds):.0f}" for b in batch_sizes) + " |")
    report = "\n".join([
        "Final test accuracy (%) on the 10,000 Fashion-MNIST test images"
        + (f", mean ± std over seeds {args.seeds}" if len(seeds) > 1 else f", seed {args.seeds}") + ":",
        "", *lines, "",
        "Training time (s, one CPU thread per run):", "", *times, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{args.jobs} runs in parallel, torch {torch.__version__}; {time.time() - start:.0f} s wall in all.",
        "", "Commands:", "", "```",
        *(shlex.join(commands[k]) for k in grid), "```", "",
    ])
    write_report(args.out, report)
    print(report)


def write_report(path: Path, report: str) -> None:
    """Replace the generated block between the markers, keeping the prose around it."""
    start, end = "<!-- comparison:start -->", "<!-- comparison:end -->"
    text = path.read_text() if path.exists() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to fill; add one or choose another --out")
    head, rest = text.split(start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{start}\n{report}{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    sys.exit(main())
