"""Named locks that hold across the threads of a process and across processes.

The daemon's workers are threads; ``finalize`` may run beside the daemon in another
process. A master's or a coadd's state is changed under a lock that is both a
``threading.Lock`` (threads of this process) and an ``flock`` on a lock file next to
the state (other processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from pathlib import Path


class NamedLocks:
    """``with locks.hold(name, lock_file): ...``: one lock per name."""

    def __init__(self):
        self._locks: dict[object, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, name, lock_file: Path):
        with self._guard:
            tlock = self._locks.setdefault(name, threading.Lock())
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with tlock, open(lock_file, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
