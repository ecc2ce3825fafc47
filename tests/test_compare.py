"""`msr-compare` on hand-made run folders with known numbers, and the TensorBoard layout."""

import csv
import json
import math
import re
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import make_cfg
from msr_train import compare
from msr_train.run_log import COMPARE_CHARTS, RunLog, tensorboard_tag

METHODS, BATCH_SIZES, SEEDS = ("bn", "msr"), (8, 128), (0, 1)


def final_acc(method, bs, seed):
    return {"bn": 0.80, "msr": 0.85}[method] + bs / 10_000 + 0.013 * seed


def selected_acc(method, bs, seed):
    """The test accuracy of the val-selected checkpoint."""
    return final_acc(method, bs, seed) + 0.004 + 0.002 * seed


def config(method, bs, seed):
    cfg = {"batch_size": bs, "seed": seed, "model": {"name": "resnet8"},
           "optimizer": {"name": "sgd", "lr": 0.1}, "method": {"name": method}}
    if method == "msr":
        cfg["method"]["zmg_alpha"] = 1.0
    return cfg


def write_run(folder, method, bs, seed, *, status="completed", epochs=3, summary=True):
    """A run folder as msr-train writes it, of a 3-epoch run that logged ``epochs`` of
    them (fewer: it diverged); ``summary=False``: still running."""
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(json.dumps(config(method, bs, seed)))  # JSON is YAML
    records = [{"step": e * 100, "epoch": float(e), "examples_seen": e * 100 * bs, "train_loss": 2.0 / e,
                "train_acc": 0.5, "val_loss": 1.0 / e, "val_acc": final_acc(method, bs, seed) - 0.1 / e,
                "best_val_acc": final_acc(method, bs, seed), "lr": 0.1, "img_per_s": 1000.0,
                "wall_time_s": 10.0 * e} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        (folder / "summary.json").write_text(json.dumps({
            "status": status, "model": "resnet8", "method": method, "dataset": "fashion_mnist",
            "optimizer": "sgd", "scheduler": "cosine", "batch_size": bs, "lr": 0.1, "epochs": 3,
            "seed": seed, "final_test_acc": final_acc(method, bs, seed),
            "selected_test_acc": selected_acc(method, bs, seed), "best_val_acc": final_acc(method, bs, seed) + 0.01,
            "total_time_s": 100.0 + bs + seed, "train_time_s": 90.0 + bs + seed, "img_per_s": 1000.0 * bs + seed,
            "params": 75002, "peak_memory_mb": 900.0, "config": config(method, bs, seed)}))


@pytest.fixture
def sweep(tmp_path):
    """bn and msr at batch 8 and 128 with seeds 0 and 1; at batch 1024 bn seed 0 diverged,
    bn seed 1 completed, msr seed 0 is still running (no summary.json)."""
    root = tmp_path / "sweep"
    for m in METHODS:
        for bs in BATCH_SIZES:
            for s in SEEDS:
                write_run(root / f"method={m},batch_size={bs}" / f"seed={s}", m, bs, s)
    write_run(root / "bn-1024-0", "bn", 1024, 0, status="diverged", epochs=1)
    write_run(root / "bn-1024-1", "bn", 1024, 1)
    write_run(root / "msr-1024-0", "msr", 1024, 0, summary=False)
    (tmp_path / "empty").mkdir()
    return root


def hand_stats(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


# ---------------------------------------------------------------------------- reading

def test_finds_runs_in_nested_folders_and_single_run_folders(sweep):
    assert len(compare.find_runs([sweep])) == 11
    one = sweep / "method=bn,batch_size=8" / "seed=0"
    runs = compare.find_runs([one, one.parent, one])  # a run given twice counts once
    assert sorted(r.path.name for r in runs) == ["seed=0", "seed=1"]


def test_key_lookup_from_summary_config_and_hydra_config(sweep):
    runs = {r.path.name: r for r in compare.find_runs([sweep])}
    done, running = runs["bn-1024-1"], runs["msr-1024-0"]
    assert (done.get("method"), done.get("batch_size"), done.get("optimizer.lr"), done.get("status")) == \
        ("bn", 1024, 0.1, "completed")
    # Without summary.json the config group stands for its name.
    assert (running.get("method"), running.get("batch_size"), running.get("status")) == ("msr", 1024, "incomplete")
    assert running.get("method.zmg_alpha") == 1.0
    with pytest.raises(compare.MissingKey):
        done.get("method.zmg_alpha")
    with pytest.raises(compare.MissingKey):
        done.get("batch_size.x")
    assert done.get("method.zmg_alpha", None) is None
    assert {"method", "method.name", "optimizer.lr", "final_test_acc", "status"} <= done.keys()


# ---------------------------------------------------------------------------- tables

def test_table_numbers_equal_a_hand_computation(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--x", "batch_size"])
    rows = {(r["method"], int(r["batch_size"])): r for r in csv.DictReader(open(out / "table.csv"))}
    assert sorted(rows) == [("bn", 8), ("bn", 128), ("bn", 1024), ("msr", 8), ("msr", 128), ("msr", 1024)]
    for m in METHODS:
        for bs in BATCH_SIZES:
            row = rows[(m, bs)]
            assert (row["runs"], row["seeds"], row["status"]) == ("2", "0,1", "completed: 2")
            for metric, fn in (("final_test_acc", final_acc), ("selected_test_acc", selected_acc)):
                mean, std = hand_stats([100 * fn(m, bs, s) for s in SEEDS])
                assert row[f"{metric}_pct"] == f"{mean:.2f}"
                assert row[f"{metric}_pct_std"] == f"{std:.2f}"
            assert float(row["train_time_s"]) == pytest.approx(90 + bs + 0.5, abs=0.005)
            assert float(row["img_per_s"]) == pytest.approx(1000 * bs + 0.5, abs=0.005)

    # The diverged run counts, but only the completed one enters the accuracy.
    bn1024 = rows[("bn", 1024)]
    assert (bn1024["runs"], bn1024["seeds"], bn1024["status"]) == ("2", "0,1", "completed: 1, diverged: 1")
    assert bn1024["final_test_acc_pct"] == f"{100 * final_acc('bn', 1024, 1):.2f}"
    assert bn1024["final_test_acc_pct_std"] == ""
    msr1024 = rows[("msr", 1024)]
    assert (msr1024["runs"], msr1024["status"], msr1024["final_test_acc_pct"]) == ("1", "incomplete: 1", "")

    md = (out / "table.md").read_text()
    mean, std = hand_stats([100 * selected_acc("msr", 128, s) for s in SEEDS])
    assert f"| msr | 128 | 2 | 0,1 | {mean:.2f} ± {std:.2f} |" in md
    assert "val-selected" in md and "best test" not in md
    assert md in capsys.readouterr().out

    # The matrix: methods x batch sizes, val-selected test accuracy with the run count.
    pivot = (out / "table_batch_size.md").read_text().splitlines()
    assert pivot[2] == "| method | batch_size 8 | batch_size 128 | batch_size 1024 |"
    bn = [hand_stats([100 * selected_acc("bn", bs, s) for s in SEEDS]) for bs in BATCH_SIZES]
    assert pivot[4] == (f"| bn | {bn[0][0]:.2f} ± {bn[0][1]:.2f} (2) | {bn[1][0]:.2f} ± {bn[1][1]:.2f} (2) | "
                        f"{100 * selected_acc('bn', 1024, 1):.2f} (1; diverged: 1) |")
    assert pivot[5].endswith("| incomplete: 1 |")


def set_best_val(run, acc, classes=10):
    """A run's best validation accuracy, with its dataset's class count in its config."""
    summary = json.loads((run / "summary.json").read_text())
    summary["best_val_acc"], summary["config"]["dataset"] = acc, {"num_classes": classes}
    (run / "summary.json").write_text(json.dumps(summary))


def test_a_run_at_chance_is_stalled_counted_as_a_failure_and_in_no_mean_or_test(tmp_path):
    """Completed, but its best validation accuracy within 1 point of chance (10% for 10
    classes): counted as stalled beside diverged, in no mean and no paired test."""
    root = tmp_path / "runs"
    for seed in range(4):
        write_run(root / f"bn-{seed}", "bn", 128, seed)
        write_run(root / f"msr-{seed}", "msr", 128, seed, status="diverged" if seed == 3 else "completed")
    set_best_val(root / "msr-1", 0.11)   # 11.0%: within 1 point of chance
    set_best_val(root / "msr-2", 0.111)  # 11.1%: learned something
    set_best_val(root / "bn-0", 0.052, classes=20)  # 5.2% of 20 classes: chance + 0.2
    runs = compare.find_runs([root])
    assert {r.path.name: r.status for r in runs if r.status != "completed"} == \
        {"msr-1": "stalled", "msr-3": "diverged", "bn-0": "stalled"}
    out = tmp_path / "out"
    compare.compare([root], out, "method", None, baseline="bn")
    rows = {r["method"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert rows["msr"]["status"] == "completed: 2, diverged: 1, stalled: 1"
    mean, std = hand_stats([100 * selected_acc("msr", 128, s) for s in (0, 2)])
    assert (rows["msr"]["selected_test_acc_pct"], rows["msr"]["selected_test_acc_pct_std"]) == (f"{mean:.2f}", f"{std:.2f}")
    (msr,) = [r for r in csv.DictReader(open(out / "stats.csv")) if r["test"] == "msr"]
    assert msr["n"] == "5" and "2 vs 3 (Welch)" in (out / "stats.md").read_text()  # seeds with a result: 0, 2 vs 1-3
    assert "stalled (best validation accuracy within 1 point of chance)" in (out / "table.md").read_text()


def test_rows_group_by_a_config_path(sweep):
    runs = [r for r in compare.find_runs([sweep]) if r.get("method") == "msr"]
    rows = compare.table_rows(compare.group_runs(runs, ["method.zmg_alpha"]), ["method.zmg_alpha"])
    assert [(r["method.zmg_alpha"], r["runs"]) for r in rows] == [(1.0, 5)]


# ---------------------------------------------------------------------------- plots

def lines(ax, marker=None):
    """The data lines of an axis (legend-only proxies, which hold no points, left out)."""
    return [line for line in ax.get_lines() if len(line.get_xdata())
            and (marker is None or line.get_marker() == marker)]


def crosses(ax):
    return [(x, y) for line in lines(ax, "x") for x, y in zip(line.get_xdata(), line.get_ydata())]


def test_curves_with_seeds_all_have_one_line_per_run_coloured_by_group(sweep, tmp_path):
    runs = compare.find_runs([sweep])
    figs = compare.curve_figures(runs, "method", seeds="all")
    assert set(figs) == {"epoch", "examples_seen", "wall_time_s"}
    for x, fig in figs.items():
        acc_ax, loss_ax = fig.axes[:2]
        for ax in (acc_ax, loss_ax):
            assert len([line for line in lines(ax) if line.get_marker() != "x"]) == 10  # the diverged run: a cross
            assert len({line.get_color() for line in lines(ax)}) == 2
        assert loss_ax.get_yscale() == "log" and "one line per run" in fig.get_suptitle()
    # Every run's curve, as written: x in examples seen, y in percent.
    drawn = sorted((tuple(line.get_xdata()), tuple(round(y, 9) for y in line.get_ydata()))
                   for line in lines(figs["examples_seen"].axes[0]) if line.get_marker() != "x")
    runs_grid = [(m, bs, s, 3) for m in METHODS for bs in BATCH_SIZES for s in SEEDS] + \
        [("bn", 1024, 1, 3), ("msr", 1024, 0, 3)]
    expected = sorted((tuple(e * 100 * bs for e in range(1, n + 1)),
                       tuple(round(100 * (final_acc(m, bs, s) - 0.1 / e), 9) for e in range(1, n + 1)))
                      for m, bs, s, n in runs_grid)
    assert drawn == expected
    # The diverged run (bn, 1024, seed 0, one epoch): a cross at its last point.
    assert crosses(figs["examples_seen"].axes[0]) == [(100 * 1024, pytest.approx(100 * (final_acc("bn", 1024, 0) - 0.1)))]

    out = tmp_path / "out"
    compare.main([str(sweep), "--out", str(out), "--seeds", "all", "--allow-mixed"])  # batch sizes pooled
    assert {p.name for p in out.iterdir()} == {"curves_epoch.png", "curves_examples_seen.png",
                                               "curves_wall_time_s.png", "table.md", "table.csv"}
    assert all((out / p).stat().st_size > 10_000 for p in ("curves_epoch.png", "curves_wall_time_s.png"))


def test_curves_average_the_seeds_of_each_group_with_a_band_and_a_style_per_x_value(sweep, tmp_path):
    fig = compare.curve_figures(compare.find_runs([sweep]), "method", "batch_size")["epoch"]
    acc_ax = fig.axes[0]
    means = {line.get_label(): line for line in lines(acc_ax) if line.get_marker() != "x"}
    assert sorted(means) == sorted(f"{m}, batch_size={bs}" for m in METHODS for bs in (8, 128, 1024))
    line = means["msr, batch_size=128"]
    assert list(line.get_xdata()) == [1.0, 2.0, 3.0]
    assert list(line.get_ydata()) == pytest.approx(
        [hand_stats([100 * (final_acc("msr", 128, s) - 0.1 / e) for s in SEEDS])[0] for e in (1, 2, 3)])
    assert {means[f"bn, batch_size={bs}"].get_linestyle() for bs in (8, 128, 1024)} == {"-", "--", ":"}
    assert means["bn, batch_size=8"].get_color() == means["bn, batch_size=128"].get_color() \
        != means["msr, batch_size=8"].get_color()
    assert len(acc_ax.collections) == 4  # a min-max band for each group of two completed seeds
    assert fig.get_suptitle().startswith("resnet8 on fashion_mnist: validation accuracy and train loss against epoch")
    assert "(mean over 1-2 run(s) per line, band: min-max over them)" in fig.get_suptitle()
    assert fig.axes[-1].get_legend().get_title().get_text() == "method, batch_size"
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "x: diverged, stalled or failed (last point; in no mean)" in legend


def test_single_evaluation_runs_are_markers_and_explosions_do_not_flatten_the_loss_axis(tmp_path):
    write_run(tmp_path / "a", "bn", 8, 0, epochs=1)
    write_run(tmp_path / "b", "msr", 8, 0, epochs=3)
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    exploded = json.loads(records[-1]) | {"train_loss": 1e9}
    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join([*records[:-1], json.dumps(exploded)]) + "\n")
    fig = compare.curve_figures(compare.find_runs([tmp_path]), "method")["epoch"]
    acc_ax, loss_ax = fig.axes[:2]
    single = next(line for line in lines(acc_ax) if line.get_label() == "bn")
    assert single.get_marker() == "o" and len(single.get_xdata()) == 1
    assert loss_ax.get_ylim()[1] < 1e3  # the 1e9 point lies above the axis, the other curves stay readable


def test_legends_and_tables_round_float_values(tmp_path):
    for i, lr in enumerate((0.1 + 0.2, 0.05)):
        write_run(tmp_path / f"r{i}", "msr", 8, 0)
        summary = json.loads((tmp_path / f"r{i}" / "summary.json").read_text())
        (tmp_path / f"r{i}" / "summary.json").write_text(json.dumps(summary | {"lr": lr}))
    runs = compare.find_runs([tmp_path])
    fig = compare.curve_figures(runs, "lr")["epoch"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["0.05", "0.3"]
    assert "| 0.3 |" in compare.pivot_markdown(runs, "lr", "method")


def test_titles_name_the_models_in_natural_order_and_count_more_than_three(tmp_path):
    for model in ("resnet110", "resnet20", "resnet8"):
        write_run(tmp_path / model, "bn", 128, 0)
        summary = json.loads((tmp_path / model / "summary.json").read_text())
        (tmp_path / model / "summary.json").write_text(json.dumps(summary | {"model": model}))
    assert compare.what_was_trained(compare.find_runs([tmp_path])) == "resnet8/resnet20/resnet110 on fashion_mnist"
    write_run(tmp_path / "resnet56", "bn", 128, 0)
    (tmp_path / "resnet56" / "summary.json").write_text(json.dumps(summary | {"model": "resnet56"}))
    assert compare.what_was_trained(compare.find_runs([tmp_path])) == "4 models on fashion_mnist"


def test_sweep_figure_means_and_bands_over_seeds(sweep, tmp_path):
    fig = compare.sweep_figure(compare.find_runs([sweep]), "method", "batch_size")
    (ax,) = fig.axes  # the val-selected (solid) and the final model (dashed) on one axis
    assert ax.get_ylabel() == "test accuracy (%)"
    assert fig.get_suptitle() == ("resnet8 on fashion_mnist: test accuracy against batch_size\n"
                                  "mean over 1-2 completed seed(s) per point, band: min-max over them")
    assert ax.get_xscale() == "log"  # 8 to 1024
    selected = [line for line in lines(ax, "o")]
    final = [line for line in lines(ax, ".")]
    assert [line.get_linestyle() for line in selected + final] == ["-", "-", "--", "--"]
    for (bn, msr), fn in ((selected, selected_acc), (final, final_acc)):
        assert list(bn.get_xdata()) == [8, 128, 1024] and bn.get_color() != msr.get_color()
        expected = [hand_stats([100 * fn("bn", bs, s) for s in SEEDS])[0] for bs in BATCH_SIZES]
        assert list(bn.get_ydata()) == pytest.approx(expected + [100 * fn("bn", 1024, 1)])
        # msr at 1024 has no completed run: a gap, not a point.
        assert list(msr.get_xdata()) == [8, 128, 1024] and math.isnan(msr.get_ydata()[-1])
    assert final[0].get_color() == selected[0].get_color()
    assert len(ax.collections) == 2  # one min-max band per method, around the val-selected line
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "128", "1024"]
    # bn's diverged seed at 1024: a cross at the bottom of that point, in bn's colour.
    (cross,) = [line for line in lines(ax, "x")]
    assert list(cross.get_xdata()) == [1024] and cross.get_color() == selected[0].get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["bn", "msr", "solid: val-selected model", "dashed: final model"]
    compare.main([str(sweep), "--out", str(tmp_path / "out"), "--x", "batch_size"])
    assert (tmp_path / "out" / "sweep_batch_size.png").stat().st_size > 10_000


def test_log_axes_label_ticks_as_plain_numbers(sweep):
    fig = compare.curve_figures(compare.find_runs([sweep]), "method", "batch_size")["epoch"]
    loss_ax = fig.axes[1]
    fig.canvas.draw()
    labels = [t.get_text() for t in loss_ax.get_yticklabels() + loss_ax.get_yticklabels(minor=True) if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+", text) for text in labels), labels  # 0.5, 2; never 2x10^0


def test_sweep_figure_over_a_non_numeric_key_uses_categories(sweep):
    fig = compare.sweep_figure(compare.find_runs([sweep]), "batch_size", "method")
    ax = fig.axes[0]
    assert len(lines(ax, "o")) == 3 and ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bn", "msr"]


def test_names_with_numbers_sort_by_their_numbers(tmp_path):
    """A depth sweep over ``model.name``: resnet8 < resnet20 < resnet56 < resnet110, then
    vgg11 < vgg16, on the figure's axis and in the pivot table (not resnet110 first)."""
    models = ["resnet110", "vgg16", "resnet20", "resnet8", "vgg11", "resnet56"]
    for i, model in enumerate(models):
        write_run(tmp_path / model, "bn", 128, 0)
        summary = json.loads((tmp_path / model / "summary.json").read_text())
        summary["model"] = model
        (tmp_path / model / "summary.json").write_text(json.dumps(summary))
    runs = compare.find_runs([tmp_path])
    ordered = ["resnet8", "resnet20", "resnet56", "resnet110", "vgg11", "vgg16"]
    fig = compare.sweep_figure(runs, "method", "model")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ordered
    header = next(line for line in compare.pivot_markdown(runs, "method", "model").splitlines()
                  if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [f"model {m}" for m in ordered]
    assert sorted([None, "b", 3, "a10", "a9", 1.5], key=compare._order) == [1.5, 3, "a9", "a10", "b", None]


def test_signal_prop_series_and_figure(tmp_path, capsys):
    for m in ("bn", "msr"):
        for s in SEEDS:
            folder = tmp_path / f"{m}-{s}"
            write_run(folder, m, 128, s)
            (folder / "signal_prop.jsonl").write_text("".join(
                json.dumps({"epoch": e, "block": b, "name": f"b{b}", "depth": 1 + 2 * b,
                            "avg_sq_mean": (1 + e) * 0.1 * (b + 1), "avg_var": 1.0, "branch_var": None}) + "\n"
                for e in (0, 1) for b in range(4)))
    write_run(tmp_path / "no-signal-prop", "bn", 8, 0)
    runs = compare.find_runs([tmp_path])
    series, skipped = compare.signal_prop_series(runs, "method", 1)
    assert [label for label, _ in series] == ["bn", "bn", "msr", "msr"] and skipped == []
    assert [r["avg_sq_mean"] for r in series[0][1]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [r["name"] for r in series[0][1]] == ["b0", "b1", "b2", "b3"]  # its text column is kept
    fig = compare.signal_prop_figure(series)
    for ax in fig.axes[:2]:
        assert len(lines(ax)) == 4 and len({line.get_color() for line in lines(ax)}) == 2
        assert ax.get_yscale() == "log"
    capsys.readouterr()
    compare.main(["--signal-prop", str(tmp_path), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "signal_prop_epoch0.png").stat().st_size > 10_000
    assert "warning" not in capsys.readouterr().err  # (block names once read as values not numbers)


# ---------------------------------------------------------------------------- errors

def error_of(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        compare.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_clear_errors(sweep, tmp_path, capsys):
    err = error_of(capsys, tmp_path / "empty", "--out", tmp_path / "out")
    assert "no runs under" in err and str(tmp_path / "empty") in err and "Traceback" not in err
    assert "not a folder" in error_of(capsys, tmp_path / "nowhere")

    err = error_of(capsys, sweep, "--by", "method.zmg_alpha", "--out", tmp_path / "out")
    # The 6 bn runs lack it: named (5 of them, then a count), with the keys they do have.
    assert "6 of 11 runs have no key 'method.zmg_alpha'" in err and "and 1 more" in err
    assert str(sweep / "bn-1024-0") in err and "optimizer.lr" in err and "batch_size" in err
    assert "have no key 'lr_typo'" in error_of(capsys, sweep, "--x", "lr_typo", "--out", tmp_path / "out")

    err = error_of(capsys, "--signal-prop", sweep, "--out", tmp_path / "out")
    assert "none of the 11 runs has signal_prop.jsonl" in err and "trainer.signal_prop=true" in err
    assert not (tmp_path / "out").exists()


def damage(run, what):
    """One of the damaged inputs an operator found msr-compare crashing on."""
    summary, metrics = run / "summary.json", run / "metrics.jsonl"
    if what == "summary a list":
        summary.write_text("[1, 2]")
    elif what == "summary not JSON":
        summary.write_text('{"status": "compl')
    elif what == "summary not UTF-8":
        summary.write_bytes(b"\xff\xfe{}")
    elif what == "a metric a string":
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "selected_test_acc": "0.9"}))
    elif what == "metrics not UTF-8":
        metrics.write_bytes(metrics.read_bytes() + b"\xff\n")
    elif what == "metrics garbage":
        lines = metrics.read_text().splitlines(keepends=True)
        metrics.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    elif what == "hydra config damaged":
        summary.unlink()
        (run / ".hydra" / "config.yaml").write_text("a: [unclosed")


DAMAGES = ["summary a list", "summary not JSON", "summary not UTF-8", "a metric a string", "metrics not UTF-8",
           "metrics garbage", "hydra config damaged"]


@pytest.mark.parametrize("what", DAMAGES)
def test_a_damaged_file_is_a_warning_naming_it_and_the_rest_is_compared(sweep, tmp_path, capsys, what):
    run = sweep / "method=msr,batch_size=8" / "seed=1"
    damage(run, what)
    compare.main([str(sweep), "--out", str(tmp_path / "out"), "--x", "batch_size"])
    captured = capsys.readouterr()
    assert "msr-compare: warning: " + str(run) in captured.err and "Traceback" not in captured.err
    assert "| bn | 8 | 2 |" in captured.out  # the undamaged runs are still compared
    loaded = compare.RunFolder.load(run)
    if what.startswith("metrics"):  # every well-formed row is read, the ones after the damage too
        assert [r["step"] for r in loaded.records] == [100, 200, 300]
    if what == "a metric a string":
        assert "selected_test_acc" not in loaded.summary and loaded.summary["final_test_acc"] > 0


def test_runs_that_differ_in_what_they_are_are_not_pooled(sweep, tmp_path, capsys):
    # By method alone, each line would average three batch sizes: refused, naming them.
    err = error_of(capsys, str(sweep), "--out", str(tmp_path / "a"))
    assert "the runs of method=bn differ in batch_size (1024: 2 run(s), 128: 2 run(s), 8: 2 run(s))" in err
    assert "add the key to --by or --x" in err and "Traceback" not in err and not (tmp_path / "a").exists()
    # A ResNet-50 run among ResNet-8 runs at one batch size: in its group, and across groups.
    other = sweep / "r50"
    write_run(other, "msr", 8, 2)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps(summary | {"model": "resnet50"}))
    err = error_of(capsys, str(sweep), "--out", str(tmp_path / "b"), "--x", "batch_size")
    assert "the runs of method=msr, batch_size=8 differ in model (resnet50: 1 run(s), resnet8: 2 run(s))" in err
    # Pooled on purpose; and one --x value is a note, not a silent one-point figure.
    compare.main([str(sweep / "method=bn,batch_size=8"), "--out", str(tmp_path / "c"), "--x", "batch_size"])
    assert "every run has batch_size=8, so the sweep figure has one point" in capsys.readouterr().err
    compare.main([str(sweep), "--out", str(tmp_path / "d"), "--allow-mixed"])
    assert "| msr | 6 |" in capsys.readouterr().out


def test_same_pools_runs_of_a_config_with_those_of_the_preset_it_equals(tmp_path, capsys):
    """Runs made under ``method=msr`` and under its preset ``msr_paper`` (same settings)
    are two groups by choices.method; ``--same msr=msr_paper`` makes them one, paired by
    seed with bn's; a relabel that matches no run is an error, not a silent no-op."""
    root = tmp_path / "runs"
    for seed in range(4):
        for method, choice in (("bn", "bn"), ("msr", "msr" if seed < 2 else "msr_paper")):
            write_run(root / f"{method}-{seed}", method, 128, seed)
            (root / f"{method}-{seed}" / ".hydra" / "hydra.yaml").write_text(
                json.dumps({"hydra": {"runtime": {"choices": {"method": choice}}}}))
        summary = root / f"msr-{seed}" / "summary.json"  # differences that vary by seed, as real ones do
        summary.write_text(json.dumps(json.loads(summary.read_text()) | {"selected_test_acc": 0.86 + 0.002 * seed ** 3}))
    compare.main([str(root), "--by", "choices.method", "--baseline", "bn", "--out", str(tmp_path / "apart")])
    out = capsys.readouterr().out
    assert "| msr | 2 | 0,1 |" in out and "| msr_paper | 2 | 2,3 |" in out
    compare.main([str(root), "--by", "choices.method", "--baseline", "bn", "--same", "msr=msr_paper",
                  "--out", str(tmp_path / "pooled")])
    out = capsys.readouterr().out
    assert "| msr_paper | 4 | 0,1,2,3 |" in out and "| msr |" not in out and "| msr_paper vs bn | 4 pairs |" in out
    err = error_of(capsys, root, "--by", "choices.method", "--same", "mrs=msr_paper", "--out", tmp_path / "typo")
    assert "--same mrs=msr_paper: no run has choices.method 'mrs'; its values are: bn, msr, msr_paper" in err
    assert "it is OLD=NEW" in error_of(capsys, root, "--by", "choices.method", "--same", "msr")
    assert not (tmp_path / "typo").exists()


def test_same_refuses_to_pool_what_composes_differently(tmp_path, capsys):
    """--same pools only runs whose relabeled config group agrees: a preset with another
    method.* setting is refused, naming the setting; a numeric key's NEW is the number the
    runs have; a chain of relabels is refused rather than applied in some order."""
    root = tmp_path / "runs"
    for seed in range(2):
        for choice, alpha in (("msr_paper", 1.0), ("msr_authors", 0.5)):
            write_run(root / f"{choice}-{seed}", "msr", 128, seed)
            (root / f"{choice}-{seed}" / ".hydra" / "hydra.yaml").write_text(
                json.dumps({"hydra": {"runtime": {"choices": {"method": choice}}}}))
            summary = root / f"{choice}-{seed}" / "summary.json"
            cfg = json.loads(summary.read_text())
            cfg["config"]["method"]["zmg_alpha"] = alpha
            summary.write_text(json.dumps(cfg))
    err = error_of(capsys, root, "--by", "choices.method", "--same", "msr_authors=msr_paper", "--out", tmp_path / "a")
    assert ("--same pooled runs of choices.method=msr_paper that do not compose alike: "
            "method.zmg_alpha (0.5: 2 run(s), 1: 2 run(s))") in err and not (tmp_path / "a").exists()
    err = error_of(capsys, root, "--by", "choices.method", "--same", "a=b", "--same", "b=c")
    assert "b is both an OLD and a NEW" in err
    # A numeric key: the relabeled runs join the group of the number (not a string twin),
    # and the setting relabeled is the one difference --same does not count against them.
    rates = tmp_path / "rates"
    for seed in range(4):
        write_run(rates / f"bn-{seed}", "bn", 128, seed)
        summary = rates / f"bn-{seed}" / "summary.json"
        cfg = json.loads(summary.read_text())
        cfg["config"]["optimizer"]["lr"] = 0.05 if seed >= 2 else 0.1
        summary.write_text(json.dumps(cfg))
    compare.main([str(rates), "--by", "optimizer.lr", "--same", "0.05=0.1", "--out", str(tmp_path / "pooled")])
    assert "| 0.1 | 4 | 0,1,2,3 |" in capsys.readouterr().out
    assert "OLD and NEW are the same" in error_of(capsys, rates, "--by", "optimizer.lr", "--same", "0.1=0.1")


def test_a_path_over_the_length_limit_is_a_clear_error(capsys):
    err = error_of(capsys, "x" * 5000)
    assert "File name too long" in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "msr_train.compare", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("msr-compare: error: no runs under") and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- TensorBoard

def test_record_keys_map_to_tensorboard_tags_by_one_rule():
    keys = ("val_acc", "val_raw_loss", "train_acc", "test_top5", "best_val_acc", "img_per_s",
            "grad_norm/head.weight", "a_new_metric", "step", "examples_seen", "train_loss", "lr")
    assert [tensorboard_tag(k) for k in keys] == [
        "val/acc", "val_raw/loss", "train/acc", "test/top5", "val/best_acc", "throughput/img_per_s",
        "grad_norm/head.weight", "a_new_metric", None, None, None, None]


def test_tensorboard_layout_overlays_runs_and_hparams_show_selection_metrics(tmp_path):
    log = RunLog(tmp_path, make_cfg("method=bn"))
    log.log({"examples_seen": 128, "val_acc": 0.5, "best_val_acc": 0.5, "test_acc": 0.5})
    log.close({"status": "completed"})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert [cat.title for cat in layout.category] == ["compare runs (x: examples seen)"]
    charts = {c.title.removesuffix(" (x: examples seen)"): list(c.multiline.tag) for cat in layout.category
              for c in cat.chart}
    assert list(charts) == list(COMPARE_CHARTS)
    # Each chart's regex picks its own tag (in every run) and no other.
    record_keys = ("train_acc", "val_loss", "val_acc", "val_top5", "best_val_acc", "val_raw_loss", "val_raw_acc",
                   "test_loss", "test_acc", "test_top5", "img_per_s")
    tags = [*map(tensorboard_tag, record_keys), "train/loss", "lr", "test/acc_old", "signal_prop/avg_var/block_000"]
    for title, (regex,) in charts.items():
        assert [t for t in tags if re.search(regex, t)] == [title]
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    metrics = [m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos]
    assert metrics == ["val/best_acc", "test/selected_acc", "test/acc"]


def test_hparams_put_the_key_and_swept_settings_first_with_their_own_types(tmp_path, monkeypatch):
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit
    monkeypatch.setenv("MSR_TRAIN_SWEEP_KEYS", "optimizer.weight_decay,scheduler")
    log = RunLog(tmp_path, make_cfg("method=bn"))
    log.close({"status": "completed"})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    _sort_and_reduce_to_hparams_limit(experiment, 0)  # the order the HParams tab shows
    assert [h.name for h in experiment.hparam_infos][:8] == [
        "batch_size", "dataset.name", "method.name", "model.name", "optimizer.lr", "optimizer.weight_decay",
        "scheduler.name", "seed"]
    types = {h.name: h.type for h in experiment.hparam_infos}
    assert (types["batch_size"], types["optimizer.lr"], types["trainer.progress_bar"]) == (
        api_pb2.DATA_TYPE_STRING, api_pb2.DATA_TYPE_FLOAT64, api_pb2.DATA_TYPE_BOOL)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["batch_size"].string_value == "128"  # not 128.00
    assert start.hparams["trainer.progress_bar"].bool_value is True  # not 1.0
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.1)
