"""A refused launch changes no run: Hydra's config copies become a run's
``.hydra/`` only once the launch passes every check (msr_train.launch), and a refused
launch into a new folder leaves no folder behind."""

import json
import subprocess
import sys

import pytest

from msr_train.run_lock import RunLock

pytestmark = pytest.mark.slow  # CLI processes

QUICK = ["debug=quick", "trainer.max_steps=2", "trainer.cpu_threads=1", "trainer.progress_bar=false"]
TARGET = ["dataset.val_size=64", "trainer.eval_every=1"]


def msr_train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "msr_train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def files_under(folder, but=()):
    return sorted(name for p in folder.rglob("*") if p.is_file() and (name := str(p.relative_to(folder))) not in but)


def test_a_launch_refused_before_any_work_leaves_no_folder(tmp_path):
    res = msr_train(*QUICK, "batch_size=100000", cwd=tmp_path)  # the default, timestamped run dir
    assert res.returncode == 2 and "fewer than one batch (batch_size=100000)" in res.stderr
    assert files_under(tmp_path) == []
    res = msr_train(*QUICK, "dataset.val_size=1000000", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("refusal", ["other settings", "resume=never", "in use"])
def test_a_refused_launch_on_a_run_leaves_its_record_as_it_was(tmp_path, refusal):
    run = tmp_path / "run"
    assert msr_train(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    # run.lock names the last process that took the lock (a refused resume takes it to read
    # the checkpoints): not part of the run's record.
    before = {name: (run / name).read_bytes() for name in files_under(run, but=["run.lock"])}
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"} <= set(before)
    if refusal == "in use":  # a second process while the run trains
        with RunLock(run):
            res = msr_train(*QUICK, f"hydra.run.dir={run}", "trainer.log_every=7", cwd=tmp_path)
        words = "is in use by another msr-train run"
    else:
        extra = "seed=5" if refusal == "other settings" else "trainer.resume=never"
        res = msr_train(*QUICK, f"hydra.run.dir={run}", extra, cwd=tmp_path)
        words = "belongs to a run with other settings" if extra == "seed=5" else "already holds a run"
    assert res.returncode == 2 and words in res.stderr, res.stderr
    after = {name: (run / name).read_bytes() for name in files_under(run, but=["run.lock"])}
    assert after == before  # and nothing staged is left


def test_an_accepted_resume_records_its_own_launch(tmp_path):
    run = tmp_path / "run"
    # Stopped at a validation target; a higher one continues it (a setting that may change).
    res = msr_train(*QUICK, *TARGET, "trainer.stop_at_val_acc=0.01", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0 and json.loads((run / "summary.json").read_text())["status"] == "reached_target"
    res = msr_train(*QUICK, *TARGET, "trainer.stop_at_val_acc=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "trainer.stop_at_val_acc=1\n" in (run / ".hydra" / "overrides.yaml").read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".hydra")) == [".hydra"]
    # The run dir's log holds what the console showed, both launches of it, with times.
    log = (run / "cli.log").read_text()
    assert log.count(f"] msr-train: run dir {run}\n") == 2 and "] msr-train: reached_target at step" in log
    assert "  step      precision 32, 1 micro-batch(es) per step" in log and log.count("] msr-train: completed") == 1


def test_an_empty_run_dir_is_refused(tmp_path):
    res = msr_train(*QUICK, "hydra.run.dir=", cwd=tmp_path)
    assert res.returncode == 2 and "hydra.run.dir is empty" in res.stderr and "Traceback" not in res.stderr
    assert files_under(tmp_path) == []
