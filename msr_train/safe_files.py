"""Result files that a crash, a kill or a full disk cannot corrupt (torch-free; the
checkpoints' own format is in checkpoint.py).

Whole files are written to a temporary file in the same folder, flushed to disk, then
renamed over the target: readers see the old file or the new one, never a torn one.
JSON-lines files are appended a whole record at a time and fsynced.
"""

from __future__ import annotations

import json
import os
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


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record and force it to disk, so that a reader (or a crash)
    sees whole records only; a torn last line can only come from a kill mid-write."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a kill mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the records for which ``keep(record)`` is
    true, and return them: what a resumed run keeps of the run that died."""
    records = [r for r in read_jsonl(path) if keep(r)] if Path(path).exists() else []
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return records
