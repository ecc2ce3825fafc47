"""Nothing lost: the best model's files, metrics.jsonl's damaged
lines, a second fault during a recovery, and what the messages say. Each reproduced
first (against an uninterrupted reference run), then fixed."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import make_cfg
from helpers import cli, descendants, process_alive
from msr_train.checkpoint import find_checkpoint
from msr_train.errors import describe
from msr_train.run_lock import RunLock
from msr_train.safe_files import read_jsonl, size_text, write_fix
from msr_train.train import train

pytestmark = pytest.mark.slow  # real runs, killed processes: deselect with -m 'not slow'

# 6 steps, an evaluation and a checkpoint every 2 (best.pt at each improvement).
RUN = ["debug=quick", "dataset.synthetic_train=192", "dataset.val_size=64", "dataset.image_size=8",
       "trainer.eval_every=2", "trainer.max_steps=6", "trainer.cpu_threads=1", "trainer.progress_bar=false"]


def killed_at_write(run_dir, n: int, after: str | None = None) -> int:
    """Run the CLI into ``run_dir`` and SIGKILL it just before its ``n``-th ``os.replace``
    (each file write's rename, and last.pt's rotation to prev.pt), or with ``after``, at
    the first one after the ``n``-th rename of a file of that name; returns the exit
    code (-9 when killed)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        real, done = os.replace, []
        def replace(src, dst, **kw):
            if (done.count({after!r}) == {n}) if {after!r} else len(done) + 1 == {n}:
                os.kill(os.getpid(), signal.SIGKILL)
            done.append(os.path.basename(dst))
            return real(src, dst, **kw)
        os.replace = replace
        sys.argv = ["msr-train", *{RUN + [f"hydra.run.dir={run_dir}"]!r}]
        from msr_train.cli import main
        main()
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, -9), res.stderr[-2000:]
    return res.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (summary, final weights, metrics rows)."""
    folder = tmp_path_factory.mktemp("reference")
    summary = train(make_cfg(*RUN), folder)
    return summary, final_weights(folder), steps_and_accuracies(folder)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed at its first write after the step-4 checkpoint: last.pt at step 4,
    prev.pt at step 2."""
    folder = tmp_path_factory.mktemp("killed") / "run"
    assert killed_at_write(folder, 2, after="last.pt") == -9
    steps = [torch.load(folder / "checkpoints" / name, weights_only=True)["step"] for name in ("last.pt", "prev.pt")]
    assert steps == [4, 2]
    return folder


def final_weights(folder):
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


def steps_and_accuracies(folder):
    return [(r["step"], r["val_acc"], r["train_loss"]) for r in read_jsonl(folder / "metrics.jsonl")]


def assert_same_as_reference(folder, reference):
    summary, weights, rows = reference
    resumed = json.loads((folder / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["step"] == summary["step"]
    for key in ("best_val_acc", "best_val_step", "selected_test_acc", "final_test_acc"):
        assert resumed[key] == summary[key], key
    assert all(torch.equal(weights[k], v) for k, v in final_weights(folder).items())
    assert steps_and_accuracies(folder) == rows
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == summary["best_val_step"] and best["val_acc"] == summary["best_val_acc"]


def copy(folder, to):
    shutil.copytree(folder, to)
    return to


CODE_PICKLE = b"cos\nsystem\n(S'echo pwned > /tmp/msr-train-pwned'\ntR."


@pytest.mark.parametrize("damage", ["torn", "code", "both junk"])
def test_a_damaged_best_pt_is_rewritten_from_the_checkpoint_and_the_run_resumes(tmp_path, killed, reference,
                                                                                 damage, capfd):
    run = copy(killed, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    if damage == "torn":
        best.write_bytes(best.read_bytes()[:1000])
    elif damage == "code":
        best.write_bytes(CODE_PICKLE)
    else:
        best.write_bytes(b"junk")
        (run / "checkpoints" / "best_prev.pt").write_bytes(b"junk")
    train(make_cfg(*RUN), run)
    assert "Resuming" in capfd.readouterr().err
    assert_same_as_reference(run, reference)


@pytest.mark.parametrize("damage", ["torn", "a folder"])
def test_an_unreadable_last_pt_is_set_aside_and_never_rotated_over_prev_pt(tmp_path, killed, reference, damage,
                                                                           capfd):
    run = copy(killed, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    if damage == "torn":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.unlink()
        last.mkdir()
    train(make_cfg(*RUN), run)
    err = capfd.readouterr().err
    assert "kept as last.pt.damaged" in err and "(from prev.pt)" in err
    assert (run / "checkpoints" / "last.pt.damaged").exists()
    assert torch.load(run / "checkpoints" / "prev.pt", weights_only=True)["step"] == 4  # a good one
    assert_same_as_reference(run, reference)


def recovery(killed, tmp_path):
    """The killed run with a torn last.pt: it must recover from prev.pt (step 2)."""
    run = copy(killed, tmp_path)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    return run


def test_a_kill_at_any_write_of_a_recovery_leaves_a_run_that_resumes(tmp_path, killed, reference):
    for n in range(1, 40):
        run = recovery(killed, tmp_path / f"kill-{n}")
        if killed_at_write(run, n) == 0:  # the recovery had fewer writes: every one was tried
            assert n > 4
            break
        train(make_cfg(*RUN), run)
        assert_same_as_reference(run, reference)
    else:
        raise AssertionError("the recovery never ended")


@pytest.mark.parametrize("first,second", [(1, 1), (1, 2), (2, 1), (3, 3)])
def test_two_kills_in_a_row_during_a_recovery_leave_a_run_that_resumes(tmp_path, killed, reference, first,
                                                                       second):
    run = recovery(killed, tmp_path / "run")
    assert killed_at_write(run, first) == killed_at_write(run, second) == -9
    train(make_cfg(*RUN), run)
    assert_same_as_reference(run, reference)


def test_damaged_lines_in_metrics_jsonl_are_set_aside_and_the_rows_after_them_kept(tmp_path, killed, reference,
                                                                                   capfd):
    run = copy(killed, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]) + b"\xff\xfe\n")
    train(make_cfg(*RUN), run)
    assert "2 damaged lines (line 2, " in capfd.readouterr().err
    assert (run / "metrics.jsonl.damaged").read_bytes() == b"garbage\n\xff\xfe\n"
    assert_same_as_reference(run, reference)


def test_reading_json_lines_skips_only_the_damaged_ones(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n[1, 2]\n{"step": 2}\nnot json\n\xff\n\n{"step": 3}\n{"step": 4, "tor')
    damaged = []
    assert read_jsonl(path, damaged) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert [n for n, _ in damaged] == [2, 4, 5, 8]


def test_a_failed_write_names_its_own_fix_and_free_space_reads_in_fitting_units():
    assert [size_text(n) for n in (512, 393 * 2**10, 12 * 2**20, 62 * 2**30)] == [
        "512 bytes", "393 KB", "12 MB", "62 GB"]
    assert write_fix(OSError(errno.ENOSPC, "full")) == "free some space"
    assert "read-only" in write_fix(OSError(errno.EROFS, "ro")) and "space" not in write_fix(OSError(errno.EISDIR, "d"))


SWEEP = ["debug=quick", "dataset.synthetic_train=320", "dataset.val_size=64", "dataset.image_size=16", "epochs=60",
         "trainer.eval_every=10", "trainer.cpu_threads=1", "trainer.progress_bar=false", "method=bn,msr",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.subdir=${hydra.job.num}"]


def test_a_killed_joblib_sweep_stops_its_workers_and_a_re_run_resumes_then_skips_them(tmp_path):
    sweep = tmp_path / "sweep"
    cmd, kw = cli("-m", *SWEEP, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    popen_kw = {k: v for k, v in kw.items() if k not in ("timeout", "capture_output")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kw)
    jobs = [sweep / "0", sweep / "1"]
    deadline = time.time() + 120
    while not all((job / "checkpoints" / "last.pt").exists() for job in jobs):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.1)
    workers = descendants(proc.pid)
    assert workers, "the sweep has no worker processes"
    proc.kill()  # SIGKILL: the sweep's process cannot tell its workers
    proc.wait()
    deadline = time.time() + 30
    while not all((job / "summary.json").exists() for job in jobs):
        assert time.time() < deadline, "the workers went on training after the sweep was killed"
        time.sleep(0.2)
    assert [json.loads((job / "summary.json").read_text())["status"] for job in jobs] == ["interrupted"] * 2
    deadline = time.time() + 10  # then every process the sweep started exits (none idles as an orphan)
    while left := {pid for pid in workers if process_alive(pid)}:
        assert time.time() < deadline, f"processes of the killed sweep still run: {sorted(left)}"
        time.sleep(0.2)
    for job in jobs:  # and they let go of their runs
        with RunLock(job):
            pass
    again = subprocess.run(cmd, **kw)
    assert again.returncode == 0, again.stderr[-3000:]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["status"] for s in summaries] == ["completed"] * 2
    metrics = [(job / "metrics.jsonl").read_bytes() for job in jobs]
    third = subprocess.run(cmd, **kw)
    assert third.returncode == 0 and third.stderr.count("has already finished (completed") == 2
    assert [(job / "metrics.jsonl").read_bytes() for job in jobs] == metrics  # nothing tested or logged again
    assert [json.loads((job / "summary.json").read_text()) for job in jobs] == summaries


def entry(*args, patch: str = "", cwd):
    """The msr-train console script's code (msr_train.entry), after ``patch``."""
    script = textwrap.dedent(patch) + "\nfrom msr_train.entry import msr_train\nmsr_train()\n"
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_it_starts_ends_it_cleanly(tmp_path, sig):
    proc = entry(*RUN, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    time.sleep(0.5)  # importing Hydra and torch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert f"msr-train: stopped by {sig.name}" in err


def test_a_signal_during_the_final_test_waits_for_the_summary(tmp_path):
    patch = """
        import os, signal
        from msr_train import train
        select_and_test = train.Run.select_and_test
        def signalled(self, record):
            os.kill(os.getpid(), signal.SIGTERM)
            return select_and_test(self, record)
        train.Run.select_and_test = signalled
    """
    proc = entry(*RUN, f"hydra.run.dir={tmp_path / 'run'}", patch=patch, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["selected_test_acc"] is not None


def test_a_second_ctrl_c_stops_at_once_without_a_traceback_and_says_where_it_stood(tmp_path):
    run = tmp_path / "run"
    long_run = [o for o in RUN if not o.startswith(("trainer.max_steps=", "trainer.eval_every="))]
    proc = entry(*long_run, "epochs=1000", "trainer.eval_every=4", f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    state, path = find_checkpoint(run / "checkpoints")  # what a resumed run continues from
    assert path.name == "last.pt" and state["step"] > 0


def test_temp_files_of_interrupted_writes_are_removed_on_the_next_start(tmp_path, killed):
    run = copy(killed, tmp_path / "run")
    for name in (".summary.json.x1.tmp", ".metrics.jsonl.x2.tmp", "checkpoints/.last.pt.x3.tmp"):
        (run / name).write_bytes(b"")
    train(make_cfg(*RUN), run)
    assert not list(run.glob(".*.tmp")) and not list(run.glob("checkpoints/.*.tmp"))


def test_an_output_dir_that_takes_no_files_is_refused_before_hydra_logs_into_it(tmp_path):
    patch = """
        import errno, tempfile
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        tempfile.TemporaryFile = read_only
    """
    proc = entry(*RUN, f"hydra.run.dir={tmp_path / 'run'}", patch=patch, cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert f"the output dir {tmp_path / 'run'} cannot be created or written to (Read-only file system)" in err


def test_a_background_thread_that_fails_is_one_line(tmp_path):
    # As TensorBoard's writer thread fails in a folder gone read-only: no thread traceback.
    patch = """
        import threading
        from msr_train import cli
        main = cli.main
        def with_a_failing_thread():
            thread = threading.Thread(target=lambda: open("/nonexistent/events", "w"), name="writer")
            thread.start()
            thread.join()
            main()
        cli.main = with_a_failing_thread
    """
    proc = entry(*RUN, f"hydra.run.dir={tmp_path / 'run'}", patch=patch, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err
    assert "msr-train: warning: a background thread (writer) failed: FileNotFoundError: [Errno 2]" in err


def test_an_error_in_one_line_keeps_the_reason_after_a_colon():
    # torchvision's offline MNIST error: the reason is on the lines after the first.
    error = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://host/t.gz, got:\n"
                         "<urlopen error [Errno -3] Temporary failure in name resolution>\n")
    assert describe(error) == ("RuntimeError: Error downloading train-images-idx3-ubyte.gz: Tried https://host/t.gz, "
                               "got: <urlopen error [Errno -3] Temporary failure in name resolution>")
    assert describe(ValueError("one line\nand more")) == "ValueError: one line"
