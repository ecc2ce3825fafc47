#!/usr/bin/env python
"""Verdicts for a results table whose runs are not at hand: every method against a
baseline in each column of a markdown table of ``mean ± std (n)`` cells (docs/results.md's
grid), by Welch's unpaired t-test from those summary statistics, Holm over the table, and
msr-compare's verdict rule (msr_train/stats.py). With the runs, ``msr-compare PATHS
--baseline bn`` pairs them by seed instead, which is the stronger test.

    python scripts/grid_verdicts.py docs/results.md --baseline bn > /tmp/verdicts.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from scipy import stats as st

from msr_train.stats import Comparison, judge, markdown

CELL = re.compile(r"([\d.]+) ± ([\d.]+) \((\d+)")


def welch(base: tuple, test: tuple) -> dict:
    """Welch's test of test - base from (mean, sd, n) of each side, with its 95% and 90%
    intervals (Welch-Satterthwaite degrees of freedom)."""
    (m1, s1, n1), (m2, s2, n2) = base, test
    v1, v2 = s1 ** 2 / n1, s2 ** 2 / n2
    se, diff = math.sqrt(v1 + v2), m2 - m1
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    p = st.ttest_ind_from_stats(m2, s2, n2, m1, s1, n1, equal_var=False).pvalue
    ci95, ci90 = (st.t.ppf(q, df) * se for q in (0.975, 0.95))
    return dict(kind="Welch", n=n1 + n2, n_baseline=n1, n_test=n2, mean_diff=diff, ci_low=diff - ci95,
                ci_high=diff + ci95, ci90_low=diff - ci90, ci90_high=diff + ci90, p=float(p))


def read_table(text: str, start: str) -> tuple[list[str], dict]:
    """The first markdown table after ``start``: its column titles and {row: [cells]}."""
    after = text.split(start, 1)[1].splitlines()
    first = next(i for i, ln in enumerate(after) if ln.startswith("|"))
    lines = after[first:]
    lines = lines[:next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return head[1:], rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("markdown", type=Path)
    p.add_argument("--start", default="<!-- grid:start -->", help="the marker the table follows")
    p.add_argument("--baseline", default="bn")
    p.add_argument("--margin", type=float, default=0.5)
    args = p.parse_args()
    columns, rows = read_table(args.markdown.read_text(), args.start)
    comparisons = []
    for j, column in enumerate(columns):
        base = CELL.match(rows[args.baseline][j])
        for name, cells in rows.items():
            test = CELL.match(cells[j])
            if name == args.baseline or not (base and test):
                continue
            comparisons.append(Comparison("method", column.split()[-1], args.baseline, name, **welch(
                tuple(float(g) if i < 2 else int(g) for i, g in enumerate(base.groups())),
                tuple(float(g) if i < 2 else int(g) for i, g in enumerate(test.groups())))))
    print(markdown(judge(comparisons, args.margin), x_key=columns[0].rsplit(" ", 1)[0], margin=args.margin,
                   metric="The val-selected test accuracy", notes=[
                       "Welch's test from each cell's mean, sample std and n (the runs are not at hand to pair "
                       "by seed), by scripts/grid_verdicts.py"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
