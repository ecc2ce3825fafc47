"""A launch's record in its run dir: Hydra's copies of the config (``.hydra/``:
config.yaml, hydra.yaml with the chosen configs, overrides.yaml), which msr-compare,
msr-eval and the Optuna sweeper read.

Hydra writes them before msr-train starts, so a launch that is then refused (a second
process on a running run, a resume with other settings, a value the data cannot give)
would overwrite the run's own copies, and a refused launch into a new folder would leave
that folder behind. So Hydra writes them into ``.hydra-launch-<pid>/`` (conf/config.yaml:
``hydra.output_subdir``), which becomes ``.hydra/`` only once every check has passed, under
the run's lock (``accept``); whatever way the launch ends, ``withdraw`` then removes what
is still staged, and the run folder itself when it holds nothing but the launch's lock and
log (the launch made it and did nothing in it), with its parent if that is left empty (the
default layout's ``<model>-<method>-bs<batch>-seed<seed>/`` above the timestamped folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .run_files import LOCK

#: The staged copies of this launch (set by the CLI; spawned processes inherit it).
STAGED_ENV = "MSR_TRAIN_STAGED_HYDRA"
RECORD = ".hydra"


def staged_subdir() -> str:
    """hydra.output_subdir: resolved by the process that runs the job."""
    return f"{RECORD}-launch-{os.getpid()}"


def stage(output_dir: str, output_subdir: str | None) -> None:
    if output_subdir is not None:
        os.environ[STAGED_ENV] = str(Path(output_dir) / output_subdir)


def accept(out_dir: Path) -> None:
    """Make this launch's staged copies the run's ``.hydra/`` (rank 0, once the run has
    passed every check, under the lock; a no-op outside the CLI)."""
    staged = Path(os.environ.get(STAGED_ENV, ""))
    if not os.environ.get(STAGED_ENV) or not staged.is_dir() or staged.parent.resolve() != Path(out_dir).resolve():
        return
    record = Path(out_dir) / RECORD
    if record.is_dir():  # an earlier launch's: the newest stands, as with Hydra's own
        old = record.with_name(f"{RECORD}-replaced-{os.getpid()}")
        os.replace(record, old)
        os.replace(staged, record)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, record)


def withdraw(out_dir: Path, log_name: str) -> None:
    """Remove what a launch that is ending still has staged, and the run folder if the
    launch left nothing in it but its lock and its (Hydra's) log file ``log_name``."""
    staged = os.environ.pop(STAGED_ENV, None)
    if staged:
        shutil.rmtree(staged, ignore_errors=True)
    out_dir = Path(out_dir)
    try:
        left = {p.name for p in out_dir.iterdir()}
        if left <= {LOCK, log_name} and out_dir.resolve() != Path.cwd().resolve():
            shutil.rmtree(out_dir)
            if not any(out_dir.parent.iterdir()) and out_dir.parent.resolve() != Path.cwd().resolve():
                out_dir.parent.rmdir()
    except OSError:  # already gone, or not ours to read: leave it
        pass
