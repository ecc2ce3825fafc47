"""One process per run dir: an exclusive lock held while a run trains into its folder.

Two processes writing one run (a job submitted twice, a double Enter) interleave their
metrics and can rename each other's checkpoints away. The lock is ``flock`` on
``<run dir>/run.lock``: the kernel releases it when its holder exits or dies, so a lock
left by a killed process is simply taken by the next run, and nothing is ever stale. The
file names the holder (pid, host, start time) for the message the second process gets.
Hydra stages its ``.hydra/`` config copies (msr_train.launch); everything
msr-train writes happens under the lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError
from .run_files import LOCK

LOCK_FILE = LOCK


class RunLock:
    """``with RunLock(folder):`` trains into ``folder`` alone, or raises ConfigError
    naming the process that holds it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another msr-train run ({holder}); wait for it "
                              "to finish or stop it, or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a new holder)
            self._fd = None
