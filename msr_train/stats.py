"""Paired statistics for ``msr-compare --baseline``: is a group better than, worse than,
equivalent to, or not distinguishable from the baseline?

For every ``--by`` group other than the baseline, at every ``--x`` value, the difference
of the val-selected test accuracy (test - baseline, in percentage points) over the
completed runs:

- **paired** by seed where the two groups share at least 2 seeds (Student's t on the
  per-seed differences, ``scipy.stats.ttest_rel``; runs whose seed the other side lacks
  are left out), otherwise **Welch**'s unpaired t-test (``ttest_ind(equal_var=False)``);
- the mean difference with its 95% confidence interval (t distribution; Welch-
  Satterthwaite degrees of freedom for Welch), and the two-sided p;
- p adjusted by **Holm** over every comparison of the table (one family): the step-down
  procedure controls the family-wise error rate at 5% whatever the dependence;
- the verdict: ``better`` / ``worse`` where the Holm-adjusted p < 0.05 (by the sign of
  the mean difference); else ``equivalent`` where the 90% confidence interval lies inside
  (-margin, +margin) (two one-sided tests at 5%, Schuirmann 1987); else ``inconclusive``.
  "Within the seed spread" is never a verdict: three seeds within a point of each other
  usually leave a confidence interval several points wide.

Torch-free (scipy and the standard library), so msr-compare stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as st

ALPHA = 0.05
COLUMNS = ("by", "x", "baseline", "test", "n", "mean_diff", "ci_low", "ci_high", "p", "p_holm", "verdict")


@dataclass
class Comparison:
    """One test group against the baseline at one x value (differences in points)."""
    by: str
    x: object
    baseline: str
    test: str
    kind: str              # "paired" or "Welch"
    n: int                 # pairs (paired) or runs on both sides (Welch)
    n_baseline: int
    n_test: int
    mean_diff: float
    ci_low: float
    ci_high: float
    ci90_low: float
    ci90_high: float
    p: float
    p_holm: float = math.nan
    verdict: str = "inconclusive"


def paired_or_welch(baseline: dict, test: dict) -> dict:
    """The test of ``test`` - ``baseline`` (each {seed: value}): paired on the shared seeds
    when there are 2 or more, else Welch over all values of each side."""
    shared = sorted(set(baseline) & set(test), key=str)
    if len(shared) >= 2:
        a, b = [test[s] for s in shared], [baseline[s] for s in shared]
        result, kind, n = st.ttest_rel(a, b), "paired", len(shared)
        diff = math.fsum(x - y for x, y in zip(a, b)) / n
    else:
        a, b = list(test.values()), list(baseline.values())
        result, kind, n = st.ttest_ind(a, b, equal_var=False), "Welch", len(a) + len(b)
        diff = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    ci95, ci90 = _interval(result, diff, 0.95), _interval(result, diff, 0.90)
    return dict(kind=kind, n=n, mean_diff=diff, ci_low=ci95[0], ci_high=ci95[1], ci90_low=ci90[0],
                ci90_high=ci90[1], p=float(result.pvalue))


def _interval(result, diff: float, level: float) -> tuple[float, float]:
    """scipy's t interval; where every difference is the same (zero spread) scipy has no
    interval, and the data say exactly ``diff``."""
    ci = result.confidence_interval(level)
    low, high = float(ci.low), float(ci.high)
    return (diff, diff) if math.isnan(low) or math.isnan(high) else (low, high)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979): the i-th smallest of m p-values times
    (m - i + 1), made monotone and capped at 1. NaN (no test possible) stays NaN and is
    not counted in m."""
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(c: Comparison, margin: float) -> str:
    if not math.isnan(c.p_holm) and c.p_holm < ALPHA and c.mean_diff != 0:
        return "better" if c.mean_diff > 0 else "worse"
    if -margin < c.ci90_low and c.ci90_high < margin:
        return "equivalent"
    return "inconclusive"


def judge(comparisons: list[Comparison], margin: float) -> list[Comparison]:
    """Holm over the whole table, then each comparison's verdict (in place)."""
    for c, p in zip(comparisons, holm([c.p for c in comparisons])):
        c.p_holm = p
        c.verdict = verdict(c, margin)
    return comparisons


def row(c: Comparison) -> dict:
    """The comparison as stats.csv writes it (COLUMNS)."""
    return {k: getattr(c, k) for k in COLUMNS}


def _num(v: float, digits: int = 2) -> str:
    return "" if math.isnan(v) else f"{v:.{digits}f}"


def _p(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.3g}" if v >= 1e-4 else f"{v:.1e}"


def markdown(comparisons: list[Comparison], *, x_key: str | None, margin: float, metric: str,
             notes: list[str]) -> str:
    """stats.md: the table and how to read it."""
    head = ["test", "n", "difference (points)", "95% CI", "p", "p (Holm)", "verdict"]
    if x_key is not None:
        head.insert(0, x_key)
    lines = [f"{metric} of each {comparisons[0].by if comparisons else 'group'} minus the baseline's, in "
             f"percentage points. Paired t-test on the per-seed differences where the two share 2 or more seeds "
             f"(n = pairs), else Welch's test (n = runs on both sides); p two-sided; Holm's adjustment over the "
             f"{len(comparisons)} comparisons; verdict: better / worse where p (Holm) < {ALPHA}, equivalent where "
             f"the 90% CI lies inside ±{margin:g} points (TOST at 5%), else inconclusive.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        n = f"{c.n} pairs" if c.kind == "paired" else f"{c.n_test} vs {c.n_baseline} (Welch)"
        cells = [f"{c.test} vs {c.baseline}", n, _num(c.mean_diff), f"[{_num(c.ci_low)}, {_num(c.ci_high)}]",
                 _p(c.p), _p(c.p_holm), f"**{c.verdict}**" if c.verdict != "inconclusive" else c.verdict]
        if x_key is not None:
            cells.insert(0, str(c.x))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"
