"""What ``/readyz`` checks about this process beyond its stores: room on the data
directory's disk, file descriptors, and an event loop that is not stalled.

Each check answers None (fine) or why not, in words an operator can act on. A server
that fails one should get no new clients from its load balancer; ``/healthz`` stays a
liveness check (restarting a process whose disk is full helps nobody).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource

from regmirror.eviction import BlobCache, disk_free

FD_READY_FRACTION = 0.9  # not ready above this share of RLIMIT_NOFILE
WATCHDOG_INTERVAL = 0.5  # seconds between the watchdog's wake-ups


class LoopWatchdog:
    """Measures how late the event loop runs a task that sleeps ``interval`` seconds.

    A stall shows twice: while the loop is blocked nothing answers at all (the probe
    times out), and just after it the watchdog's measured lag (or, if ``/readyz`` runs
    first, how overdue the watchdog's own wake-up is) says how long it lasted."""

    def __init__(self, *, threshold: float, interval: float = WATCHDOG_INTERVAL):
        self.threshold = threshold
        self.interval = interval
        self.last_lag = 0.0
        self._due: float | None = None

    def lag(self) -> float:
        """Seconds the loop is, or last was, behind."""
        if self._due is None:
            return self.last_lag
        overdue = asyncio.get_running_loop().time() - self._due
        return max(self.last_lag, overdue)

    def problem(self) -> str | None:
        lag = self.lag()
        if lag < self.threshold:
            return None
        return (
            f"event loop stalled {lag:.1f} s (server.max_loop_lag {self.threshold:g} s): "
            "something blocks it"
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.last_lag = max(0.0, loop.time() - self._due)


class Shutdown:
    """Set once SIGTERM starts the drain: the registry port no longer accepts, and the
    probe port, still answering, tells load balancers to stop sending."""

    def __init__(self) -> None:
        self.draining = False

    def problem(self) -> str | None:
        return "draining: shutting down (SIGTERM)" if self.draining else None


def fd_limit() -> int | None:
    """The soft RLIMIT_NOFILE; None if unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int | None:
    """This process's open descriptors (None: no procfs). Listing ``/proc/self/fd``
    takes one: with none left (EMFILE) every one below the limit is open, and the
    count is the limit."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            return fd_limit()
        return None


def fd_problem() -> str | None:
    """Open descriptors above ``FD_READY_FRACTION`` of the soft RLIMIT_NOFILE."""
    limit = fd_limit()
    if limit is None or (used := open_fds()) is None or used <= limit * FD_READY_FRACTION:
        return None
    return f"{used} file descriptors open of the limit {limit}: near exhaustion"


async def disk_problem(cache: BlobCache) -> str | None:
    """The data directory below its free-space floor with too little to evict to get
    back above it."""
    if cache.min_free_bytes <= 0:
        return None
    free = await asyncio.to_thread(disk_free, cache.root)
    if free >= cache.min_free_bytes:
        return None
    evictable = cache.evictable_bytes()
    if free + evictable >= cache.min_free_bytes:
        return None  # eviction will make room
    return (
        f"{free} bytes free on the data directory's disk, below cache.min_free_bytes "
        f"{cache.min_free_bytes}, and only {evictable} bytes can be evicted"
    )
