"""Checkpoints and result files that a crash, a kill or a full disk cannot corrupt.

Everything is written to a temporary file in the same folder, flushed to disk, then
renamed over the target: readers see the old file or the new one, never a torn one.
Checkpoints hold only plain containers and tensors, so they load with
``torch.load(..., weights_only=True)`` and can carry no code.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write, *, keep_previous_as: Path | None = None) -> None:
    """Call ``write(file)`` on a temp file beside ``path`` and rename it into place. With
    ``keep_previous_as``, the file being replaced is kept under that name, and only once
    the new one is complete on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        if keep_previous_as is not None and path.exists():
            os.replace(path, keep_previous_as)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


LAST, PREVIOUS = "last.pt", "prev.pt"
#: The model selected on validation, and the one it replaced (see train.BestModel).
BEST, BEST_PREVIOUS = "best.pt", "best_prev.pt"


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write ``folder/last.pt``; the one it replaces stays as ``prev.pt``."""
    folder = Path(folder)
    try:
        atomic_write(folder / LAST, lambda f: torch.save(state, f), keep_previous_as=folder / PREVIOUS)
    except OSError as e:
        raise OSError(f"could not write a checkpoint to {folder} ({e}); the previous checkpoint is intact: "
                      "free some space and re-run the same command to continue from it") from e


def remove_torn_writes(folder: Path) -> None:
    """Delete temp files of checkpoint writes (last.pt, best.pt) that a kill interrupted."""
    for stale in Path(folder).glob(".*.pt.*.tmp"):
        stale.unlink()


def find_checkpoint(folder: Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` as (state, path), None if there is none.
    An unreadable one (torn by a crash, or carrying code) is reported and skipped."""
    folder = Path(folder)
    problems = []
    for path in (folder / LAST, folder / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a torn or foreign file
            problems.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"msr-train: checkpoint {path} is unreadable ({problems[-1]}); trying the previous one",
                  file=sys.stderr)
            continue
        return state, path
    if problems:
        raise ConfigError(f"no readable checkpoint in {folder}: {'; '.join(problems)}. Move the folder "
                          "away to start afresh, or set trainer.resume=never with another hydra.run.dir")
    return None
