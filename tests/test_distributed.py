"""Data-parallel training (DDP on CPU through gloo), devices, precision and parallel sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_cfg
from msr_train.checks import select_devices
from msr_train.errors import ConfigError
from msr_train.train import train

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

#: 20 steps of global batch 16 on real data, each step logged (eval_every=1, on 200 validation images).
STEPS = ["dataset=fashion_mnist", "dataset.train_size=640", "dataset.val_size=200", "dataset.test_size=100",
         "model=resnet8", "batch_size=16", "trainer.accelerator=cpu", "trainer.max_steps=20", "trainer.eval_every=1",
         "trainer.eval_batch_size=100", "trainer.progress_bar=false", "optimizer.lr=0.05"]


def losses(run_dir, key="train_loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "msr_train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


# MSR with its noise on (off by default) and its zero-mean stem: every random draw is tested;
# with an EMA of the weights, what is evaluated is the average, kept on every rank.
@pytest.mark.parametrize("method", ["msr method.noise_at=conv method.stem=msr", "nf", "none trainer.ema_decay=0.8"])
def test_two_processes_follow_the_single_process_trajectory(tmp_path, method):
    """2-process gloo DDP with global batch 16 = 1 process with batch 16, step for step
    (MSR's noise included: it is drawn for the global batch), and the 2-process run leaves
    one output dir with one set of logs."""
    method = f"method={method}".split()
    train(make_cfg(*STEPS, *method, "logger=none"), tmp_path / "one")
    run = cli(*STEPS, *method, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    single, parallel = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(parallel) == 20
    assert max(abs(a - b) for a, b in zip(single, parallel)) < 1e-4
    assert abs(single[-1] - single[0]) > 1e-3  # it trained
    val_single, val_parallel = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    assert max(abs(a - b) for a, b in zip(val_single, val_parallel)) < 1e-4
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["step"] == 20 and summary["examples_seen"] == 320
    two = tmp_path / "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    files = sorted(p.name for p in two.iterdir())
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == [
        ".hydra", "checkpoints", "cli.log", "metrics.jsonl", "run.lock", "summary.json"]
    assert len(files) == 7  # one TensorBoard event file
    # best_prev.pt exists once validation improved twice; no temp file is left behind.
    assert {p.name for p in (two / "checkpoints").iterdir()} - {"best_prev.pt"} == {"best.pt", "last.pt", "prev.pt"}


def test_a_global_batch_that_the_processes_cannot_share_is_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match="global batch.*multiple of 4"):
        train(make_cfg(*STEPS, "batch_size=18", "trainer.devices=2", "trainer.accumulate=2"), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_device_selection():
    assert select_devices(make_cfg("trainer.accelerator=cpu").trainer) == [torch.device("cpu")]
    assert len(select_devices(make_cfg("trainer.accelerator=cpu", "trainer.devices=3").trainer)) == 3
    with pytest.raises(ConfigError, match="names GPU ids, but the run is on the CPU"):
        select_devices(make_cfg("trainer.accelerator=cpu", "trainer.devices=[0,1]").trainer)
    with pytest.raises(ConfigError, match="must be auto, a number of devices"):
        select_devices(make_cfg("trainer.accelerator=cpu", "trainer.devices=0").trainer)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            select_devices(make_cfg("trainer.accelerator=cuda", "trainer.devices=[0,2]").trainer)


def test_sync_bn_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA"):
        train(make_cfg(*STEPS, "method=bn", "method.sync_bn=true", "trainer.devices=2"), tmp_path / "r")


QUICK = ["debug=quick", "dataset.synthetic_train=128", "dataset.synthetic_test=64", "batch_size=16",
         "trainer.max_steps=6", "trainer.accelerator=cpu"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_two_job_sweep_through_a_launcher_plugin(tmp_path, launcher):
    """One of the jobs diverges (lr 1e6): it is recorded, and the other one still completes."""
    run = cli("-m", *QUICK, "trainer.cpu_threads=1", "method=msr", "optimizer.lr=0.05,1e6", "trainer.log_every=1",
              f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
              "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["status"] for s in summaries] == ["completed", "diverged"]
    assert [s["lr"] for s in summaries] == [0.05, 1e6]
    assert (jobs[0] / "metrics.jsonl").read_text().count("\n") >= 1


def step_losses(tmp_path, name, *overrides):
    summary = train(make_cfg(*QUICK, "method=msr", "trainer.eval_every=1", *overrides), tmp_path / name)
    return losses(tmp_path / name), summary


def test_precision_and_memory_format(tmp_path):
    full, _ = step_losses(tmp_path, "fp32")
    nhwc, _ = step_losses(tmp_path, "nhwc", "trainer.channels_last=true")
    bf16, summary = step_losses(tmp_path, "bf16", "trainer.precision=bf16")
    assert max(abs(a - b) for a, b in zip(full, nhwc)) < 1e-4  # the same numbers in another layout
    assert summary["status"] == "completed" and max(abs(a - b) for a, b in zip(full, bf16)) < 0.05
    assert full != bf16  # it did compute in bfloat16


def test_16_mixed_hooks_see_unscaled_gradients(monkeypatch):
    """The GradScaler multiplies the loss by 2^16; the method's before_step must see the
    gradients of the loss itself."""
    from msr_train.methods import build_method
    from msr_train.models import build_model
    from msr_train.precision import Precision
    from msr_train.train import train_step
    seen = []
    cfg = make_cfg("method=msr", "method.noise_delta=0", "method.noise_shift=0")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(5, (8,))
    norms = {}
    for name in ("32", "16-mixed"):
        torch.manual_seed(0)
        method = build_method(cfg.method)
        model = build_model("resnet8", method, in_channels=3, num_classes=5, image_size=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        monkeypatch.setattr(method, "before_step", lambda m, o: seen.append(
            float(torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]).norm())))
        precision = Precision(name, torch.device("cpu"))
        assert precision.scaler is None or precision.scaler.get_scale() == 2.0 ** 16
        train_step(model, method, optimizer, x, y, precision=precision)
        norms[name] = seen[-1]
    assert norms["16-mixed"] == pytest.approx(norms["32"], rel=0.05)


def test_optuna_searches_the_learning_rate_on_validation_and_survives_a_diverged_trial(tmp_path):
    run = cli("-m", "hparams_search=lr_optuna", *QUICK, "dataset.val_size=32", "trainer.cpu_threads=1",
              "hydra.sweeper.n_trials=3", "optimizer.lr=choice(0.05,1e6)", f"hydra.sweep.dir={tmp_path / 'opt'}",
              "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"optimizer.lr": 0.05}
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "opt").glob("*/summary.json")]
    assert len(summaries) == 3 and "completed" in [s["status"] for s in summaries]
    # The objective is the best validation accuracy, never a test number.
    completed = [s for s in summaries if s["status"] == "completed"]
    assert result["best_value"] == max(s["best_val_acc"] for s in completed)


def test_a_search_without_validation_split_is_refused(tmp_path):
    run = cli("-m", "hparams_search=lr_optuna", *QUICK, "dataset.val_size=0", "hydra.sweeper.n_trials=1",
              f"hydra.sweep.dir={tmp_path / 'opt'}", "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path)
    assert run.returncode != 0 and "dataset.val_size=0" in run.stderr and "validation accuracy" in run.stderr
    assert not list((tmp_path / "opt").glob("*/metrics.jsonl"))


LONG = ["debug=quick", "trainer.accelerator=cpu", "trainer.devices=2", "batch_size=16", "epochs=200",
        "trainer.eval_every=4", "trainer.cpu_threads=1"]


def start_parallel_run(run_dir):
    """A 2-process run that goes on for minutes; returns once its first evaluation is logged."""
    proc = subprocess.Popen([sys.executable, "-m", "msr_train.cli", *LONG, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    return proc


def workers_of(pid: int) -> list[int]:
    """The DDP worker processes a parent started (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_parent_stops_every_worker_at_a_checkpoint(tmp_path, sig):
    proc = start_parallel_run(tmp_path / "run")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert summary["status"] == "interrupted" and last["step"] == summary["step"] > 0
    assert not workers_of(proc.pid)


def test_a_dead_worker_stops_the_run_with_its_rank_and_exit_code(tmp_path):
    proc = start_parallel_run(tmp_path / "run")
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "died with signal SIGKILL" in err and "msr-train: continue with: msr-train " in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "died with signal SIGKILL" in summary["reason"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_every_worker_at_once_without_a_traceback(tmp_path, sig):
    proc = start_parallel_run(tmp_path / "run")
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "ProcessRaisedException" not in err, err[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    assert not workers_of(proc.pid)


def processes_running(module: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if module.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_preempted_submitit_job_checkpoints_is_requeued_and_continues_in_its_dir(tmp_path):
    """submitit's preemption signal (SIGUSR2) to a job of Hydra's submitit launcher: the
    loop checkpoints, hands the signal to submitit, which requeues the job; the requeued
    job resumes from the checkpoint in the same output dir and completes."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "msr_train.cli", "-m", *QUICK, "trainer.max_steps=null",
                             "epochs=40", "trainer.eval_every=4", "trainer.cpu_threads=1",
                             "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (sweep / "job" / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    before = set(processes_running("submitit.core._submit"))
    assert len(before) == 1, before
    os.kill(before.pop(), signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((sweep / "job" / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in (sweep / "job" / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and summary["step"] == 40 * 8
    assert steps == sorted(set(steps)) and steps[-1] == 320  # each evaluation logged once, in order
    logs = "".join(p.read_text() for p in sweep.rglob("*_log.*"))
    assert "Requeued job" in logs and "Resuming" in logs
