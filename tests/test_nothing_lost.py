"""The failure classes found by trying to break msr-train (a second process in the same
run dir, a finite loss explosion, resuming with settings that change the run, a
corrupt or ill-fitting checkpoint): each reproduced here, each fixed."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_cfg
from msr_train.checkpoint import find_checkpoint, save_checkpoint, write_checkpoint_file
from msr_train.errors import ConfigError, RunFailed
from msr_train.run_lock import LOCK_FILE, RunLock
from msr_train.train import train

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

RUN = ["debug=quick", "dataset.synthetic_train=192", "dataset.val_size=64", "dataset.image_size=8",
       "trainer.eval_every=2", "trainer.max_steps=6"]


def test_a_second_process_into_a_busy_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from msr_train.run_lock import RunLock
        with RunLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another msr-train run \\(pid {holder.pid} on "):
            train(make_cfg(*RUN), tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: its lock went with it, and the run proceeds.
    assert train(make_cfg(*RUN), tmp_path)["status"] == "completed"
    assert f"pid {holder.pid}" not in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    train(make_cfg(*RUN), tmp_path)
    with RunLock(tmp_path):  # would raise if the finished run still held it
        pass


def test_a_finite_loss_explosion_is_a_divergence_not_a_completed_run(tmp_path):
    # Chance level on 10 classes is ln 10 = 2.3: a factor of 0.5 makes the first reading
    # (about 2.3) an explosion, which is how a 5e12 loss looks to the check.
    summary = train(make_cfg(*RUN, "trainer.log_every=1", "trainer.divergence_factor=0.5"), tmp_path)
    assert summary["status"] == "diverged" and summary["step"] == 1
    assert "selected_test_acc" not in summary  # a diverged run is not tested as if it were a result


def test_the_cli_exits_1_on_a_finite_explosion(tmp_path):
    res = subprocess.run([sys.executable, "-m", "msr_train.cli", *RUN, "trainer.log_every=1",
                          "trainer.divergence_factor=0.5", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "trainer.divergence_factor" in res.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("change", ["trainer.max_steps=4", "trainer.accumulate=2", "trainer.eval_every=3",
                                    "trainer.precision=bf16"])
def test_resuming_with_a_setting_that_changes_the_run_is_refused(tmp_path, change):
    train(make_cfg(*RUN), tmp_path)
    with pytest.raises(ConfigError, match=change.split("=")[0]):
        train(make_cfg(*RUN, change), tmp_path)


def test_resuming_may_change_how_the_run_is_watched(tmp_path):
    train(make_cfg(*RUN, "trainer.max_steps=6"), tmp_path)
    summary = train(make_cfg(*RUN, "trainer.log_every=3", "trainer.progress_bar=true", "trainer.cpu_threads=1"),
                    tmp_path)
    assert summary["status"] == "completed" and summary["step"] == 6


def flip_a_weight_byte(path):
    """Flip one bit inside the first tensor stored in ``path`` (not in its zip metadata)."""
    state = torch.load(path, weights_only=True)
    tensor = next(v for v in state["model"].values() if v.numel() >= 64)
    raw, blob = path.read_bytes(), tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = raw.index(blob) + len(blob) // 2
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:])


def test_a_flipped_bit_in_last_pt_is_detected_and_the_run_resumes_from_prev_pt(tmp_path, capfd):
    ckpt = tmp_path / "checkpoints"
    train(make_cfg(*RUN, "trainer.max_steps=4"), tmp_path)  # checkpoints at steps 2 and 4
    flip_a_weight_byte(ckpt / "last.pt")
    assert torch.load(ckpt / "last.pt", weights_only=True)["step"] == 4  # torch itself loads it
    state, path = find_checkpoint(ckpt)
    assert (state["step"], path.name) == (2, "prev.pt")
    err = capfd.readouterr().err
    assert "last.pt is unusable" in err and "do not match its checksum" in err
    (tmp_path / "summary.json").unlink()  # as if killed after the checkpoint: not finished
    summary = train(make_cfg(*RUN, "trainer.max_steps=4"), tmp_path)
    assert summary["status"] == "completed" and "at step 2 of 4 (from prev.pt)" in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["missing key", "wrong shape"])
def test_a_last_pt_that_does_not_fit_the_run_falls_back_to_prev_pt(tmp_path, capfd, damage):
    ckpt = tmp_path / "checkpoints"
    train(make_cfg(*RUN, "trainer.eval_every=1", "trainer.max_steps=3"), tmp_path)
    state = find_checkpoint(ckpt)[0]
    if damage == "missing key":
        del state["optimizer"]
    else:
        name = next(k for k in state["model"] if k.endswith("weight"))
        state["model"][name] = state["model"][name][:1]
    write_checkpoint_file(ckpt / "last.pt", state)  # valid checksum, wrong contents
    (tmp_path / "summary.json").unlink()  # as if killed after the checkpoint: not finished
    # The same settings continue: from prev.pt (step 2) to step 3 again.
    summary = train(make_cfg(*RUN, "trainer.eval_every=1", "trainer.max_steps=3"), tmp_path)
    err = capfd.readouterr().err
    assert "does not fit this run" in err and "Resuming" in err and "(from prev.pt)" in err
    assert summary["status"] == "completed" and summary["step"] == 3


def test_a_checkpoint_without_its_checksum_is_not_trusted(tmp_path):
    save_checkpoint(tmp_path, {"step": 1})
    save_checkpoint(tmp_path, {"step": 2})
    torch.save({"step": 2}, tmp_path / "last.pt")  # e.g. written by hand, or by something else
    state, path = find_checkpoint(tmp_path)
    assert (state["step"], path.name) == (1, "prev.pt")


class FullDisk:
    """os.fsync that fails with ENOSPC from its ``first``-th call on, ``times`` times."""

    def __init__(self, first: int, times: int):
        self.calls, self.first, self.times = 0, first, times

    def __call__(self, fd):
        self.calls += 1
        if self.first <= self.calls < self.first + self.times:
            raise OSError(errno.ENOSPC, "No space left on device")
        return REAL_FSYNC(fd)


REAL_FSYNC = os.fsync


@pytest.mark.parametrize("first", [3, 6, 9])  # at metrics, checkpoints and best.pt writes of later evaluations
def test_a_full_disk_mid_run_fails_clearly_and_loses_nothing_saved(tmp_path, monkeypatch, first):
    monkeypatch.setattr(os, "fsync", FullDisk(first, times=1))
    with pytest.raises(RunFailed, match="No space left on device; .* (bytes|[KMGT]B) free there.*free some space and resume"):
        train(make_cfg(*RUN), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["reason"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))  # no half-written file left
    monkeypatch.setattr(os, "fsync", REAL_FSYNC)  # space freed: the same command continues
    resumed = train(make_cfg(*RUN), tmp_path / "run")
    uninterrupted = train(make_cfg(*RUN), tmp_path / "uninterrupted")
    assert resumed["status"] == "completed" and resumed["best_val_acc"] == uninterrupted["best_val_acc"]
    assert resumed["selected_test_acc"] == uninterrupted["selected_test_acc"]


def test_the_cli_exits_1_with_the_message_when_a_write_fails(tmp_path):
    script = textwrap.dedent(f"""
        import errno, os, sys
        real, calls = os.fsync, [0]
        def full(fd):
            calls[0] += 1
            if calls[0] >= 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        os.fsync = full
        sys.argv = ["msr-train", *{RUN + [f"hydra.run.dir={tmp_path}"]!r}]
        from msr_train.cli import main
        main()
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"msr-train: error: could not write to {tmp_path}" in res.stderr and "No space left" in res.stderr
