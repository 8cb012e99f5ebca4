"""A short critical section for every process of a host: an exclusive ``flock`` on a
directory (the directory whose contents it guards: no file of its own among them), taken
from the event loop.

For decisions that must be exact across the workers (``server.workers``) that share a
data directory, such as admitting the last free upload session: read the shared state,
decide, write the decision where the others read it, all under the lock.

The lock is polled (``LOCK_NB``, backing off to :data:`POLL_MAX`) rather than waited for
in a thread: a thread blocked in ``flock`` cannot be cancelled, and a cancelled request
would leave it to take the lock later and hold it for nobody. A holder that keeps it for
longer than ``wait`` seconds (a process stopped or wedged inside) delays the others, never
blocks them: :meth:`HostLock.held` then goes on without the lock and says so. Within one
process the callers queue on an :class:`asyncio.Lock` first (``flock`` locks belong to
the open file, which the process's callers share).

Should the directory be replaced (removed and made again), a process that locks the one
it has open sees it is no longer the path's and opens the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

POLL_FIRST = 0.001  # seconds before the first look again
POLL_MAX = 0.01  # the longest between two looks: holders keep it for milliseconds


class HostLock:
    """An exclusive lock on the directory ``path`` (made if missing) for the processes of
    a host; ``wait``: the longest :meth:`held` waits for it."""

    def __init__(self, path: Path, *, wait: float):
        self.path = path
        self.wait = wait
        self._local = asyncio.Lock()
        self._fd: int | None = None

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[bool]:
        """Hold the lock for the body; yields False when it was not had within ``wait``
        seconds (the body then runs without it)."""
        async with self._local:
            got = await self._acquire()
            try:
                yield got
            finally:
                if got and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _acquire(self) -> bool:
        deadline = time.monotonic() + self.wait
        while True:
            if self._fd is None:
                self._fd = await asyncio.to_thread(_open, self.path)
            if not await poll(self._fd, deadline):
                return False
            if _is_path(self._fd, self.path):
                return True
            os.close(self._fd)  # removed or replaced since it was opened: open the new one
            self._fd = None


async def poll(
    fd: int, deadline: float, *, first: float = POLL_FIRST, most: float = POLL_MAX
) -> bool:
    """Take the exclusive ``flock`` on ``fd``, looking again after ``first`` seconds,
    then twice as long each time up to ``most``, until ``deadline`` (``time.monotonic``);
    whether it was had. ``LOCK_NB`` touches no disk: it is called on the event loop."""
    delay = first
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, most)


def _open(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _is_path(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
