"""An exclusive lock per output folder, so two processes never write one run at once.

``<folder>/.lock`` is locked with ``fcntl.flock`` (released by the kernel when the process exits, even on SIGKILL)
and holds the holder's pid, host and start time. A second process asking for the same folder fails at once with a
:class:`~pae_fast.errors.RunLockedError` naming the folder and the holder. Within one process the lock is
re-entrant (a stage and the engine it calls may both take it). The lock file is left in place after release:
removing it would let a third process lock a different file than the one a second process is waiting on.

Under ``torchrun`` only rank 0 takes the lock (the ranks of one run share the folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from pae_fast.errors import RunLockedError

__all__ = ["LOCK_FILE", "RunLock", "lock_holder"]

LOCK_FILE = ".lock"

_held: dict[Path, tuple[int, int]] = {}  # resolved folder -> (fd, depth), this process's held locks
_guard = threading.Lock()


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """What the lock file of ``folder`` says about its (last) holder: ``{"pid", "host", "since"}``, or None."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunLock:
    """Context manager holding the exclusive lock of ``folder`` (created if missing).

    Args:
        folder: the output folder (run folder, cache folder, sample folder).
        enabled: False makes it a no-op (e.g. on ranks other than 0).

    Raises:
        RunLockedError: another process holds the lock; the message names the folder and the holder's pid.
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self._key: Path | None = None

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        with _guard:
            if key in _held:
                fd, depth = _held[key]
                _held[key] = (fd, depth + 1)
                self._key = key
                return self
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = lock_holder(key) or {}
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
                raise RunLockedError(
                    f"output folder {self.folder} is in use by {who} (lock file {key / LOCK_FILE}); wait for it to "
                    "finish or choose another output folder"
                ) from None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[key] = (fd, 1)
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _guard:
            fd, depth = _held[self._key]
            if depth > 1:
                _held[self._key] = (fd, depth - 1)
            else:
                del _held[self._key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._key = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
