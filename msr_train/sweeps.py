"""Sweeps' jobs (no Hydra, no torch): the main process of a multirun announces the keys
it varies in an environment variable that every job inherits (joblib and submitit jobs
too); a job's folder and its TensorBoard hyperparameters are named after them. A local
sweep's worker stops, and exits, when the sweep's process dies."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from contextlib import contextmanager

#: The keys a multirun varies, from its main process to every job.
SWEEP_KEYS_ENV = "MSR_TRAIN_SWEEP_KEYS"
#: The process id of the multirun's main process, for its local workers (sweep_job).
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
#: Set while no job of the sweep trains in this process: an orphaned worker exits once it is.
_IDLE = threading.Event()
_IDLE.set()


@contextmanager
def sweep_job(poll_s: float = 1.0):
    """Run one job of a sweep. In a local sweep's worker (joblib's, submitit_local's: a
    child of the sweep's process, not the process itself nor a SLURM job), watch the parent:
    once it is gone (kill -9), the job is asked to stop as Ctrl-C would (it checkpoints,
    writes status interrupted and lets go of its run's lock), and then the worker exits:
    an idle orphan would keep its memory until found by hand (joblib's workers wait for
    work from a parent that is gone)."""
    _IDLE.clear()
    try:
        _watch_parent(poll_s)
        yield
    finally:
        _IDLE.set()


def _watch_parent(poll_s: float) -> None:
    parent = os.getppid()
    if os.environ.get(SWEEP_PID_ENV) != str(parent) or any(t.name == WATCHER for t in threading.enumerate()):
        return  # not a local worker, or one already watched (a worker runs several jobs)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        if not _IDLE.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
        _IDLE.wait()
        os._exit(1)  # nobody is left to read an exit status, or the result of a job
    threading.Thread(target=watch, name=WATCHER, daemon=True).start()
