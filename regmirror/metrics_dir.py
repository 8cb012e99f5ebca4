"""The directory where several workers keep their metrics (prometheus-client's
multiprocess mode, :mod:`regmirror.workers`), and what a killed supervisor left.

The supervisor makes one per run in the temp directory and removes it when it ends.
Killed (kill -9, the OOM killer), it leaves it behind, files and all, on every restart:
a container's /tmp survives ``docker restart``. So each directory holds a lock file,
locked by the supervisor and inherited by its workers, and a starting supervisor removes
the directories whose lock nobody holds any more. A directory is locked before it gets
its name, so none is ever seen unlocked while in use; a directory without the lock file
(an older regmirror's, or not ours) is left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile

log = logging.getLogger("regmirror")

PREFIX = "regmirror-metrics-"
LOCK = ".supervisor.lock"  # not *.db: prometheus-client reads only those


class MetricsDir:
    """A new, locked metrics directory in ``parent`` (the temp directory by default);
    :meth:`remove` it when the workers are gone."""

    def __init__(self, parent: str | None = None):
        parent = parent or tempfile.gettempdir()
        remove_abandoned(parent)
        staging = tempfile.mkdtemp(prefix="." + PREFIX, dir=parent)  # not seen until named
        self._lock: int | None = os.open(
            os.path.join(staging, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600
        )
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # the workers inherit it: held while any lives
        self.path = os.path.join(parent, os.path.basename(staging)[1:])
        os.rename(staging, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_abandoned(parent: str) -> int:
    """Remove the metrics directories in ``parent`` that no live supervisor or worker
    holds; the number removed."""
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, LOCK), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock file (not ours to judge), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use
            continue
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d metrics directories of killed regmirror runs in %s", removed, parent)
    return removed
