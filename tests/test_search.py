"""hparams_search=lr_optuna resumes: the study is rebuilt from the sweep dir, n_trials
counts all its trials, finished trials are kept and not re-run, an unfinished trial is
queued first with its parameters."""

import json

import pytest
import yaml

from helpers import run
from hydra_plugins.msr_train.search import trials_in

pytestmark = pytest.mark.slow  # Optuna sweeps of real (tiny) runs

SEARCH = ["-m", "hparams_search=lr_optuna", "debug=quick", "dataset.synthetic_train=128", "dataset.synthetic_test=64",
          "dataset.val_size=32", "batch_size=16", "trainer.max_steps=4", "trainer.cpu_threads=1"]


def finished_runs(sweep):
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/summary.json")}


def test_a_rerun_tops_the_study_up_and_keeps_the_finished_trials(tmp_path):
    sweep = tmp_path / "search"
    first = run(*SEARCH, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = finished_runs(sweep)
    assert len(before) == 2
    second = run(*SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = finished_runs(sweep)
    assert len(after) == 4 and all(after[name] == t for name, t in before.items())  # kept, not re-run
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = [json.loads((sweep / name / "summary.json").read_text())["best_val_acc"] for name in after]
    assert result["best_value"] == max(scores)  # the best over all 4 trials, the first 2 included
    again = run(*SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 0 and finished_runs(sweep) == after  # nothing left to do


def test_the_sweep_dir_gives_finished_and_unfinished_trials(tmp_path):
    def trial(name, lr, summary):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}", "seed=0"]))
        if summary is not None:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    trial("a", 0.1, {"status": "completed", "best_val_acc": 0.8})
    trial("b", 2.5, {"status": "diverged", "best_val_acc": 0.3})
    trial("c", 0.02, None)  # killed mid-run
    trial("d", 0.03, {"status": "interrupted", "best_val_acc": 0.5})
    (tmp_path / "other" / ".hydra").mkdir(parents=True)
    (tmp_path / "other" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=1"]))  # not a trial
    finished, unfinished = trials_in(tmp_path, ["optimizer.lr"])
    assert finished == [({"optimizer.lr": 0.1}, 0.8), ({"optimizer.lr": 2.5}, 0.0)]  # diverged scores 0
    assert unfinished == [{"optimizer.lr": 0.02}, {"optimizer.lr": 0.03}]
