"""Checkpoints that a crash, a kill or a full disk cannot corrupt.

Each is written by ``safe_files.atomic_write`` (a temp file in the same folder, flushed
to disk, renamed over the target): readers see the old file or the new one, never a torn
one. Checkpoints hold only plain containers and tensors, so they load with
``torch.load(..., weights_only=True)`` and can carry no code. Each carries a SHA-256 of
its contents (every tensor's bytes, dtype and shape, and every other value), verified on
load: a flipped bit on disk is an error, never silently different weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
from pathlib import Path

import torch

from .errors import ConfigError, describe
from .safe_files import atomic_write, remove_torn_writes


LAST, PREVIOUS = "last.pt", "prev.pt"
#: The model selected on validation (see state.BestModel), and the file that older runs
#: kept the one it replaced in (read on their resume only).
BEST, BEST_PREVIOUS = "best.pt", "best_prev.pt"


CHECKSUM = "sha256"
#: The suffix an unreadable file is renamed with on resume (kept, out of the way).
DAMAGED = ".damaged"


def content_checksum(obj) -> str:
    """SHA-256 over a nested structure of dicts, lists, tensors and plain values."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                digest.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            digest.update(f"V{x!r}".encode())
    feed(obj)
    return digest.hexdigest()


class CorruptCheckpoint(ValueError):
    """A checkpoint whose contents do not match its checksum."""


def write_checkpoint_file(path: Path, state: dict, *, keep_previous_as: Path | None = None) -> None:
    """``torch.save`` of ``state`` with its checksum, atomically (see ``atomic_write``)."""
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM: content_checksum(state)}, buffer)
    # Written as bytes, so a full disk raises OSError (torch's own writer reports a RuntimeError).
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), keep_previous_as=keep_previous_as)


def read_checkpoint_file(path: Path, map_location="cpu") -> dict:
    """A checkpoint written by ``write_checkpoint_file``, verified against its checksum."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    expected = state.pop(CHECKSUM, None) if isinstance(state, dict) else None
    if expected is None or content_checksum(state) != expected:
        raise CorruptCheckpoint("its contents do not match its checksum" if expected else "it has no checksum")
    return state


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write ``folder/last.pt``; the one it replaces stays as ``prev.pt``."""
    write_checkpoint_file(Path(folder) / LAST, state, keep_previous_as=Path(folder) / PREVIOUS)


def tidy_checkpoints(folder: Path) -> None:
    """Before a run writes checkpoints into ``folder``: remove torn writes and set aside an
    unreadable last.pt (what ``resumable_checkpoints`` does, for a parent process that
    spawns the ranks)."""
    remove_torn_writes(folder)
    next(readable_checkpoints(folder, [], set_aside=True), None)


def readable_checkpoints(folder: Path, problems: list[str], set_aside: bool = False):
    """Yield ``(state, path)`` for last.pt, then prev.pt, each read and verified; one that
    cannot be read (torn, corrupt, carrying code, a folder) is reported, added to
    ``problems`` and skipped. With ``set_aside`` (a run about to write checkpoints) it is
    also renamed to ``<name>.damaged``: kept for inspection, and never rotated over the
    good prev.pt nor blocking the next write."""
    for path in (Path(folder) / LAST, Path(folder) / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = read_checkpoint_file(path)
        except Exception as e:  # torch raises many types for a torn or foreign file
            problems.append(f"{path.name}: {unreadable(e)}")
            kept = f"; kept as {set_aside_damaged(path).name}" if set_aside else ""
            print(f"msr-train: checkpoint {path} is unusable ({problems[-1]}{kept}); {what_next(path)}",
                  file=sys.stderr)
            continue
        yield state, path


def what_next(path: Path) -> str:
    """After checkpoint ``path`` failed: whether an older one is left to try."""
    older = path.name == LAST and (path.parent / PREVIOUS).exists()
    return "trying prev.pt" if older else "no older checkpoint to try"


def unreadable(error: Exception) -> str:
    """Why a checkpoint could not be read, in one line. torch's refusals under
    weights_only=True advise loading the file with weights_only=False, which would run any
    code it carries: msr-train never does, so the message says what torch found instead."""
    text = str(error)
    if not (isinstance(error, pickle.UnpicklingError) and text.lower().startswith("weights only load failed")):
        return describe(error)
    if "GLOBAL" in text:
        return "UnpicklingError: it holds objects other than tensors and plain data (loading it would run code; refused)"
    found = [line.strip() for line in text.splitlines()[1:] if line.strip()
             and not line.startswith(("Please file", "Check the documentation"))]
    return f"UnpicklingError: not a file torch.save wrote, or damaged ({found[0] if found else 'unreadable'})"


def set_aside_damaged(path: Path) -> Path:
    """Rename ``path`` to ``<name>.damaged`` (``.damaged.1``, ... if taken: nothing is
    ever deleted) and return the new path."""
    damaged, n = path.with_name(path.name + DAMAGED), 0
    while damaged.exists() or damaged.is_symlink():
        n += 1
        damaged = path.with_name(f"{path.name}{DAMAGED}.{n}")
    os.replace(path, damaged)
    return damaged


def find_checkpoint(folder: Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` as (state, path), None if there is none."""
    problems: list[str] = []
    for found in readable_checkpoints(folder, problems):
        return found
    if problems:
        raise ConfigError(no_usable_checkpoint(folder, problems))
    return None


def no_usable_checkpoint(folder: Path, problems: list[str]) -> str:
    return (f"no usable checkpoint in {folder}: {'; '.join(problems)}. Nothing there can be continued; start the "
            "run afresh with another hydra.run.dir (this folder stays as it is, for inspection)")
