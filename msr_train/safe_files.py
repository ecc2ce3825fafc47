"""Result files that a crash, a kill or a full disk cannot corrupt (torch-free; the
checkpoints' own format is in checkpoint.py).

Whole files are written to a temporary file in the same folder, flushed to disk, then
renamed over the target: readers see the old file or the new one, never a torn one.
JSON-lines files are appended a whole record at a time and fsynced.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path


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


def remove_torn_writes(folder: Path) -> None:
    """Delete the temp files of ``atomic_write`` calls in ``folder`` that a kill
    interrupted (only the holder of the folder's run lock may: they could be a live
    writer's)."""
    for stale in Path(folder).glob(".*.tmp"):
        if stale.is_file():
            stale.unlink()


def size_text(n: float) -> str:
    """A byte count as people read it: 393 KB, 12 MB, 62 GB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TB"


#: What to do about a failed write, by its errno (a full disk is not a read-only folder).
WRITE_FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (the disk quota is reached)",
               errno.EROFS: "make the folder writable (its file system is read-only)",
               errno.EACCES: "make the folder writable (permission denied)",
               errno.EPERM: "make the folder writable (permission denied)",
               errno.ENOENT: "restore the folder (it was removed)"}


def write_fix(error: OSError) -> str:
    return WRITE_FIXES.get(error.errno, "fix what the error names")


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record and force it to disk, so that a reader (or a crash)
    sees whole records only; a torn last line can only come from a kill mid-write."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def jsonl_lines(path: Path):
    """Yield ``(line number, bytes, record)`` for each non-blank line of a JSON-lines file;
    ``record`` is None for a line that is not a JSON object (the torn last line of a kill
    mid-write, garbage, bytes that are not UTF-8)."""
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        yield number, raw, record if isinstance(record, dict) else None


def read_jsonl(path: Path, damaged: list[tuple[int, bytes]] | None = None) -> list[dict]:
    """The records of a JSON-lines file. A damaged line is skipped, never the lines after
    it, and added to ``damaged`` as (line number, bytes)."""
    records = []
    for number, raw, record in jsonl_lines(path):
        if record is not None:
            records.append(record)
        elif damaged is not None:
            damaged.append((number, raw))
    return records


def damaged_lines_text(damaged: list[tuple[int, bytes]]) -> str:
    """``damaged`` (from read_jsonl) for a message: how many, and which lines."""
    numbers = ", ".join(str(n) for n, _ in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
    return f"{len(damaged)} damaged line{'s' if len(damaged) > 1 else ''} (line {numbers})"


def truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the records for which ``keep(record)`` is
    true, and return them: what a resumed run keeps of the run that died. Damaged lines
    (and records ``keep`` cannot read) are set aside in ``<path>.damaged``, with a note."""
    path, kept, damaged = Path(path), [], []
    for number, raw, record in jsonl_lines(path) if path.exists() else ():
        if record is not None:
            try:
                if keep(record):
                    kept.append(record)
                continue
            except (KeyError, TypeError):  # a JSON object that is not one of ours
                pass
        damaged.append((number, raw))
    if damaged:
        aside = path.with_name(path.name + ".damaged")
        with open(aside, "ab") as f:
            f.write(b"".join(raw + b"\n" for _, raw in damaged))
            f.flush()
            os.fsync(f.fileno())
        print(f"msr-train: {path}: {damaged_lines_text(damaged)} set aside in {aside.name}; the "
              "lines around them are kept", file=sys.stderr)
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return kept
