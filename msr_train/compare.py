"""`msr-compare`: curves, tables and signal propagation plots that compare runs.

    msr-compare outputs/sweeps/2025-06-01_10-00-00 --by method --x batch_size
    msr-compare outputs/runs --by optimizer.lr --out compare/lr
    msr-compare --signal-prop outputs/runs --epoch 0

Three layers, each usable and testable on its own:

- reading: ``find_runs`` finds run folders (any folder holding metrics.jsonl, summary.json
  or signal_prop.jsonl) and loads them as ``RunFolder`` (what a run left on disk; not
  train.Run, which trains one); ``RunFolder.get`` looks a key up;
- tabulating: ``group_runs`` and ``table_rows``, written by ``write_markdown`` and
  ``write_csv``;
- plotting: ``curve_figures``, ``sweep_figure`` and ``signal_prop_figure`` return
  matplotlib Figures drawn by the Agg canvas. Pyplot is not used: nothing needs a
  display, and no figure stays registered once saved.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import blended_transform_factory
from omegaconf import OmegaConf

from . import stats
from .errors import ConfigError, describe
from .run_files import METRICS, SIGNAL_PROP, SUMMARY
from .rules import flatten
from .safe_files import damaged_lines_text, read_jsonl

# ---------------------------------------------------------------------------- reading

#: Files of a run folder (as msr-train writes them); any of them marks a folder as a run.
RUN_FILES = (METRICS, SUMMARY, SIGNAL_PROP)
#: Hydra's copy of the run's config: the only config of a run that has no summary yet.
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
#: Hydra's own settings for the run; ``runtime.choices`` names the config chosen in each
#: group (``method=msr_paper``), which the config's values alone do not.
HYDRA_SETTINGS = Path(".hydra") / "hydra.yaml"
#: The status of a run without summary.json: still running, or killed.
INCOMPLETE = "incomplete"
#: A run that completed without learning: its best validation accuracy (the selected
#: checkpoint's) within this many points of chance (100 / classes). Like a diverged run it
#: is counted in its cell and is in no mean and no paired test: a failure, not a result.
STALLED_WITHIN_POINTS = 1.0
#: The statuses of runs that give no result.
FAILURES = ("diverged", "failed", "stalled")
_MISSING = object()
#: summary.json's fields that are numbers (accuracies, losses, times, throughput).
METRIC_SUFFIXES = ("_acc", "_loss", "_s", "step")


class MissingKey(KeyError):
    pass


def warn(path: Path, problem: str) -> None:
    print(f"msr-compare: warning: {path}: {problem}", file=sys.stderr)


def _yaml(path: Path) -> dict:
    """A YAML file of Hydra's as a dict; {} (with a warning) if it is missing or unreadable."""
    if not path.exists():
        return {}
    try:
        node = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml and OmegaConf raise many types for a damaged file
        node = e
    if not isinstance(node, dict):
        warn(path, f"not a readable config ({describe(node) if isinstance(node, Exception) else type(node).__name__}); "
             "ignored")
        return {}
    return node


def _choices(path: Path) -> dict:
    choices = _yaml(path).get("hydra", {}).get("runtime", {}).get("choices")
    return {k: v for k, v in (choices or {}).items() if not k.startswith("hydra/") and v is not None}


def _is_number(value) -> bool:
    return value is None or isinstance(value, (int, float))


def _summary(path: Path) -> dict:
    """summary.json, its metrics checked to be numbers; {} (with a warning) if unreadable."""
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        summary = e
    if not isinstance(summary, dict):
        what = describe(summary) if isinstance(summary, Exception) else f"a JSON {type(summary).__name__}"
        warn(path, f"not a summary ({what}); the run is read as one without a summary")
        return {}
    bad = sorted(k for k, v in summary.items() if k.endswith(METRIC_SUFFIXES) and not _is_number(v))
    if bad:
        warn(path, f"{', '.join(bad)} {'is not a number' if len(bad) == 1 else 'are not numbers'}; ignored")
    return {k: v for k, v in summary.items() if k not in bad}


def _records(path: Path, text_keys: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a JSON-lines file, each value a number (a string under ``text_keys``);
    damaged lines and values are skipped with a warning, never the rows after them."""
    if not path.exists():
        return []
    damaged = []
    try:
        records = read_jsonl(path, damaged)
    except OSError as e:
        warn(path, f"unreadable ({e.strerror}); ignored")
        return []
    if damaged:
        warn(path, f"{damaged_lines_text(damaged)} skipped")
    clean = [{k: v for k, v in r.items() if _is_number(v) or (k in text_keys and isinstance(v, str))}
             for r in records]
    dropped = sum(len(r) - len(c) for r, c in zip(records, clean))
    if dropped:
        warn(path, f"{dropped} values that are not numbers skipped")
    return clean


def run_status(summary: dict, config: dict | None) -> str:
    """A run's summary status, or ``stalled`` for a completed run whose best validation
    accuracy is within STALLED_WITHIN_POINTS of chance (``dataset.num_classes`` of its
    config): it ran to the end and learned nothing."""
    status = summary.get("status", INCOMPLETE)
    classes = (config.get("dataset") or {}).get("num_classes") if isinstance(config, dict) else None
    best = summary.get("best_val_acc")
    if status == "completed" and isinstance(best, (int, float)) and isinstance(classes, int) and classes > 0 \
            and 100 * best <= 100 / classes + STALLED_WITHIN_POINTS:
        return "stalled"
    return status


@dataclass
class RunFolder:
    path: Path
    records: list[dict]      # metrics.jsonl
    summary: dict            # summary.json; {} until the run ends
    config: dict             # the run's config as nested dicts
    signal_prop: list[dict]  # signal_prop.jsonl
    choices: dict            # the config chosen in each group (Hydra's runtime.choices), {} if unknown
    relabeled: dict = field(default_factory=dict)  # key -> the value it reads as (--same)

    @classmethod
    def load(cls, path: Path) -> RunFolder:
        path = Path(path)
        summary = _summary(path / SUMMARY)
        config = summary.get("config")
        if not isinstance(config, dict):
            # Unresolved: interpolations stay as written, which is enough to look keys up.
            config = _yaml(path / HYDRA_CONFIG)
        return cls(path, _records(path / METRICS), summary, config, _records(path / SIGNAL_PROP, ("name",)),
                   _choices(path / HYDRA_SETTINGS))

    @property
    def status(self) -> str:
        """summary.json's status, or ``stalled`` for a completed run at chance (run_status)."""
        return run_status(self.summary, self.config)

    def get(self, key: str, default=_MISSING):
        """A summary field (method, batch_size, model, status, ...) or a dotted config path
        (optimizer.lr, method.zmg_alpha). A config group stands for its name (method ->
        method.name), so runs without summary.json yet group like finished ones;
        ``choices.<group>`` is the config file chosen for it (``choices.method``:
        msr_paper, where method is msr). Without the key: ``default`` if given, else
        MissingKey."""
        if key in self.relabeled:
            return self.relabeled[key]
        if key == "status":
            return self.status
        if key.startswith("choices."):
            group = key.removeprefix("choices.")
            if group in self.choices:
                return self.choices[group]
            if default is _MISSING:
                raise MissingKey(key)
            return default
        if key in self.summary and not isinstance(self.summary[key], (dict, list)):
            return self.summary[key]
        node = self.config
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if isinstance(node, dict):
            node = node.get("name", _MISSING)
        if node is _MISSING:
            if default is _MISSING:
                raise MissingKey(key)
            return default
        # Lists (e.g. dataset.mean) must be hashable to group on.
        return tuple(node) if isinstance(node, list) else node

    def keys(self) -> set[str]:
        """Every key ``get`` answers."""
        out = {"status"} | {k for k, v in self.summary.items() if not isinstance(v, (dict, list))}
        out |= {f"choices.{group}" for group in self.choices}

        def walk(prefix, node):
            for k, v in node.items():
                if not isinstance(v, dict) or "name" in v:
                    out.add(prefix + k)
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
        walk("", self.config)
        return out


def find_runs(paths) -> list[RunFolder]:
    """The runs in ``paths``: each a run folder or a folder with run folders anywhere
    below it (a sweep, outputs/). Raises ConfigError for a path without runs."""
    folders = []
    for path in map(Path, paths):
        try:
            is_dir = path.is_dir()
        except OSError as e:  # e.g. a name over the system's length limit
            raise ConfigError(f"{str(path)[:80]}...: {e.strerror}; pass run folders or folders that contain them") \
                from None
        if not is_dir:
            raise ConfigError(f"{path} is not a folder; pass run folders or folders that contain them")
        found = sorted({f.parent.resolve() for f in path.rglob("*") if f.name in RUN_FILES})
        if not found:
            raise ConfigError(
                f"no runs under {path}: a run folder holds {', '.join(RUN_FILES)}. Pass the output "
                "folder of msr-train runs (outputs/runs/..., a sweep's outputs/sweeps/...) or a folder above them")
        folders += [f for f in found if f not in folders]
    runs = [RunFolder.load(f) for f in folders]
    for run in runs:
        if not (run.config or run.summary):
            warn(run.path, "no readable config nor summary, so nothing says what run it is; skipped")
    return [run for run in runs if run.config or run.summary]


def relabel(runs: list[RunFolder], key: str, same: dict[str, str]) -> None:
    """Runs whose ``key`` is OLD read it as NEW, for each ``--same OLD=NEW``: a config and
    a preset that composes to the same settings (``msr`` and ``msr_paper``) are one group.
    An OLD that no run has is refused: the option would do nothing. NEW takes the type the
    runs that have it give it (a number on a numeric key), so the two groups become one;
    check_like_runs then makes sure they compose alike."""
    for old, new in same.items():
        hits = [run for run in runs if str(run.get(key, None)) == old]
        if not hits:
            values = sorted({str(run.get(key, None)) for run in runs})
            raise ConfigError(f"--same {old}={new}: no run has {key} {old!r}; its values are: {', '.join(values)}")
        typed = next((value for run in runs if str(value := run.get(key, None)) == new), new)
        for run in hits:
            run.relabeled[key] = typed


def _values(runs: list[RunFolder], key: str) -> list:
    """Every run's value of ``key``; a ConfigError names the runs without it."""
    values, missing = [], []
    for run in runs:
        try:
            values.append(run.get(key))
        except MissingKey:
            missing.append(run)
    if missing:
        shown = ", ".join(str(r.path) for r in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        common = sorted(set.intersection(*(r.keys() for r in missing)))
        raise ConfigError(
            f"{len(missing)} of {len(runs)} runs have no key {key!r}: {shown}. "
            f"Keys they have: {', '.join(common) or '(none)'}. Choose one of these keys, "
            f"or pass only runs that have {key!r}.")
    return values


# ---------------------------------------------------------------------------- tabulating

def _order(value):
    """Sort key that puts numbers in numeric order, then strings in natural order (their
    digit runs as numbers: resnet8 < resnet20 < resnet110), then None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, ())
    parts = re.split(r"(\d+)", str(value))
    return (1 if value is not None else 2, 0, tuple(int(p) if i % 2 else p for i, p in enumerate(parts)))


def group_runs(runs: list[RunFolder], keys: list[str]) -> dict[tuple, list[RunFolder]]:
    """Runs by their values of ``keys``, groups in sorted order. Raises ConfigError when a
    run lacks one of the keys."""
    columns = [_values(runs, key) for key in keys]
    groups: dict[tuple, list[RunFolder]] = {}
    for run, values in zip(runs, zip(*columns)):
        groups.setdefault(values, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: [_order(v) for v in kv[0]]))


#: What makes runs the same experiment, seed aside. Runs pooled into one group must agree
#: on all of these but the --by/--x keys; groups set side by side must agree on
#: ``COMPARED_ALIKE`` (each method's own lr or optimizer may differ between groups).
IDENTITY = ("model", "dataset", "dataset.train_size", "batch_size", "epochs", "trainer.max_steps", "optimizer",
            "optimizer.lr", "scheduler", "method", "choices.method", "choices.experiment")
COMPARED_ALIKE = ("model", "dataset", "dataset.train_size", "batch_size", "epochs", "trainer.max_steps",
                  "choices.experiment")


def _varied(key: str, keys: list[str]) -> bool:
    """Whether ``key`` is in the config group of one of the --by/--x ``keys`` (by method:
    method, choices.method and method.*)."""
    def group(k: str) -> str:
        return k.removeprefix("choices.").split(".")[0]
    return any(group(key) == group(k) for k in keys)


def _differences(runs: list[RunFolder], identity: tuple[str, ...], keys: list[str]) -> list[str]:
    """``key (value: n runs, ...)`` for each identity key on which ``runs`` disagree
    (runs without the key are not counted against it)."""
    out = []
    for key in identity:
        if _varied(key, keys):
            continue
        absent = object()
        counts = Counter(label(v) for v in (run.get(key, absent) for run in runs) if v is not absent)
        if len(counts) > 1:
            out.append(f"{key} ({', '.join(f'{v}: {n} run(s)' for v, n in sorted(counts.items()))})")
    return out


def _relabel_differences(members: list[RunFolder], keys: list[str]) -> str:
    """Where a group pools runs that --same relabeled, the settings of the relabeled key's
    config group (``choices.method``: every ``method.*``) on which its members disagree,
    as ``method.stem (msr: 2 run(s), plain: 1 run(s))``, the relabeled setting itself aside
    (``--by optimizer.lr --same 0.05=0.1`` pools two rates on purpose); "" when they agree.
    A key outside the config's groups (``choices.experiment``) has nothing to check."""
    relabeled = [key for key in keys if any(key in run.relabeled for run in members)]
    out = []
    for key in relabeled:
        group = key.removeprefix("choices.").split(".")[0]
        flats = [flatten({group: run.config.get(group, None)}) for run in members]
        for leaf in sorted(set().union(*flats) - {key, f"{key}.name"}):
            counts = Counter(label(flat.get(leaf, "(absent)")) for flat in flats)
            if len(counts) > 1:
                out.append(f"{leaf} ({', '.join(f'{v}: {n} run(s)' for v, n in sorted(counts.items()))})")
    return "; ".join(out)


def check_like_runs(runs: list[RunFolder], groups: dict[tuple, list[RunFolder]], keys: list[str]) -> None:
    """Refuse to average or set side by side runs that are different experiments (e.g.
    ResNet-8 with ResNet-50 runs, or two batch sizes in one line): ConfigError naming the
    keys on which they differ and how to compare them."""
    problems = [f"the runs of {', '.join(f'{k}={label(v)}' for k, v in zip(keys, group))} differ in "
                f"{'; '.join(diff)}" for group, members in groups.items()
                if (diff := _differences(members, IDENTITY, keys))]
    problems += [f"--same pooled runs of {', '.join(f'{k}={label(v)}' for k, v in zip(keys, group))} that do not "
                 f"compose alike: {diff}" for group, members in groups.items()
                 if (diff := _relabel_differences(members, keys))]
    across = _differences(runs, COMPARED_ALIKE, keys)
    if across:
        problems.append(f"the groups differ in {'; '.join(across)}")
    if problems:
        raise ConfigError(f"{'. '.join(problems[:3])}. Compare like with like: pass only the runs of one experiment "
                          "(a narrower folder), add the key to --by or --x, or pass --allow-mixed to pool them "
                          "anyway")


def note_one_point(runs: list[RunFolder], x: str | None) -> None:
    if x is not None and len(set(_values(runs, x))) == 1:
        print(f"msr-compare: note: every run has {x}={label(runs[0].get(x))}, so the sweep figure has one point "
              f"per --by group; pass runs with several values of {x}, or drop --x", file=sys.stderr)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); NaN where undefined (no value, one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


#: table_rows' columns of numbers, after the group's key values and runs, seeds.
#: The accuracies compared, first the headline one: the test accuracy of the model
#: selected on validation. No column is a maximum over test evaluations.
ACCURACIES = {"selected_test_acc": "test acc., val-selected (%)", "final_test_acc": "test acc., final model (%)",
              "best_val_acc": "best val acc. (%)"}
STAT_COLUMNS = (*(f"{m}_pct{s}" for m in ACCURACIES for s in ("", "_std")), "train_time_s", "img_per_s")


def completed_values(runs: list[RunFolder], metric: str, scale: float = 1.0) -> list[float]:
    """``metric`` from the summaries of the completed runs. Runs that diverged, stalled or
    have not finished are left out: their last accuracy is not a result."""
    return [scale * r.summary[metric] for r in runs if r.status == "completed" and r.summary.get(metric) is not None]


def table_rows(groups: dict[tuple, list[RunFolder]], keys: list[str]) -> list[dict]:
    """One row per group: its key values, then ``runs``, ``seeds``, accuracy statistics
    (percent) and mean train time and throughput over the group's completed runs, and
    ``status`` counts."""
    rows = []
    for values, runs in groups.items():
        row = dict(zip(keys, values))
        row["runs"] = len(runs)
        row["seeds"] = ",".join(str(s) for s in sorted({r.get("seed", "?") for r in runs}, key=_order))
        for metric in ACCURACIES:
            row[f"{metric}_pct"], row[f"{metric}_pct_std"] = mean_std(completed_values(runs, metric, 100))
        for metric in ("train_time_s", "img_per_s"):
            row[metric] = mean_std(completed_values(runs, metric))[0]
        row["status"] = ", ".join(f"{s}: {n}" for s, n in sorted(Counter(r.status for r in runs).items()))
        rows.append(row)
    return rows


def label(value) -> str:
    """A key's value for a legend or a table: floats rounded to 4 significant digits
    (0.30000000000000004 -> 0.3)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt(value: float, std: float | None = None) -> str:
    if math.isnan(value):
        return ""
    return f"{value:.2f}" if std is None or math.isnan(std) else f"{value:.2f} ± {std:.2f}"


def write_markdown(path: Path, rows: list[dict], keys: list[str]) -> None:
    header = [*keys, "runs", "seeds", *ACCURACIES.values(), "train time (s)", "img/s", "status"]
    lines = [
        "Accuracy (%), train time and throughput: mean ± sample std over the completed runs of each group; "
        f"a run that diverged or stalled (best validation accuracy within {STALLED_WITHIN_POINTS:g} point of "
        "chance) is counted under status and is in no mean. "
        "'val-selected': the test accuracy of the checkpoint with the best validation accuracy (the test set "
        "takes no part in the choice); validation is held out of the training set.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [*(label(row[k]) for k in keys), str(row["runs"]), row["seeds"],
                 *(_fmt(row[f"{m}_pct"], row[f"{m}_pct_std"]) for m in ACCURACIES),
                 _fmt(row["train_time_s"]), _fmt(row["img_per_s"]), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def pivot_markdown(runs: list[RunFolder], by: str, x: str, metric: str = "selected_test_acc") -> str:
    """``metric`` in percent as a matrix, one row per value of ``by`` and one column per
    value of ``x``: mean ± sample std over the completed runs (n), or the statuses of a
    cell where no run completed."""
    groups = group_runs(runs, [by, x])
    xs = sorted({key[1] for key in groups}, key=_order)
    lines = [f"{ACCURACIES.get(metric, metric)}: mean ± sample std over the completed runs (n), by {by} and {x}.",
             "", "| " + " | ".join([by, *(f"{x} {label(v)}" for v in xs)]) + " |", "|" + "---|" * (len(xs) + 1)]
    for by_value in dict.fromkeys(key[0] for key in groups):
        cells = []
        for v in xs:
            group = groups.get((by_value, v), [])
            values = completed_values(group, metric, 100)
            others = ", ".join(f"{s}: {n}" for s, n in sorted(Counter(r.status for r in group).items())
                               if s != "completed")
            if values:
                cells.append(f"{_fmt(*mean_std(values))} ({len(values)}{'; ' + others if others else ''})")
            else:
                cells.append(", ".join(f"{s}: {n}" for s, n in sorted(Counter(r.status for r in group).items()))
                             or "not run")
        lines.append("| " + " | ".join([label(by_value), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows as they are, statistics with 2 decimals (empty where undefined)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _fmt(v) if k in STAT_COLUMNS else v for k, v in row.items()} for row in rows)


def _by_seed(runs: list[RunFolder], where: str) -> dict:
    """{seed: val-selected test accuracy in points} over the completed runs; two runs with
    one seed would be pooled unlike runs: a ConfigError says how to tell them apart."""
    values: dict = {}
    for run in runs:
        if run.status != "completed" or run.summary.get("selected_test_acc") is None:
            continue
        seed = run.get("seed", None)
        if seed in values:
            same = [str(r.path) for r in runs if r.get("seed", None) == seed]
            raise ConfigError(f"{where} has {len(same)} completed runs with seed {seed} ({', '.join(same[:3])}): "
                              "a paired comparison needs one run per seed. Group by a key that tells them apart "
                              "(e.g. --by choices.method) or pass only the runs to compare")
        values[seed] = 100 * run.summary["selected_test_acc"]
    return values


def baseline_comparisons(runs: list[RunFolder], by: str, x: str | None, baseline: str,
                         margin: float) -> tuple[list[stats.Comparison], list[str]]:
    """Every other ``by`` group against ``baseline`` at every ``x`` value (stats.py), and
    notes on the pairs that could not be compared."""
    keys = [by] if x is None else [by, x]
    groups = group_runs(runs, keys)
    names = sorted({label(k[0]) for k in groups})
    if baseline not in names:
        raise ConfigError(f"--baseline {baseline!r} is not a {by} of these runs; the {by} values are: "
                          f"{', '.join(names)}")
    comparisons, notes = [], []
    for x_value in sorted({k[1] if x else "" for k in groups}, key=_order):
        at = {label(k[0]): v for k, v in groups.items() if (k[1] if x else "") == x_value}
        where = f" at {x}={label(x_value)}" if x else ""
        base = _by_seed(at.get(baseline, []), f"{by}={baseline}{where}")
        for name, group in at.items():
            if name == baseline:
                continue
            test = _by_seed(group, f"{by}={name}{where}")
            if len(base) < 2 or len(test) < 2:
                notes.append(f"not compared: {name} vs {baseline}{where} ({len(test)} and {len(base)} completed "
                             "runs; a test needs 2 or more on each side)")
                continue
            comparisons.append(stats.Comparison(by, label(x_value), baseline, name, n_baseline=len(base),
                                                n_test=len(test), **stats.paired_or_welch(base, test)))
    if not comparisons:
        raise ConfigError("nothing to compare: " + "; ".join(notes or [f"only {baseline} has runs"]))
    return stats.judge(comparisons, margin), notes


def write_stats(out: Path, comparisons: list[stats.Comparison], notes: list[str], x: str | None,
                margin: float) -> list[Path]:
    with open(out / "stats.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=stats.COLUMNS)
        writer.writeheader()
        writer.writerows(stats.row(c) for c in comparisons)
    (out / "stats.md").write_text(stats.markdown(comparisons, x_key=x, margin=margin, notes=notes,
                                                 metric="The val-selected test accuracy"))
    return [out / "stats.md", out / "stats.csv"]


# ---------------------------------------------------------------------------- plotting

@dataclass(frozen=True)
class Panel:
    key: str           # record key on the y-axis
    label: str
    scale: float = 1.0  # multiplies the values (fractions -> percent)
    log: bool = False


CURVE_X = {"epoch": "epoch", "examples_seen": "examples seen", "wall_time_s": "wall time (s)"}
CURVE_PANELS = (Panel("val_acc", "validation accuracy (%)", 100), Panel("train_loss", "train loss", log=True))
SIGNAL_PROP_PANELS = (Panel("avg_sq_mean", "average squared channel mean", log=True),
                      Panel("avg_var", "average channel variance", log=True))


def _figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _colours(labels) -> dict[str, tuple]:
    """One colour per distinct label, in order of first appearance."""
    distinct = list(dict.fromkeys(labels))
    if len(distinct) <= 20:
        cmap = colormaps["tab10" if len(distinct) <= 10 else "tab20"]
        return {label: cmap(i) for i, label in enumerate(distinct)}
    cmap = colormaps["viridis"]
    return {label: cmap(i / (len(distinct) - 1)) for i, label in enumerate(distinct)}


LINE_STYLES = ("-", "--", ":", "-.")
#: Marks a run that diverged, stalled or failed, at its last logged point; such runs are in no mean.
FAILED_MARK = dict(marker="x", markersize=9, markeredgewidth=2, linestyle="none")


@dataclass
class Series:
    """The runs drawn as one line: one group's runs (mean with a min-max band) or one run."""
    label: str
    colour_key: str
    style: str
    runs: list[RunFolder]


def _points(run: RunFolder, x: str, panel: Panel) -> dict:
    return {r[x]: r[panel.key] * panel.scale for r in run.records
            if r.get(x) is not None and r.get(panel.key) is not None}


def _draw_series(ax, series: Series, x: str, panel: Panel, colour) -> None:
    """The mean over the series' completed runs at the x values they all share (a band
    from their min to max when there are several); a single point as a marker; a cross
    at the last point of each run that diverged or failed."""
    curves = [_points(r, x, panel) for r in series.runs if r.status not in FAILURES]
    curves = [c for c in curves if c]
    if curves:
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[v] for c in curves] for v in xs]
        ax.plot(xs, [statistics.fmean(y) for y in ys], color=colour, linestyle=series.style,
                marker="o" if len(xs) == 1 else None, label=series.label)
        if len(curves) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.15, linewidth=0)
    for run in series.runs:
        points = _points(run, x, panel)
        if run.status in FAILURES and points:
            last = max(points)
            ax.plot([last], [points[last]], color=colour, **FAILED_MARK)


def plain_log_ticks(ax) -> None:
    """Log-axis tick labels as numbers (0.5, 2, 3), not as 2x10^0; the ticks between
    powers of 10 labelled (at 2, 3 and 5) only where the axis spans under two decades."""
    def minor(v, _):
        low, high = ax.get_ylim()
        return f"{v:g}" if 0 < low and high < 100 * low and f"{v:.0e}"[0] in "235" else ""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _robust_log_limits(ax, values: list[float]) -> None:
    """A log axis that an explosion (a diverged run's 1e9 loss) does not stretch so far
    that every other curve lies flat: at most 10x above the 90th percentile."""
    ax.set_yscale("log")
    plain_log_ticks(ax)
    finite = sorted(v for v in values if math.isfinite(v) and v > 0)
    if finite:
        top = min(finite[-1], 10 * finite[int(0.9 * (len(finite) - 1))])
        ax.set_ylim(finite[0] / 1.5, top * 1.5)


def series_figure(series: list[Series], x: str, panels, *, xlabel: str, legend_title: str, title: str) -> Figure:
    fig, axes = _figure(len(panels))
    colours = _colours(s.colour_key for s in series)
    for ax, panel in zip(axes, panels):
        for s in series:
            _draw_series(ax, s, x, panel, colours[s.colour_key])
        if panel.log:
            _robust_log_limits(ax, [v for s in series for r in s.runs for v in _points(r, x, panel).values()])
        ax.set(xlabel=xlabel, ylabel=panel.label)
        ax.grid(alpha=0.3)
    if any(r.status in FAILURES for s in series for r in s.runs):
        axes[-1].plot([], [], color="grey", label="x: diverged, stalled or failed (last point; in no mean)",
                      **FAILED_MARK)
    handles, labels = axes[-1].get_legend_handles_labels()
    if len(labels) > 12:  # many groups: below the panels, in columns, instead of over the curves
        fig.set_figheight(fig.get_figheight() + 0.16 * ((len(labels) - 1) // 4 + 1))
        fig.legend(handles, labels, title=legend_title, fontsize="x-small", loc="outside lower center", ncol=4)
    elif labels:  # (runs without curve records, e.g. summaries alone, draw nothing to name)
        axes[-1].legend(title=legend_title, fontsize="small")
    fig.suptitle(title)
    return fig


def curve_figures(runs: list[RunFolder], by: str, style: str | None = None, seeds: str = "mean") -> dict[str, Figure]:
    """Validation accuracy and train loss against each of CURVE_X: {x key: Figure}. One
    colour per value of ``by``, one line style per value of ``style`` (e.g. the --x key);
    ``seeds='mean'``: one line per (by, style) group, the mean over its completed runs with
    a min-max band; ``'all'``: one line per run. Wall time differs between runs, so it is
    always drawn per run."""
    keys = [by] if style is None else [by, style]
    groups = {k: [r for r in g if r.records] for k, g in group_runs(runs, keys).items()}
    styles = {v: LINE_STYLES[i % len(LINE_STYLES)] for i, v in enumerate(dict.fromkeys(k[-1] for k in groups))}
    figures = {}
    for x, xlabel in CURVE_X.items():
        series = []
        for key, group in groups.items():
            name = label(key[0]) + ("" if style is None else f", {style}={label(key[1])}")
            line = styles[key[-1]] if style is not None else "-"
            parts = [group] if seeds == "mean" and x != "wall_time_s" else [[r] for r in group]
            series += [Series(name, label(key[0]), line, part) for part in parts if part]
        n = sorted({len(g) for g in groups.values() if g})
        how = "one line per run" if seeds == "all" or x == "wall_time_s" else \
            "no runs" if not n else f"mean over {n[0] if n[0] == n[-1] else f'{n[0]}-{n[-1]}'} run(s) per line" + \
            (", band: min-max over them" if n[-1] > 1 else "")
        figures[x] = series_figure(series, x, CURVE_PANELS, xlabel=xlabel, legend_title=", ".join(keys),
                                   title=f"{what_was_trained(runs)}: validation accuracy and train loss against "
                                         f"{xlabel}\n({how})")
    return figures


def lines_figure(series: list[tuple[str, list[dict]]], x: str, panels, *, xlabel: str,
                 legend_title: str, title: str = "") -> Figure:
    """One line per (label, records) in every panel, ``x`` against each panel's key; lines
    with the same label share a colour and one legend entry."""
    fig, axes = _figure(len(panels))
    colours = _colours(name for name, _ in series)
    for ax, panel in zip(axes, panels):
        seen = set()
        for name, records in series:
            points = [(r[x], r[panel.key] * panel.scale) for r in records
                      if r.get(x) is not None and r.get(panel.key) is not None]
            xs, ys = zip(*points) if points else ((), ())
            ax.plot(xs, ys, color=colours[name], label="_nolegend_" if name in seen else name)
            seen.add(name)
        ax.set(xlabel=xlabel, ylabel=panel.label, yscale="log" if panel.log else "linear")
        if panel.log:
            plain_log_ticks(ax)
        ax.grid(alpha=0.3)
    axes[-1].legend(title=legend_title, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _sweep_lines(ax, groups: dict, position: dict, metric: str, colours: dict, final: bool) -> None:
    """One line per value of ``by``: the mean over completed runs (solid, with a min-max
    band, for the val-selected model; dashed for the ``final`` model), a gap where none
    completed, and (once, with the solid lines) a cross at the bottom of every point where
    a run diverged or failed."""
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    for by_value in dict.fromkeys(key[0] for key in groups):
        cells = [(position[key[1]], group) for key, group in groups.items() if key[0] == by_value]
        values = [completed_values(group, metric, 100) for _, group in cells]
        stats = [(statistics.fmean(a), min(a), max(a)) if a else (math.nan,) * 3 for a in values]
        mean, low, high = zip(*stats)
        pos = [p for p, _ in cells]
        colour = colours[label(by_value)]
        if final:
            ax.plot(pos, mean, marker=".", color=colour, linestyle="--", linewidth=1, label="_nolegend_")
            continue
        ax.plot(pos, mean, marker="o", color=colour, label=label(by_value))
        ax.fill_between(pos, low, high, color=colour, alpha=0.2, linewidth=0)
        failed = [p for p, group in cells if any(r.status in FAILURES for r in group)]
        ax.plot(failed, [0.03] * len(failed), color=colour, transform=bottom, **FAILED_MARK)


def sweep_figure(runs: list[RunFolder], by: str, x: str) -> Figure:
    """Test accuracy against ``x``, one colour per value of ``by``: the val-selected model
    solid (see ``_sweep_lines``), the final model dashed, on one axis so the two read
    against each other. Log x-axis for positive numbers spanning more than 10x;
    categories for non-numbers. The title says what was trained and how many completed
    runs each point averages."""
    groups = group_runs(runs, [by, x])
    xs = sorted({key[1] for key in groups}, key=_order)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    position = {v: (v if numeric else i) for i, v in enumerate(xs)}
    colours = _colours(label(key[0]) for key in groups)
    fig, (ax,) = _figure(1)
    fig.set_figwidth(7)
    for final in (False, True):
        _sweep_lines(ax, groups, position, "final_test_acc" if final else "selected_test_acc", colours, final)
    if numeric and xs[0] > 0 and xs[-1] > 10 * xs[0]:
        ax.set_xscale("log")
    # Ticks at the swept values: a log axis would otherwise label only powers of 10.
    ax.set_xticks(list(position.values()), [label(v) for v in xs])
    ax.minorticks_off()
    ax.set(xlabel=x, ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.plot([], [], color="grey", label="solid: val-selected model")
    ax.plot([], [], color="grey", linestyle="--", linewidth=1, label="dashed: final model")
    if any(r.status in FAILURES for r in runs):
        ax.plot([], [], color="grey", label="x: a run diverged, stalled or failed (in no mean)", **FAILED_MARK)
    ax.legend(title=by, fontsize="small")
    counts = sorted({len(completed_values(g, "selected_test_acc")) for g in groups.values()} - {0})
    n = "no completed run" if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    band = ", band: min-max over them" if counts and counts[-1] > 1 else ""
    fig.suptitle(f"{what_was_trained(runs)}: test accuracy against {x}\nmean over {n} completed seed(s) per "
                 f"point{band}")
    return fig


def what_was_trained(runs: list[RunFolder]) -> str:
    """``resnet20 on fashion_mnist`` (every value where the runs differ, in natural order;
    a count beyond three, which would not fit a title), for titles."""
    def values(key):
        found = sorted({v for r in runs if (v := r.get(key, None)) is not None}, key=_order)
        return f"{len(found)} {key}s" if len(found) > 3 else "/".join(map(label, found)) or "?"
    return f"{values('model')} on {values('dataset')}"


def signal_prop_figure(series: list[tuple[str, list[dict]]], *, legend_title: str = "method",
                       title: str = "signal propagation") -> Figure:
    """Average squared channel mean and average channel variance against the block index
    (records of ``signal_prop.signal_propagation``), log y-axes; one line per (label,
    records), a colour per label."""
    return lines_figure(series, "block", SIGNAL_PROP_PANELS, xlabel="residual block (0: stem output)",
                        legend_title=legend_title, title=title)


def _records_at(run: RunFolder, epoch: int) -> list[dict]:
    # A resumed run may have recorded an epoch twice: the later records win.
    by_block = {rec["block"]: rec for rec in run.signal_prop if rec["epoch"] == epoch}
    return [by_block[b] for b in sorted(by_block)]


def signal_prop_series(runs: list[RunFolder], by: str,
                       epoch: int) -> tuple[list[tuple[str, list[dict]]], list[RunFolder]]:
    """(label, records at ``epoch``) for each run that recorded that epoch, labelled by its
    value of ``by``; and the runs with signal propagation records but none at ``epoch``."""
    recorded = [r for r in runs if r.signal_prop]
    if not recorded:
        raise ConfigError(f"none of the {len(runs)} runs has {SIGNAL_PROP}: train with trainer.signal_prop=true, "
                          "or run scripts/signal_prop_init.py for networks at init")
    present = [r for r in recorded if _records_at(r, epoch)]
    if not present:
        epochs = sorted({rec["epoch"] for r in recorded for rec in r.signal_prop})
        raise ConfigError(f"no run has signal propagation records at --epoch {epoch}; "
                          f"recorded epochs: {', '.join(map(str, epochs))}")
    series = [(str(values[0]), _records_at(r, epoch)) for values, group in group_runs(present, [by]).items()
              for r in group]
    return series, [r for r in recorded if not _records_at(r, epoch)]


# ---------------------------------------------------------------------------- command line

def _filename(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)


DPI = 120


def compare(paths, out: Path, by: str, x: str | None, seeds: str = "mean", baseline: str | None = None,
            margin: float = 0.5, allow_mixed: bool = False, same: dict[str, str] | None = None) -> list[Path]:
    """Curves, table, (with ``x``) the sweep figure and (with ``baseline``) the statistics
    into ``out``; returns the files. Unlike runs are refused unless ``allow_mixed``; ``same``
    relabels values of ``by`` (relabel)."""
    runs = find_runs(paths)
    relabel(runs, by, same or {})
    keys = [by] if x is None else [by, x]
    groups = group_runs(runs, keys)
    if not allow_mixed:
        check_like_runs(runs, groups, keys)
    note_one_point(runs, x)
    rows = table_rows(groups, keys)
    tested = baseline_comparisons(runs, by, x, baseline, margin) if baseline is not None else None
    figures = {out / f"curves_{name}.png": fig for name, fig in curve_figures(runs, by, x, seeds).items()}
    if x is not None:
        figures[out / f"sweep_{_filename(x)}.png"] = sweep_figure(runs, by, x)
    out.mkdir(parents=True, exist_ok=True)
    for path, fig in figures.items():
        fig.savefig(path, dpi=DPI)
    write_markdown(out / "table.md", rows, keys)
    write_csv(out / "table.csv", rows)
    tables = [out / "table.md", out / "table.csv"]
    if x is not None:
        tables.append(out / f"table_{_filename(x)}.md")
        tables[-1].write_text(pivot_markdown(runs, by, x))
    if tested is not None:
        tables += write_stats(out, *tested, x, margin)
    return [*figures, *tables]


def compare_signal_prop(paths, out: Path, by: str, epoch: int) -> list[Path]:
    """The signal propagation figure at ``epoch`` into ``out``; returns the file."""
    runs = find_runs(paths)
    series, skipped = signal_prop_series(runs, by, epoch)
    for run in skipped:
        print(f"msr-compare: note: {run.path} has no signal propagation records at epoch {epoch}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"signal_prop_epoch{epoch}.png"
    when = " (at init)" if epoch == 0 else ""
    title = f"{what_was_trained(runs)}: signal propagation at epoch {epoch}{when}, one line per run"
    signal_prop_figure(series, legend_title=by, title=title).savefig(path, dpi=DPI)
    return [path]


def _checked_args(p: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict[str, str]]:
    """The parsed arguments and the --same relabels; a combination that cannot work exits 2, naming it."""
    args = p.parse_args(argv)
    given = [name for name, value in (("--x", args.x), ("--baseline", args.baseline), ("--same", args.same))
             if value not in (None, [])]
    if args.signal_prop and given:
        p.error(f"{', '.join(given)}: for curves and tables only, not for --signal-prop")
    if args.epoch is not None and not args.signal_prop:
        p.error("--epoch applies to --signal-prop only")
    if not (math.isfinite(args.margin) and args.margin >= 0):
        p.error(f"--margin {args.margin:g}: the equivalence margin is a number of accuracy points >= 0, e.g. 0.5")
    if args.x is not None and args.x == args.by:
        p.error(f"--x and --by are both {args.by!r}; group by another key, e.g. --by method --x {args.x}")
    pairs = [pair.partition("=") for pair in args.same]
    for (old, sep, new), pair in zip(pairs, args.same):
        if not (sep and old and new):
            p.error(f"--same {pair}: it is OLD=NEW, two values of --by, e.g. --same msr=msr_paper")
    same = {old: new for old, _, new in pairs}
    if len(same) != len(args.same):
        p.error(f"--same {' '.join(args.same)}: a value is relabeled twice; give each OLD once")
    if any(old == new for old, new in same.items()):
        p.error(f"--same {' '.join(args.same)}: OLD and NEW are the same value; leave it out")
    chained = sorted(set(same) & set(same.values()))
    if chained:
        p.error(f"--same {' '.join(args.same)}: {', '.join(chained)} is both an OLD and a NEW; relabel each OLD "
                "to the value it ends as (a=c b=c, not a=b b=c)")
    return args, same


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="msr-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, or folders with run folders below them")
    p.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default: compare/)")
    p.add_argument("--by", default="method", metavar="KEY",
                   help="colour and group by this summary field or dotted config path (default: method)")
    p.add_argument("--x", metavar="KEY", help="also plot the val-selected and the final model's test accuracy "
                   "against this key, e.g. batch_size")
    p.add_argument("--seeds", choices=("mean", "all"), default="mean",
                   help="curves: the mean over each group's runs with a min-max band (default), or every run")
    p.add_argument("--baseline", metavar="GROUP", help="compare every other --by group with this one at each "
                   "--x value: paired t-tests over seeds, 95%% CIs, Holm-adjusted p and a verdict (stats.md, stats.csv)")
    p.add_argument("--margin", type=float, default=0.5, metavar="POINTS",
                   help="with --baseline: the equivalence margin in accuracy points (default 0.5)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="pool runs that differ in model, dataset, batch size, epochs, optimizer, lr, scheduler or "
                   "method within a group (refused by default)")
    p.add_argument("--same", action="append", default=[], metavar="OLD=NEW",
                   help="runs whose --by value is OLD count as NEW, e.g. --same msr=msr_paper for a config and "
                   "a preset that composes to the same settings (repeatable)")
    p.add_argument("--signal-prop", action="store_true",
                   help="plot the signal propagation records (signal_prop.jsonl) instead")
    p.add_argument("--epoch", type=int, metavar="N", help="with --signal-prop: the epoch to plot (default 0, init)")
    args, same = _checked_args(p, argv)
    try:
        if args.signal_prop:
            written = compare_signal_prop(args.paths, args.out, args.by, args.epoch or 0)
        else:
            written = compare(args.paths, args.out, args.by, args.x, args.seeds, args.baseline, args.margin,
                              args.allow_mixed, same)
    except ConfigError as e:
        print(f"msr-compare: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.signal_prop:
        print((args.out / "table.md").read_text())
    if args.baseline is not None:
        print((args.out / "stats.md").read_text())
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
