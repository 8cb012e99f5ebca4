"""What each serving process tells the others: a small snapshot of its state, so that
``/-/status``, ``/readyz`` and the in-flight gauges describe the host, not the worker
a request happened to reach.

Every :data:`PUBLISH_INTERVAL` seconds (and at once when it starts draining) a worker
rewrites ``worker-<index>.state`` in the supervisor's run directory: its pid, when it
was written (its heartbeat), its event loop's lag, its file descriptors, its
connections, requests and fills in flight, and (worker 0, the eviction owner) the cache
index's figures and its verdict on the disk. Any worker reads them all when asked; the
supervisor deletes a dead worker's file when it reaps it (:func:`forget`). Writer and
readers keep the files open (:mod:`regmirror.state_file`): a worker out of file
descriptors still publishes that it is, and still reads the others.

A worker is unhealthy for the host (:func:`problems`) when its file is missing
(restarting; in the host's first :data:`STARTUP_GRACE` seconds, one not seen yet is
starting, which is fine: it does not listen yet), its pid is gone (or a zombie), its heartbeat is older than
``server.max_loop_lag`` (its event loop is stalled, or it is stopped: it cannot write),
its own watchdog measured a stall that long, its descriptors are past
:data:`~regmirror.health.FD_READY_FRACTION` of its limit, or it is draining. Files
rather than asking each worker over a socket: a stalled worker cannot answer, and its
silence is exactly what must be read.

Without workers (one process) nothing is written; the gauges are set all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from regmirror.eviction import BlobCache
from regmirror.eviction_link import pid_alive
from regmirror.fill import Fill, Fills
from regmirror.health import (
    FD_READY_FRACTION,
    LoopWatchdog,
    Shutdown,
    disk_problem,
    fd_limit,
    open_fds,
)
from regmirror.metrics import Metrics
from regmirror.state_file import Reader, Unreadable, Writer, load

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 0.5  # seconds between snapshots (the heartbeat)
MIN_SPACING = 0.05  # seconds between snapshots written on change
FDS_EVERY = 4  # snapshots between counts of open descriptors (a listdir of /proc)...
FDS_NEAR = FD_READY_FRACTION / 2  # ...at each one past this share of the limit
STARTUP_GRACE = 10.0  # seconds after its start a worker overlooks others yet to publish
UNREFERENCED_EVERY = 20  # snapshots between counts of unreferenced blobs (a walk of the index)


class Counts(Protocol):
    """What a listening port says about its clients (:class:`~regmirror.connections.Listener`)."""

    @property
    def connections(self) -> int: ...

    @property
    def requests(self) -> int: ...


def name_of(index: int) -> str:
    return f"worker-{index}.state"


def forget(run_dir: Path, index: int, pid: int) -> None:
    """Delete worker ``index``'s snapshot if it is ``pid``'s (its successor may have
    written one already). The supervisor's, once it reaped ``pid``."""
    path = run_dir / name_of(index)
    state = load(path)
    if state is not None and state.get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fill_entry(fill: Fill) -> dict[str, Any]:
    """A fill in flight as ``/-/status`` shows it (named by digest only)."""
    return {
        "digest": str(fill.digest),
        "bytes": fill.written,
        "size": fill.size,  # None until the source has said
        # Tailing another process's partial file: that worker lists the fill as its own.
        "following": fill.origin.name == "another process",
    }


class WorkerState:
    """This process's snapshot: published for the others (with a run directory), and
    the in-flight gauges. ``index`` None: the only process."""

    def __init__(
        self,
        *,
        fills: Fills,
        watchdog: LoopWatchdog,
        shutdown: Shutdown,
        metrics: Metrics,
        index: int | None = None,
        count: int = 1,
        run_dir: Path | None = None,
        cache: BlobCache | None = None,
        interval: float = PUBLISH_INTERVAL,
    ):
        """``cache``: the eviction owner's, whose index is the host's: its figures and
        its verdict on the disk go in the snapshot."""
        self.fills = fills
        self.watchdog = watchdog
        self.shutdown = shutdown
        self.metrics = metrics
        self.index = index
        self.count = count
        self.run_dir = run_dir
        self.cache = cache
        self.interval = interval
        self.started = time.time()
        self.ports: list[Counts] = []
        self._changed = asyncio.Event()
        self._ticks = 0
        self._fds = open_fds()
        self._fds_connections = 0  # connections when the descriptors were counted
        self._file = Writer(run_dir / name_of(index)) if run_dir and index is not None else None
        self._peers = Reader(run_dir) if run_dir else None
        self._unreferenced = 0
        self._seen: set[int] = set()  # workers seen publishing (the startup grace)

    @property
    def shared(self) -> bool:
        """Whether other workers serve the host beside this one."""
        return self.run_dir is not None

    def attach(self, port: Counts) -> None:
        """Count ``port``'s connections and requests (the registry port)."""
        self.ports.append(port)

    def changed(self) -> None:
        """Something the others should see now (the drain started)."""
        self._changed.set()

    def connections(self) -> int:
        return sum(p.connections for p in self.ports)

    async def snapshot(self) -> dict[str, Any]:
        fills = [fill_entry(f) for f in self.fills.running()]
        state: dict[str, Any] = {
            "index": self.index,
            "pid": os.getpid(),
            "started": self.started,
            "written": time.time(),
            "loop_lag": round(self.watchdog.lag(), 3),
            "draining": self.shutdown.draining,
            "fds": self._fds,
            "fd_limit": fd_limit(),
            "connections": self.connections(),
            "requests": sum(p.requests for p in self.ports),
            "fills": fills,
        }
        if self.cache is not None:
            state["cache"] = self.cache_figures()
            state["disk_problem"] = await disk_problem(self.cache)
        return state

    def cache_figures(self) -> dict[str, Any]:
        """The owner's index: what is stored on the host."""
        cache = self.cache
        assert cache is not None
        if self._ticks % UNREFERENCED_EVERY == 1 or not cache.loaded:
            self._unreferenced = len(cache.unreferenced())
        return {
            "bytes": cache.total,
            "blobs": cache.blob_count,
            "index_loaded": cache.loaded,  # built in the background after start
            "unreferenced_blobs": self._unreferenced,
            "staged_bytes": cache.reserved + cache.uploads,
        }

    async def run(self) -> None:
        """Publish until cancelled; the gauges follow each snapshot."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._count_fds()
                self._ticks += 1
                try:
                    state = await self.snapshot()
                    self._gauges(state)
                    if self._file is not None:
                        self._file.write(state)
                except Exception:  # logged; the next beat may do
                    log.exception("publishing this worker's state failed")
                self._changed.clear()
                self._starting()
                next_beat = loop.time() + self.interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._changed.wait()
                await asyncio.sleep(max(0.0, min(MIN_SPACING, next_beat - loop.time())))
        finally:
            if self._file is not None:
                self._file.close()
            if self._peers is not None:
                self._peers.close()  # a later read opens what it reads anew

    def _count_fds(self) -> None:
        """Count the open descriptors every :data:`FDS_EVERY` beats (a listing costs
        about 0.35 µs a descriptor), and at every beat once they may be past
        :data:`FDS_NEAR` of the limit (the last count plus the connections opened since
        says so): a worker filling up is told within a beat."""
        connections = self.connections()
        limit = fd_limit()
        near = (
            limit is not None
            and self._fds is not None
            and self._fds + connections - self._fds_connections > limit * FDS_NEAR
        )
        if near or self._ticks % FDS_EVERY == 0:
            self._fds = open_fds()
            self._fds_connections = connections

    def _gauges(self, state: dict[str, Any]) -> None:
        self.metrics.fills_in_flight.set(sum(1 for f in state["fills"] if not f["following"]))
        self.metrics.requests_in_flight.set(state["requests"])
        self.metrics.connections_open.set(state["connections"])

    def read(self, index: int) -> dict[str, Any] | None:
        """Worker ``index``'s latest snapshot; None if it has none, or none this
        process can read (:meth:`problems` tells the two apart)."""
        if self._peers is None:
            return None
        with contextlib.suppress(Unreadable):
            return self._peers.read(name_of(index))
        return None

    def others(self) -> list[dict[str, Any]]:
        """The other workers' latest snapshots (those that have one)."""
        found = []
        for index in range(self.count):
            if index != self.index and (state := self.read(index)) is not None:
                found.append(state)
        return found

    async def host(self) -> list[dict[str, Any]]:
        """Every worker's snapshot, this one's taken now; index order."""
        return sorted([await self.snapshot(), *self.others()], key=lambda s: s["index"] or 0)

    def _starting(self) -> bool:
        """Within the startup grace: note which workers have published so far."""
        if self.run_dir is None or time.time() - self.started >= STARTUP_GRACE:
            return False
        for index in range(self.count):
            if index not in self._seen and self.read(index) is not None:
                self._seen.add(index)
        return True

    def owner_disk_problem(self, own: str | None) -> str | None:
        """The eviction owner's verdict on the disk (its index knows every worker's
        blobs); ``own`` when this is the owner or it has not published one."""
        if self.index == 0 or self.run_dir is None:
            return own
        owner = self.read(0)
        if owner is None or "disk_problem" not in owner:
            return own
        problem = owner["disk_problem"]
        return problem if isinstance(problem, str) else None

    def problems(self, threshold: float) -> str | None:
        """Why another worker cannot take clients (None: all fine); this one's own
        checks are :func:`regmirror.health` s."""
        if self._peers is None:
            return None
        starting: set[int] = set()  # not published since the host started: fine for now
        if self._starting():
            starting = set(range(self.count)) - self._seen
        return problems(self._peers, self.count, threshold, skip=self.index, starting=starting)


def problems(
    peers: Reader,
    count: int,
    threshold: float,
    *,
    skip: int | None = None,
    starting: Collection[int] = (),
) -> str | None:
    """What is wrong with the workers other than ``skip``, each named; None if nothing.
    ``starting``: workers that have not published since the host started, whose
    absence is no problem (they do not listen yet: the kernel gives their connections
    to the others); absent otherwise, a worker is restarting."""
    found = []
    now = time.time()
    for index in range(count):
        if index == skip:
            continue
        try:
            state = peers.read(name_of(index))
        except Unreadable as exc:
            found.append(f"worker {index}: its state cannot be read here ({exc})")
            continue
        if state is None:
            if index in starting:
                continue
            found.append(f"worker {index}: not running (starting, or restarting after it died)")
            continue
        if (problem := worker_problem(state, now, threshold)) is not None:
            found.append(f"worker {index} (pid {state.get('pid')}): {problem}")
    return "; ".join(found) or None


def worker_problem(state: dict[str, Any], now: float, threshold: float) -> str | None:
    """Why the worker of snapshot ``state`` cannot take clients, or None."""
    pid = state.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return "gone (exited; being restarted)"
    silent = now - float(state.get("written", 0))
    if silent >= threshold:
        return (
            f"event loop stalled: no heartbeat for {silent:.1f} s "
            f"(server.max_loop_lag {threshold:g} s)"
        )
    lag = float(state.get("loop_lag", 0))
    if lag >= threshold:
        return f"event loop stalled {lag:.1f} s (server.max_loop_lag {threshold:g} s)"
    fds, limit = state.get("fds"), state.get("fd_limit")
    if isinstance(fds, int) and isinstance(limit, int) and fds > limit * FD_READY_FRACTION:
        return f"{fds} file descriptors open of the limit {limit}: near exhaustion"
    if state.get("draining"):
        return "draining: shutting down"
    return None
