"""Nothing lost: kills, signals, torn checkpoints, divergence, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from msr_train.checkpoint import find_checkpoint, save_checkpoint
from helpers import RUN, cli, metrics, run, wait_for_checkpoint
from msr_train.errors import ConfigError

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

def weights(run_dir):
    """The model's weights and their average, flattened into one dict."""
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {**saved["model"], **{f"ema.{k}": v for k, v in saved["ema"].items()}}


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ba, bb = (torch.load(d / "checkpoints" / "best.pt", weights_only=True) for d in (a, b))
    assert ba["step"] == bb["step"] and all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    keys = ("best_val_acc", "best_val_step", "selected_test_acc", "final_test_acc")
    assert [sa[k] for k in keys] == [sb[k] for k in keys]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    res = run(*RUN, f"hydra.run.dir={d / 'run'}", cwd=d)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in metrics(d / "run")] == [5, 10, 15, 16, 20, 25, 30, 32]
    return d / "run"


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    cmd, kw = cli(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, run_dir, min_step=16)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Resuming" in res.stderr
    assert_same_run(run_dir, uninterrupted)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_at_once_and_the_rerun_is_bit_identical(tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    cmd, kw = cli(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run_dir, min_step=5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and sig.name in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    saved = find_checkpoint(run_dir / "checkpoints")[0]
    assert saved["step"] == summary["step"]  # saved where it stopped
    if sig == signal.SIGUSR1:  # the layout of older checkpoints (the window's sums in the loop state) resumes too
        window = saved.pop("window")
        saved["loop"].update({f"window_{k}": v for k, v in window.items()})
        (run_dir / "checkpoints" / "prev.pt").unlink(missing_ok=True)
        save_checkpoint(run_dir / "checkpoints", saved)
    res = run(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_same_run(run_dir, uninterrupted)


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # The third write of last.pt (step 15) is torn (cut to half its length) and the process
    # killed before the file is synced and renamed into place.
    script = textwrap.dedent(f"""
        import os, signal, sys
        calls, real_fsync = [0], os.fsync
        def dying_fsync(fd):
            if ".last.pt." in os.readlink(f"/proc/self/fd/{{fd}}"):
                calls[0] += 1
                if calls[0] == 3:
                    os.ftruncate(fd, os.fstat(fd).st_size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)
        os.fsync = dying_fsync
        sys.argv = ["msr-train", *{RUN + [f"hydra.run.dir={run_dir}"]!r}]
        from msr_train.cli import main
        main()
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp"))  # the torn write is there...
    state, path = find_checkpoint(run_dir / "checkpoints")
    assert state["step"] == 10 and path.name == "last.pt"  # ...but last.pt is the previous one, intact
    res = run(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0 and "Resuming" in res.stderr and "at step 10" in res.stderr
    assert_same_run(run_dir, uninterrupted)


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    save_checkpoint(tmp_path, {"step": 1})
    save_checkpoint(tmp_path, {"step": 2})
    assert find_checkpoint(tmp_path)[0]["step"] == 2
    full = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(full[: len(full) // 2])  # truncated
    state, path = find_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "prev.pt"
    assert "last.pt is unusable" in (err := capsys.readouterr().err) and err.rstrip().endswith("trying prev.pt")
    (tmp_path / "prev.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        find_checkpoint(tmp_path)
    # prev.pt's own failure does not promise a previous one.
    last_line = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert "prev.pt is unusable (prev.pt: UnpicklingError: not a file torch.save wrote, or damaged (" in last_line
    assert last_line.endswith("no older checkpoint to try") and "weights_only" not in last_line


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_cannot_carry_code(tmp_path, capsys):
    torch.save({"step": 1, "evil": Payload()}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        find_checkpoint(tmp_path)
    # Said as what it is, without torch's advice to load it with weights_only=False.
    err = capsys.readouterr().err
    assert "it holds objects other than tensors and plain data (loading it would run code; refused)" in err
    assert "weights_only" not in err


def test_resuming_with_other_settings_or_never_is_refused(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    res = run(*RUN, "trainer.max_steps=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run(*RUN, "trainer.max_steps=5", "method.noise_delta=0.2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2 and "method.noise_delta: 0.1 -> 0.2" in res.stderr
    res = run(*RUN, "trainer.max_steps=5", "trainer.resume=never", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2 and "trainer.resume=auto" in res.stderr


def test_divergence_stops_one_run_and_a_sweep_goes_on(tmp_path):
    res = run("-m", "debug=quick", "dataset.image_size=12", "method=none", "epochs=1", "trainer.log_every=1",
              "optimizer.lr=1e6,0.05", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summaries = {s["lr"]: s for s in (json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json"))}
    assert summaries[1e6]["status"] == "diverged" and summaries[1e6]["step"] >= 1
    assert summaries[0.05]["status"] == "completed" and summaries[0.05]["final_test_acc"] is not None
    assert "diverged at step" in res.stderr
