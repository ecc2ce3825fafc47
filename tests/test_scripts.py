"""The benchmark scripts run end to end (on generated data, in seconds) and report what
they measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_time_to_accuracy_reports_each_methods_steps_and_ratio(tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("time_to_accuracy", None)
    import time_to_accuracy
    out = tmp_path / "tta.md"
    # A target every run reaches at its first evaluation (step 2), and one none reaches.
    time_to_accuracy.main(["--methods", "bn,msr", "--model", "resnet8", "--batch-size", "32", "--epochs", "1",
                           "--target", "0.01", "--eval-every", "2", "--rounds", "2", "--out", str(out),
                           "debug=quick", "dataset.val_size=64", "dataset.image_size=8"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| bn ") or line.startswith("| msr ")}
    assert set(rows) == {"bn", "msr"}
    for cells in rows.values():
        assert cells[1] == "2/2" and cells[2] == "2" and float(cells[3]) >= 0
    assert rows["bn"][5] == "1.00" and float(rows["msr"][5]) > 0
    time_to_accuracy.main(["--methods", "bn", "--model", "resnet8", "--batch-size", "32", "--epochs", "1",
                           "--target", "1.0", "--rounds", "1", "--out", str(out), "debug=quick",
                           "dataset.val_size=64", "dataset.image_size=8"])
    assert "| bn | 0/1 | not reached |" in out.read_text()


@pytest.mark.slow  # the benchmark loop: seconds
def test_bench_hook_shares_and_operator_counts(tmp_path, monkeypatch, one_thread):
    """Sections 3, 6 and 7 on real Fashion-MNIST batches (sections 2-4 once failed on the data
    loader's return type unnoticed): every hook row is reported, and the operator counts
    rank the methods as their extra work does (msr and nf add ops to the plain network)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("bench", None)
    import bench
    out = tmp_path / "bench.md"
    bench.main(["--quick", "--sections", "3,6,7", "--models", "resnet8", "--batch-sizes", "2",
                "--methods", "none,msr,nf", "--threads", "1", "--eval-batch-sizes", "100,500", "--out", str(out)])
    text = out.read_text()
    evals = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 100 | ", "| 500 | "))]
    assert sorted((cells[0].strip("| "), cells[1]) for cells in evals) == [
        ("100", "inference_mode"), ("100", "no_grad"), ("500", "inference_mode"), ("500", "no_grad")]
    assert all(float(cells[2]) > 0 for cells in evals)
    for hook in ("ZMG (gradient projection)", "norm anchors", "MSR scale", "AGC", "Scaled WS", "BNP preconditioning"):
        assert f"| {hook}" in text
    counts = {line.split(" | ")[0].strip("| "): float(line.split(" | ")[2]) for line in text.splitlines()
              if line.startswith(("| none | 2 ", "| msr | 2 ", "| nf | 2 "))}
    assert set(counts) == {"none", "msr", "nf"}
    assert counts["none"] < counts["msr"] and counts["none"] < counts["nf"]
    assert "| 0 | 0 |" in next(line for line in text.splitlines() if line.startswith("| msr | 2 "))  # eager


@pytest.mark.slow  # one compile of resnet8: about half a minute
def test_bench_operator_counts_of_the_compiled_step(monkeypatch, one_thread):
    """Section 6 with --compile counts what the compiled step still dispatches: fewer aten
    calls than eager, one call into compiled code for the model and one per compiled hook
    that has tensor work (msr's before_step), and inductor's fused kernels."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("bench", None)
    import bench
    x, y = bench.fixed_batch(2)
    _, model, method, optimizer = bench.build("resnet8", "msr", 2)
    eager = bench.op_counts(model, method, optimizer, x, y)
    method.compile_step_hooks()
    compiled = bench.op_counts(torch.compile(model), method, optimizer, x, y)
    assert eager["compiled_calls"] == eager["fused_kernels"] == 0
    assert compiled["aten"] < eager["aten"] / 2 and compiled["nodes"] < eager["nodes"] / 2
    assert compiled["compiled_calls"] >= 2 and compiled["fused_kernels"] > 0


@pytest.mark.slow  # the benchmark loop: seconds (compiled: a minute)
@pytest.mark.parametrize("mode", [[], ["--compile"]], ids=["eager", "compiled"])
def test_bench_loop_reports_each_ratio_with_its_range_over_rounds(tmp_path, monkeypatch, one_thread, mode, capsys):
    """Section 5 (the real loop): each method's ratio to none is the median of the rounds'
    ratios, printed with their range, which must contain it. Compiled, each rate is read
    between two log points of one run, and the compile's excess is reported apart."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("bench", None)
    import bench
    out = tmp_path / "bench.md"
    bench.main(["--quick", "--sections", "5", "--models", "resnet8", "--loop-batch-sizes", "2",
                "--methods", "none,msr", "--threads", "1", "--repeats", "3" if not mode else "2", *mode,
                "--out", str(out)])
    compiles = [line for line in capsys.readouterr().err.splitlines() if "(the compile) took" in line]
    assert len(compiles) == (0 if not mode else 4)  # 2 methods x 2 rounds
    rows = {line.split(" | ")[1]: line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| resnet8 | ")}
    assert set(rows) == {"none", "msr"}
    assert rows["none"][6] == "1.000 (1.000-1.000)"
    median, spread = rows["msr"][6].split(" ")
    lo, hi = (float(v) for v in spread.strip("()").split("-"))
    assert 0 < lo <= float(median) <= hi


def test_grid_verdicts_welch_from_summaries_equals_scipy_on_the_values(monkeypatch):
    import statistics

    from scipy import stats as st
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import grid_verdicts
    a, b = [82.4, 81.7, 83.1], [80.0, 81.9, 79.7, 81.2]
    summary = lambda v: (statistics.fmean(v), statistics.stdev(v), len(v))  # noqa: E731
    got = grid_verdicts.welch(summary(a), summary(b))
    ref = st.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert abs(got["p"] - ref.pvalue) < 1e-12 and abs(got["ci_low"] - ci.low) < 1e-9
    assert abs(got["ci_high"] - ci.high) < 1e-9 and got["n"] == 7


@pytest.mark.slow  # about a minute: every method's steps, a compile, CLI runs killed and resumed, DDP
def test_gpu_check_runs_every_cuda_path_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--device", "cpu", "--quick", "--json",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["check"] for r in rows} == {"step", "bf16", "compile", "resume", "ddp"}
    assert [r for r in rows if r["status"] != "ok"] == []  # every path held, the kill included
    assert sum(r["check"] == "step" for r in rows) == 2 * 8  # every method at both batch sizes
    assert "| resume | msr, 12 steps, SIGKILL after a checkpoint | killed after step 3;" in res.stdout


def test_norm_batch_table_chooses_each_runs_evaluation_on_validation_and_pairs_by_seed(tmp_path, monkeypatch):
    """Two seeds of ghost-1 BN whose per-example evaluation wins on validation for one seed
    and loses for the other: each reports the test accuracy of its own val choice; the
    comparison with msr_paper is scipy's paired t-test on those values."""
    from scipy import stats as st
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import norm_batch_table as nbt
    monkeypatch.setattr(nbt, "ARCHIVE", tmp_path)

    def run(name, seed, val, test, evals=None):
        d = tmp_path / f"{name}-seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"status": "completed", "best_val_acc": val,
                                                    "selected_test_acc": test}))
        for overrides, (v, t) in (evals or {}).items():
            for split, acc in (("val", v), ("test", t)):
                (d / f"eval_best_{split}_{overrides}.json").write_text(json.dumps({f"{split}_acc": acc}))
    example, precise = nbt.EVALUATIONS["example"], nbt.EVALUATIONS["precise"]
    run("norm_batch/bn-ghost1", 0, 0.60, 0.59, {example: (0.90, 0.89), precise: (0.61, 0.60)})
    run("norm_batch/bn-ghost1", 1, 0.91, 0.905, {example: (0.88, 0.95), precise: (0.62, 0.61)})
    for seed, acc in enumerate((0.905, 0.90)):
        run("converged/msr_paper-lr2x", seed, acc, acc)
        run("converged/bn-lr2x", seed, acc + 0.01, acc + 0.01)
    _, chosen, running = nbt.table()
    assert chosen[1] == {0: 89.0, 1: 90.5}  # seed 1: running statistics won on validation (0.91 > 0.88)
    assert running[1] == {0: 59.0, 1: 90.5}
    found, _ = nbt.comparisons(chosen, running)
    versus_msr = next(c for c in found if c.baseline == "msr_paper")
    ref = st.ttest_rel([89.0, 90.5], [90.5, 90.0])
    assert abs(versus_msr.p - ref.pvalue) < 1e-12 and abs(versus_msr.mean_diff - (-0.5)) < 1e-9


def write_summary(run_dir: Path, status: str, best_val_acc: float | None = None) -> None:
    """A finished run's summary, of a 10-class dataset (so 0.105 is a stalled run)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "best_val_acc": best_val_acc,
                                                      "config": {"dataset": {"num_classes": 10}}}))


@pytest.fixture
def evidence(tmp_path, monkeypatch):
    """scripts/evidence.py with an empty archive (the committed runs play no part)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("evidence", None)
    import evidence
    monkeypatch.setattr(evidence, "ARCHIVE", tmp_path / "archive")
    return evidence


def plan_jobs(evidence, root: Path) -> dict:
    return {(j.part, j.name): j for j in evidence.plan(root, evidence.default_lrs()) if not j.evaluates}


def test_evidence_plan_chooses_rates_on_validation_and_retries_a_diverged_depth_run(tmp_path, evidence):
    """The evidence driver's plan: the screened rate with the best validation accuracy wins
    (a diverged run never does), the other seeds and the depth runs use it, and a depth run
    that diverged gets one retry at half that rate."""
    root = tmp_path / "root"
    for mult, status, acc in ((0.5, "completed", 0.90), (1.0, "completed", 0.91), (2.0, "diverged", None)):
        write_summary(root / "converged" / evidence.CONVERGED.name("msr_paper", mult, 0), status, acc)
    assert evidence.CONVERGED.progress(root, "msr_paper") == ([0.5, 1.0, 2.0], 1.0)
    lrs = evidence.default_lrs()["converged"]
    rate = f"optimizer.lr={lrs['msr_paper']:g}"
    jobs = plan_jobs(evidence, root)
    assert rate in jobs["converged", "msr_paper-lr1x-seed3"].overrides
    depth = jobs["depth", "resnet110-msr_paper-seed0"]
    assert rate in depth.overrides and not depth.needs
    assert jobs["depth", "resnet110-bn-seed0"].needs == ["bn"]  # bn's screen has not run
    assert ("depth_retry", "resnet110-msr_paper-seed0") not in jobs
    write_summary(depth.dir(root), "diverged")
    jobs = plan_jobs(evidence, root)
    retry = jobs["depth_retry", "resnet110-msr_paper-seed0"]
    assert f"optimizer.lr={lrs['msr_paper'] / 2:g}" in retry.overrides and rate not in retry.overrides
    assert [o for o in retry.overrides if not o.startswith("optimizer.lr=")] == \
        [o for o in depth.overrides if not o.startswith("optimizer.lr=")]


def test_evidence_screen_grows_past_a_winning_edge_and_seeds_wait_for_an_interior_choice(tmp_path, evidence):
    """A screen whose best rate is its grid's edge adds the next multiple past it (x2, /2)
    until an interior rate wins; the seeds wait until then and run at that rate, while the
    depth part keeps the first grid's choice it ran at."""
    root, screen = tmp_path / "root", evidence.CONVERGED
    lr = evidence.default_lrs()["converged"]["bn"]
    for mult, acc in ((0.5, 0.90), (1.0, 0.91), (2.0, 0.92)):
        write_summary(root / "converged" / screen.name("bn", mult, 0), "completed", acc)
    assert screen.progress(root, "bn") == ([0.5, 1.0, 2.0, 4.0], None)
    jobs = plan_jobs(evidence, root)
    assert f"optimizer.lr={lr * 4:g}" in jobs["converged", "bn-lr4x-seed0"].overrides
    assert jobs["converged", "bn-seed1"].needs and ("converged", "bn-lr2x-seed1") not in jobs
    assert f"optimizer.lr={lr * 2:g}" in jobs["depth", "resnet20-bn-seed0"].overrides  # the first grid's 2x
    write_summary(root / "converged" / screen.name("bn", 4.0, 0), "completed", 0.93)
    assert screen.progress(root, "bn") == ([0.5, 1.0, 2.0, 4.0, 8.0], None)
    write_summary(root / "converged" / screen.name("bn", 8.0, 0), "diverged")
    assert screen.progress(root, "bn") == ([0.5, 1.0, 2.0, 4.0, 8.0], 4.0)
    assert f"optimizer.lr={lr * 4:g}" in plan_jobs(evidence, root)["converged", "bn-lr4x-seed4"].overrides
    # The low edge grows downward, and so does a grid that only diverged.
    for mult in (0.5, 1.0, 2.0):
        write_summary(root / "converged" / screen.name("none", mult, 0), "diverged")
    assert screen.progress(root, "none") == ([0.25, 0.5, 1.0, 2.0], None)
    # The parts that run at the first grid's choice take the extended screen's where the
    # first grid has none that trains, once it is made.
    assert evidence.first_choices(root)["none"] is None
    write_summary(root / "converged" / screen.name("none", 0.25, 0), "completed", 0.8)
    write_summary(root / "converged" / screen.name("none", 0.125, 0), "completed", 0.7)
    assert evidence.first_choices(root)["none"] == 0.25
    for mult, acc in ((0.5, 0.90), (1.0, 0.89), (2.0, 0.88)):
        write_summary(root / "converged" / screen.name("gn", mult, 0), "completed", acc)
    assert screen.progress(root, "gn") == ([0.25, 0.5, 1.0, 2.0], None)
    assert screen.progress(root, "gn", extend=False) == ([0.5, 1.0, 2.0], 0.5)


def test_evidence_screen_of_a_method_that_trains_at_no_rate_ends_without_seeds(tmp_path, evidence):
    """A run that stalled at chance never wins, whatever its validation accuracy's noise; a
    grid where every rate stalled grows upwards, and one stalled below and diverged above
    ends with NO_RATE: no seeds run, the report and the tables say so."""
    sys.modules.pop("evidence_tables", None)
    import evidence_tables
    root, screen = tmp_path / "root", evidence.VGG_SCREENS[1]
    for mult, acc in ((0.01, 0.108), (0.05, 0.62), (0.2, 0.109), (1.0, 0.105)):  # stalled but 0.05x
        write_summary(evidence.ARCHIVE / "vgg" / screen.name("bn", mult, 0), "completed", acc)
    assert screen.progress(root, "bn") == ([0.01, 0.05, 0.2, 1.0], 0.05)
    for mult in (0.01, 0.05, 0.2, 1.0):
        write_summary(evidence.ARCHIVE / "vgg" / screen.name("none", mult, 0), "completed", 0.104 + mult / 1000)
    assert screen.progress(root, "none") == ([0.01, 0.05, 0.2, 1.0, 2.0], None)
    write_summary(evidence.ARCHIVE / "vgg" / screen.name("none", 2.0, 0), "diverged")
    assert screen.progress(root, "none") == ([0.01, 0.05, 0.2, 1.0, 2.0], evidence.NO_RATE)
    names = {j.name for j in screen.jobs(root, "none", 0.1, ((8, 1, 0, 3), (8, 1, 1, 3)))}
    assert names == {screen.name("none", m, 0) for m in (0.01, 0.05, 0.2, 1.0, 2.0)}  # and no seeds
    table = evidence.screen_table(root, screen, ("none",), {"none": 0.1})
    assert "| none | lr 0.001: stalled | lr 0.005: stalled | lr 0.02: stalled | lr 0.1: stalled | lr 0.2: diverged " \
           "| none trains |" in table
    assert evidence_tables.at_choice(screen, ("none",))[1] == \
        ["none: no screened rate trains (0.01x, 0.05x, 0.2x, 1x, 2x: each diverged or stalled at chance)"]


def test_evidence_long_part_reuses_the_default_runs_and_screens_vgg_around_the_resnet20_rate(tmp_path, evidence):
    """The long protocol is the default run's recipe: the archived default runs are its
    msr_paper runs at 1x (their configs compose alike but for the progress bar); VGG's
    screen scales each method's ResNet-20 rate, and msr_authors runs at depth."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    long_lr = evidence.default_lrs()["long"]["msr_paper"]
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        long_run = compose("config", [*evidence.LONG.protocol, "method=msr_paper", f"optimizer.lr={long_lr:g}", "seed=1"])
        default = compose("config", ["seed=1", "trainer.cpu_threads=1"])
    long_run.trainer.progress_bar = default.trainer.progress_bar
    assert OmegaConf.to_container(long_run, resolve=True) == OmegaConf.to_container(default, resolve=True)
    root = tmp_path / "root"
    write_summary(evidence.ARCHIVE / "default" / "seed1", "completed", 0.93)
    jobs = plan_jobs(evidence, root)
    assert jobs["long", "msr_paper-lr1x-seed0"].status(root) is None  # seed 0 is not archived here
    assert evidence.run_summary(root, "long", "msr_paper-lr1x-seed1")["best_val_acc"] == 0.93
    assert jobs["vgg", "vgg11-bn-seed0"].needs  # bn's ResNet-20 rate is not chosen here
    for mult, acc in ((0.5, 0.90), (1.0, 0.91), (2.0, 0.905)):
        write_summary(root / "converged" / evidence.CONVERGED.name("bn", mult, 0), "completed", acc)
    jobs = plan_jobs(evidence, root)
    lr = evidence.default_lrs()["converged"]["bn"]
    assert [m for m in evidence.VGG_MULTS if f"optimizer.lr={lr * m:g}" in jobs["vgg", f"vgg16-bn-lr{m:g}x-seed0"].overrides] \
        == list(evidence.VGG_MULTS)
    assert {"model=vgg16", "trainer.signal_prop=true"} <= set(jobs["vgg", "vgg16-bn-lr0.01x-seed0"].overrides)
    # msr_vp has no ResNet-20 screen: its VGG screen scales msr_paper's choice, once made.
    assert jobs["vgg", "vgg11-msr_vp-seed0"].needs == ["msr_paper's ResNet-20 rate"]
    for mult, acc in ((0.5, 0.90), (1.0, 0.89), (2.0, 0.88)):  # msr_paper: its first grid chooses 0.5x
        write_summary(root / "converged" / evidence.CONVERGED.name("msr_paper", mult, 0), "completed", acc)
    paper = evidence.default_lrs()["converged"]["msr_paper"] * 0.5
    overrides = plan_jobs(evidence, root)["vgg", "vgg11-msr_vp-lr0.05x-seed0"].overrides
    assert {"method=msr_vp", f"optimizer.lr={paper * 0.05:g}"} <= set(overrides)
    # VGG-11 whole before VGG-16: its seeds outrank VGG-16's screen.
    assert jobs["vgg", "vgg11-none-seed2"].priority < jobs["vgg", "vgg16-bn-lr0.01x-seed0"].priority
    assert jobs["vgg", "vgg11-bn-lr1x-seed0"].priority < jobs["vgg", "vgg11-bn-seed1"].priority
    # the 10-epoch protocol's seeds (a waiting one here) before the long screen
    assert jobs["converged", "msr_authors-seed1"].priority < jobs["long", "bn-lr0.5x-seed0"].priority
    assert {("depth", f"{m}-msr_authors-seed{s}") for m in ("resnet56", "resnet110") for s in (0, 1, 2)} <= set(jobs)


def test_param_trace_reports_each_convs_change_and_the_product_of_its_scales(tmp_path, monkeypatch, one_thread):
    """The first-steps trace of an MSR run: every conv's relative weight change (0 before
    the first step, then positive), its filter scales (exp(theta) = scale_init at step 0),
    and the product of the mean scales, which at step 0 is scale_init ** convs."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("param_trace", None)
    import param_trace
    out = tmp_path / "trace.md"
    param_trace.main(["debug=quick", "dataset.train_size=null", "dataset.val_size=32", "model=vgg11", "method=msr_paper",
                      "--steps", "3", "--every", "1", "--out", str(out)])
    trace = json.loads(out.with_suffix(".json").read_text())
    convs, rows = trace["convs"], trace["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2] and len(convs) == 8  # VGG-11: 8 convs
    assert all(rows[0][f"conv{i}_dw"] == 0 and rows[2][f"conv{i}_dw"] > 0 for i in range(len(convs)))
    assert rows[0]["conv3_scale_max"] == pytest.approx(0.8)
    assert rows[0]["scale_product"] == pytest.approx(0.8 ** len(convs), rel=1e-5)
    assert out.read_text().count("\n| ") == 1 + 3  # the header and one line per step


def test_evidence_tables_take_each_methods_seeds_at_its_choice_and_name_what_is_left_out(tmp_path, evidence):
    """scripts/evidence_tables.py follows the driver's screens: a method enters a table
    with all its seeds at its chosen rate (the first grid's or the extended screen's), a
    method with seeds missing there is left out and named, and a comparison without its
    baseline holds no runs rather than a table of one group."""
    sys.modules.pop("evidence_tables", None)
    import evidence_tables
    archive, screen = evidence.ARCHIVE, evidence.CONVERGED
    for method, accs in (("bn", (0.90, 0.92, 0.91)), ("msr_paper", (0.89, 0.90, 0.91))):
        for mult, acc in zip((0.5, 1.0, 2.0), accs):
            write_summary(archive / "converged" / screen.name(method, mult, 0), "completed", acc)
    write_summary(archive / "converged" / screen.name("msr_paper", 4.0, 0), "completed", 0.95)
    write_summary(archive / "converged" / screen.name("msr_paper", 8.0, 0), "diverged")
    for seed in (1, 2, 3, 4):
        write_summary(archive / "converged" / screen.name("bn", 1.0, seed), "completed", 0.9)
    for seed in (1, 2):  # msr_paper's seeds at its choice, 4x: 3 of 5
        write_summary(archive / "converged" / screen.name("msr_paper", 4.0, seed), "completed", 0.9)
    runs, left_out = evidence_tables.at_choice(screen, ("bn", "msr_paper", "gn"))
    assert runs == {"bn": [archive / "converged" / f"bn-lr1x-seed{s}" for s in range(5)]}
    assert left_out == ["msr_paper: 3 of 5 seeds archived at its choice, 4x", "gn: its screen has not chosen a rate yet"]
    alone = evidence_tables.versus("x", runs, left_out, "bn")
    assert alone.runs == () and alone.left_out == tuple(left_out)
    for seed in (3, 4):
        write_summary(archive / "converged" / screen.name("msr_paper", 4.0, seed), "completed", 0.9)
    runs, _ = evidence_tables.at_choice(screen, ("bn", "msr_paper"))
    section = evidence_tables.versus("x", runs, [], "bn")
    assert len(section.runs) == 10 and section.options == ("--by", "choices.method", "--baseline", "bn")
    # The first grid's choice stays 2x although the extended screen chose 4x (its seeds 1-4 are not there).
    assert evidence_tables.at_choice(screen, ("msr_paper",), extend=False)[1] == \
        ["msr_paper: 1 of 5 seeds archived at its choice, 2x"]


@pytest.mark.slow  # about 10 s: msr-compare over 95 archived runs
def test_the_committed_10_epoch_tables_are_what_the_archive_gives(tmp_path, monkeypatch):
    """docs/img's first-grid tables of the 10-epoch protocol, rebuilt from the committed
    archive by the one command, equal the committed files: a table on the page cannot
    drift from its runs."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.chdir(SCRIPTS.parent)
    sys.modules.pop("evidence_tables", None)
    import evidence_tables
    monkeypatch.setattr(evidence_tables, "OUT", tmp_path)
    evidence_tables.main(["--only", "converged_batch128/first_grid"])
    tables = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in (".md", ".csv"))
    assert len(tables) == 13  # 3 folders: table.md/.csv and made_by.md each, stats.md/.csv in 2
    for rel in tables:
        if rel.name != "made_by.md":  # it names its --out folder
            assert (tmp_path / rel).read_text() == (SCRIPTS.parent / "docs" / "img" / rel).read_text(), rel


@pytest.mark.slow  # about 10 s: a composition per kind of planned run
def test_every_run_the_evidence_driver_plans_is_a_valid_config(tmp_path, monkeypatch):
    """The driver's plan over the committed archive (the VGG screens with msr_vp among them)
    holds only runs msr-train accepts: a bad override would otherwise fail hours into a
    sweep. One run per part, model and method is composed and checked."""
    from hydra import compose, initialize_config_module
    from msr_train.checks import validate_config
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.chdir(SCRIPTS.parent)
    sys.modules.pop("evidence", None)
    import evidence
    kinds = {}
    for job in evidence.plan(tmp_path, evidence.default_lrs()):
        if not job.evaluates and not job.needs:
            kind = tuple(o for o in job.overrides if not o.startswith(("seed=", "optimizer.lr=")))
            kinds.setdefault(kind, job)
    assert any("method=msr_vp" in kind for kind in kinds) and len(kinds) > 20
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        for job in kinds.values():
            validate_config(compose("config", job.overrides))
