"""Who is using a data directory: running servers share it, ``regmirror gc`` owns it.

Every server process holds a shared ``flock`` on ``<data_dir>/regmirror.lock`` while it
runs; ``gc`` takes it exclusively, without waiting, so it never works under a live server
(whose in-flight pushes, fills and sessions look exactly like a crash's leftovers) and a
server does not start while ``gc`` runs. The kernel drops the lock when its process dies,
so a kill -9 leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "regmirror.lock"


class DataDirBusy(RuntimeError):
    """The data directory is locked in a way that excludes what was asked."""


class DataDirLock:
    """A held lock on a data directory; :meth:`release` it (closing the file does)."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def acquire(data_dir: Path, *, exclusive: bool) -> DataDirLock:
    """Lock ``data_dir`` (shared for a server, exclusive for gc); DataDirBusy at once
    when another process holds a lock that conflicts."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = "a regmirror server is running on it" if exclusive else "regmirror gc is running"
        raise DataDirBusy(f"data directory {data_dir} is in use: {holder}") from None
    except BaseException:
        os.close(fd)
        raise
    return DataDirLock(fd)
