"""Sweep naming shared by the entry point and the runs (no Hydra, no torch): the main
process of a multirun announces the keys it varies in an environment variable that
every job inherits (joblib and submitit jobs too); a job's folder and its TensorBoard
hyperparameters are named after them."""

from __future__ import annotations

import hashlib
import os

#: The keys a multirun varies, from its main process to every job.
SWEEP_KEYS_ENV = "MSR_TRAIN_SWEEP_KEYS"
#: Longest sweep job folder name; a longer one is cut and ends in a hash of the whole.
MAX_SUBDIR = 200


def announced_keys() -> list[str]:
    """The keys the current multirun varies, as its command line names them (none outside one)."""
    return [k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k]


def announce_keys(keys: list[str]) -> None:
    os.environ[SWEEP_KEYS_ENV] = ",".join(keys)


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
