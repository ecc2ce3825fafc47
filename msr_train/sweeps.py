"""Sweeps' jobs (no Hydra, no torch): the main process of a multirun announces the keys
it varies in an environment variable that every job inherits (joblib and submitit jobs
too); a job's folder and its TensorBoard hyperparameters are named after them. A local
sweep's worker stops when the sweep's process dies."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

#: The keys a multirun varies, from its main process to every job.
SWEEP_KEYS_ENV = "MSR_TRAIN_SWEEP_KEYS"
#: The process id of the multirun's main process, for its local workers (stop_with_sweep).
SWEEP_PID_ENV = "MSR_TRAIN_SWEEP_PID"
#: Longest sweep job folder name; a longer one is cut and ends in a hash of the whole.
MAX_SUBDIR = 200


def announced_keys() -> list[str]:
    """The keys the current multirun varies, as its command line names them (none outside one)."""
    return [k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k]


def announce_keys(keys: list[str]) -> None:
    os.environ[SWEEP_KEYS_ENV] = ",".join(keys)
    os.environ[SWEEP_PID_ENV] = str(os.getpid())


def sweep_subdir(task_overrides) -> str:
    """A sweep job's folder: its values of the keys the sweep varies (all its overrides
    if that is unknown or none vary), e.g. ``method=msr,batch_size=8``; '/' becomes '_', and
    a name over MAX_SUBDIR characters is cut and ends in a hash that keeps it unique."""
    keys = announced_keys()
    pairs = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in keys] or list(task_overrides)
    name = ",".join(pairs).replace("/", "_") or "job"
    if len(name) > MAX_SUBDIR:
        name = f"{name[:MAX_SUBDIR - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def objective(summary: dict) -> float:
    """A finished run's score for Hydra's sweepers (Optuna): the best validation accuracy,
    never a test number. A diverged run scores 0 (the worst accuracy): the Optuna sweeper
    aborts the whole search on NaN or None."""
    acc = summary.get("best_val_acc")
    return 0.0 if acc is None or summary["status"] == "diverged" else acc


WATCHER = "msr-train-sweep-watch"


def stop_with_sweep(poll_s: float = 1.0) -> None:
    """A local sweep's worker (joblib's, submitit_local's) trains on when the sweep's
    process is killed (kill -9), holding its run's lock against the sweep's re-run. In
    such a worker (a child of the sweep's process; not the process itself, nor a SLURM
    job), watch the parent; once it is gone, ask this process to stop as Ctrl-C would:
    the run checkpoints, writes status interrupted and exits; the re-run resumes it."""
    parent = os.getppid()
    if os.environ.get(SWEEP_PID_ENV) != str(parent) or any(t.name == WATCHER for t in threading.enumerate()):
        return  # not a local worker, or one already watched (a worker runs several jobs)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name=WATCHER, daemon=True).start()
