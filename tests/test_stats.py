"""`msr-compare --baseline`: paired statistics against scipy and hand computations."""

import csv
import json
import math

import pytest
from scipy import stats as st

from msr_train import compare
from msr_train.stats import COLUMNS, holm


def write_summary(folder, method, seed, acc, *, batch_size=128, status="completed", choice=None):
    """A finished run folder: summary.json (and Hydra's choices, with ``choice``)."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "status": status, "method": method, "batch_size": batch_size, "seed": seed,
        "selected_test_acc": acc / 100, "config": {"seed": seed, "batch_size": batch_size, "method": {"name": method}}}))
    if choice is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "hydra.yaml").write_text(json.dumps(
            {"hydra": {"runtime": {"choices": {"method": choice, "hydra/launcher": "basic"}}}}))


def write_group(root, method, accs, *, seeds=None, **kwargs):
    for seed, acc in zip(seeds or range(len(accs)), accs):
        write_summary(root / f"{method}-bs{kwargs.get('batch_size', 128)}-seed{seed}", method, seed, acc, **kwargs)


def read_stats(out):
    with open(out / "stats.csv") as f:
        return list(csv.DictReader(f))


BN, MSR, NF = [90.1, 90.5, 89.8, 90.3, 90.0], [90.4, 90.9, 90.0, 90.8, 90.2], [88.0, 90.2, 87.1, 89.9, 86.5]


def test_paired_and_welch_tests_equal_scipy(tmp_path):
    write_group(tmp_path / "runs", "bn", BN)
    write_group(tmp_path / "runs", "msr", MSR)
    write_group(tmp_path / "runs", "nf", NF[:3], seeds=[10, 11, 12])  # no seed in common with bn: Welch
    out = tmp_path / "out"
    compare.compare([tmp_path / "runs"], out, "method", None, baseline="bn")
    rows = {r["test"]: r for r in read_stats(out)}
    assert list(read_stats(out)[0]) == list(COLUMNS)

    paired = st.ttest_rel(MSR, BN)
    msr = rows["msr"]
    assert float(msr["p"]) == pytest.approx(paired.pvalue, rel=1e-9) and msr["n"] == "5"
    assert float(msr["mean_diff"]) == pytest.approx(sum(MSR) / 5 - sum(BN) / 5, abs=1e-9)
    ci = paired.confidence_interval(0.95)
    assert (float(msr["ci_low"]), float(msr["ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # By hand: mean of the differences +- t(0.975, 4) * sd / sqrt(5).
    d = [a - b for a, b in zip(MSR, BN)]
    mean, sd = sum(d) / 5, math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4)
    assert float(msr["ci_high"]) - mean == pytest.approx(st.t.ppf(0.975, 4) * sd / math.sqrt(5), rel=1e-9)

    welch = st.ttest_ind(NF[:3], BN, equal_var=False)
    nf = rows["nf"]
    assert float(nf["p"]) == pytest.approx(welch.pvalue, rel=1e-9) and nf["n"] == "8"
    ci = welch.confidence_interval(0.95)
    assert (float(nf["ci_low"]), float(nf["ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)
    md = (out / "stats.md").read_text()
    assert "5 pairs" in md and "3 vs 5 (Welch)" in md


def test_holm_equals_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> 0.06 (monotone).
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_verdicts_better_worse_equivalent_and_inconclusive(tmp_path):
    runs = tmp_path / "runs"
    base = [90.0, 90.6, 89.5, 90.2, 89.9, 90.4, 90.1, 89.7]
    write_group(runs, "bn", base)
    write_group(runs, "better", [b + 1.0 + 0.05 * (i % 3) for i, b in enumerate(base)])
    write_group(runs, "worse", [b - 2.0 + 0.1 * (i % 2) for i, b in enumerate(base)])
    write_group(runs, "same", [b + 0.02 * (-1) ** i for i, b in enumerate(base)])
    write_group(runs, "noisy", [b + (1.5 if i % 2 else -1.4) for i, b in enumerate(base)])
    out = tmp_path / "out"
    compare.compare([runs], out, "method", None, baseline="bn", margin=0.5)
    verdicts = {r["test"]: r["verdict"] for r in read_stats(out)}
    assert verdicts == {"better": "better", "worse": "worse", "same": "equivalent", "noisy": "inconclusive"}
    p_holm = {r["test"]: float(r["p_holm"]) for r in read_stats(out)}
    p = {r["test"]: float(r["p"]) for r in read_stats(out)}
    assert p_holm == pytest.approx(dict(zip(p, holm(list(p.values())))))


def test_three_seeds_within_the_spread_are_inconclusive_not_equivalent(tmp_path):
    """The old wording's case: msr within bn's seed spread at 3 seeds. The differences
    (+0.9, -0.6, +0.4) are within a point, yet the 90% CI is several points wide."""
    runs = tmp_path / "runs"
    write_group(runs, "bn", [82.4, 81.7, 83.1])
    write_group(runs, "msr", [83.3, 81.1, 83.5])
    out = tmp_path / "out"
    compare.compare([runs], out, "method", None, baseline="bn", margin=0.5)
    (row,) = read_stats(out)
    assert row["verdict"] == "inconclusive"
    assert float(row["ci_high"]) - float(row["ci_low"]) > 2  # the 95% interval is wider than 2 points


def test_comparisons_at_each_x_value_and_by_hydra_choice(tmp_path, capsys):
    """msr_paper and msr_authors both have method.name msr: choices.method tells them apart."""
    runs = tmp_path / "runs"
    for bs, shift in ((8, 0.0), (128, 1.0)):
        write_group(runs / "bn", "bn", [b - shift for b in BN], batch_size=bs, choice="bn")
        write_group(runs / "paper", "msr", MSR, batch_size=bs, choice="msr_paper")
        write_group(runs / "authors", "msr", NF, batch_size=bs, choice="msr_authors")
    out = tmp_path / "out"
    compare.main([str(runs), "--by", "choices.method", "--x", "batch_size", "--baseline", "bn", "--out", str(out)])
    rows = read_stats(out)
    assert [(r["x"], r["test"]) for r in rows] == [("8", "msr_authors"), ("8", "msr_paper"),
                                                    ("128", "msr_authors"), ("128", "msr_paper")]
    assert all(r["by"] == "choices.method" and r["baseline"] == "bn" for r in rows)
    assert float(rows[3]["mean_diff"]) == pytest.approx(sum(MSR) / 5 - sum(BN) / 5 + 1.0, abs=1e-9)
    assert "| batch_size | test |" in capsys.readouterr().out  # stats.md is printed

    # Grouped by method.name the two MSR configurations would pool: refused, with the fix.
    with pytest.raises(SystemExit) as e:
        compare.main([str(runs), "--x", "batch_size", "--baseline", "bn", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "2 completed runs with seed 0" in err and "--by choices.method" in err


def test_bad_input_is_a_clear_message(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_group(runs, "bn", BN[:1])
    write_group(runs, "msr", MSR)
    write_summary(runs / "nf-diverged", "nf", 0, 10.0, status="diverged")

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            compare.main([str(runs), "--out", str(tmp_path / "out"), *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    err = error("--baseline", "bm")
    assert "--baseline 'bm' is not a method of these runs" in err and "bn, msr, nf" in err
    err = error("--baseline", "bn")  # one bn run: nothing can be tested
    assert "nothing to compare" in err and "1 completed runs" in err and "2 or more" in err
    assert "--margin" in error("--baseline", "msr", "--margin", "-0.5")
    assert "Traceback" not in err
