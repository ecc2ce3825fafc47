#!/usr/bin/env python
"""The normalization-batch table of docs/results.md, from the evidence
archive that scripts/evidence.py fills: BN at optimizer batch 128 with ghost batches of
1, 2, 8 and 32 (and plain BN, whose normalization batch is the whole 128), each run's
val-selected checkpoint tested three ways (running statistics, as trained; precise BN,
``method.precise_bn_batches=200``; per-example statistics, ``method.eval_statistics=example``),
against MSR in the paper's settings at the same batch and step count.

    python scripts/norm_batch_table.py                   # print the tables
    python scripts/norm_batch_table.py --out compare/norm_batch   # also table.md, stats.md, stats.csv

Which evaluation a run is reported with is chosen per run on *validation* accuracy
(msr-eval's ``eval_best_val_*`` files and the run's own best validation accuracy); the
test set plays no part in the choice. The comparisons (paired by seed, Holm over the
table; msr_train.stats) are each ghost size, so evaluated, against msr_paper, and each
ghost size against plain BN with its running statistics and so evaluated: the first says
whether BN on small normalization batches loses to MSR at the same step count, the others
how much the small batch costs BN itself, as trained and once validation picks the
evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from msr_train import stats

ARCHIVE = Path("docs/evidence/runs")
GHOSTS = (1, 2, 8, 32)
SEEDS = range(5)
#: Evaluation -> the msr-eval overrides of its result files ("" : the run's own summary).
EVALUATIONS = {"running": "", "precise": "method.precise_bn_batches=200", "example": "method.eval_statistics=example"}
PLAIN_BN, MSR = "converged/bn-lr2x", "converged/msr_paper-lr2x"


def accuracy(run: Path, split: str, evaluation: str) -> float | None:
    """The best checkpoint's accuracy in points on ``split`` with ``evaluation``."""
    overrides = EVALUATIONS[evaluation]
    try:
        if not overrides:
            summary = json.loads((run / "summary.json").read_text())
            if summary.get("status") != "completed":
                return None
            return 100 * summary["best_val_acc" if split == "val" else "selected_test_acc"]
        return 100 * json.loads((run / f"eval_best_{split}_{overrides}.json").read_text())[f"{split}_acc"]
    except (OSError, KeyError, ValueError):
        return None


def chosen_on_validation(run: Path) -> float | None:
    """The test accuracy of the evaluation with the best validation accuracy (ties: running)."""
    scores = {e: accuracy(run, "val", e) for e in EVALUATIONS}
    if any(v is None for v in scores.values()):
        return None
    return accuracy(run, "test", max(EVALUATIONS, key=lambda e: scores[e]))


def per_seed(name: str, value) -> dict[int, float]:
    """{seed: value(run)} over the archived runs of ``name`` that have it."""
    found = {s: value(ARCHIVE / f"{name}-seed{s}") for s in SEEDS}
    return {s: v for s, v in found.items() if v is not None}


def cell(values: dict) -> str:
    if not values:
        return "not run yet"
    sd = f" ± {statistics.stdev(values.values()):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values.values()):.2f}{sd} ({len(values)})"


def table() -> tuple[str, dict, dict]:
    """The markdown table; each ghost size's val-chosen and running values by seed."""
    rows = ["| normalization batch | running statistics | precise BN | per-example statistics | chosen on validation |",
            "|---|---|---|---|---|"]
    chosen, running = {}, {}
    for ghost in GHOSTS:
        name = f"norm_batch/bn-ghost{ghost}"
        values = [per_seed(name, lambda r, e=e: accuracy(r, "test", e)) for e in EVALUATIONS]
        chosen[ghost], running[ghost] = per_seed(name, chosen_on_validation), values[0]
        rows.append(f"| bn, ghost {ghost} | " + " | ".join(map(cell, [*values, chosen[ghost]])) + " |")
    rows.append(f"| bn, 128 (plain) | {cell(per_seed(PLAIN_BN, lambda r: accuracy(r, 'test', 'running')))} "
                "| | | |")
    rows.append(f"| msr_paper (no batch statistics) | {cell(per_seed(MSR, lambda r: accuracy(r, 'test', 'running')))} "
                "| | | |")
    return "\n".join(rows), chosen, running


def comparisons(chosen: dict, running: dict) -> tuple[list[stats.Comparison], list[str]]:
    msr = per_seed(MSR, lambda r: accuracy(r, "test", "running"))
    bn = per_seed(PLAIN_BN, lambda r: accuracy(r, "test", "running"))
    out, notes = [], []
    for baseline_name, baseline, test_values, what in (("msr_paper", msr, chosen, "chosen on validation"),
                                                       ("bn (128)", bn, running, "running statistics"),
                                                       ("bn (128)", bn, chosen, "chosen on validation")):
        for ghost, values in test_values.items():
            test_name = f"bn ghost {ghost} ({what})"
            if len(values) < 2 or len(baseline) < 2:
                notes.append(f"not compared yet: {test_name} vs {baseline_name} ({len(values)} runs)")
                continue
            out.append(stats.Comparison("normalization batch", ghost, baseline_name, test_name,
                                        n_baseline=len(baseline), n_test=len(values),
                                        **stats.paired_or_welch(baseline, values)))
    return stats.judge(out, margin=0.5), notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write table.md, stats.md and stats.csv here")
    args = p.parse_args(argv)
    text, chosen, running = table()
    found, notes = comparisons(chosen, running)
    verdicts = stats.markdown(found, x_key=None, margin=0.5, notes=notes, metric="The test accuracy") \
        if found else "\n".join(notes) + "\n"
    print(text, "", verdicts, sep="\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text + "\n")
        (args.out / "stats.md").write_text(verdicts)
        with open(args.out / "stats.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=stats.COLUMNS)
            writer.writeheader()
            writer.writerows(stats.row(c) for c in found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
