"""``server.workers``: several serving processes on one port over one data directory.

The supervisor (this module, in the process ``regmirror serve`` started) binds each
port first with ``SO_REUSEPORT`` without listening (so "address in use" is an error at
startup, and the port stays reserved), then forks the workers, each of which listens on
the port with a socket of its own (``SO_REUSEPORT``): the kernel spreads new connections
evenly over them. Not one shared socket: there, whichever worker wakes first accepts a
whole burst (asyncio accepts up to 100 at a time), and a herd of connections all land
in one process. The supervisor runs no event loop and holds no application state;
it makes a directory of its own for the run, removed at the end (or, after a kill -9,
at the next start): the metrics directory, and in it the *run directory*
(:class:`Worker`), where each worker publishes its state and worker 0 listens for the
others.

What is per process becomes correct across processes this way:

- **fills**: the partial file's ``flock`` is already the single-flight token across
  processes (:mod:`regmirror.fill`): one upstream GET however the herd is spread; a
  fill one worker streams through (no room to keep it) is relayed to the others'
  waiters over a unix socket in the run directory (:mod:`regmirror.fill_relay`);
- **the herd's other upstream requests** (a tag's resolution, a manifest's GET, a
  blob's HEAD, a tag list): a lock file per request under ``<data>/flights/`` is their
  token (:mod:`regmirror.hostflight`): one worker asks and stores the answer, the
  others answer from it, or from its error; each worker's in-memory coalescing stays
  in front;
- **eviction has one owner**: worker 0's index evicts; the others never delete a
  blob. They tell it at once, over a unix datagram socket in the run directory
  (:mod:`regmirror.eviction_link`), each blob they store and each fill they reserve
  room for, and ask it for room when their disk is full (a bounded wait, then the
  fill streams through), so its index is the host's and ``cache.max_bytes`` holds as
  for one process; it also rescans the data directory every ``REINDEX_SECONDS``, a
  backstop for what its own restart lost (the others' reads stamp the files' mtimes,
  so LRU order is shared too). Rather than a shared index (SQLite) because the
  directory already is the shared truth and eviction is rare, bounded work: one
  evictor means no two processes ever race to delete, and no lock on the serving
  path. A worker serving a stored blob holds ``flock(LOCK_SH)`` on its file; the
  owner deletes only a file it can lock exclusively, so nobody's blob is evicted
  under it;
- **links**: a link a worker keeps in memory is checked against its file (one ``stat``)
  on every read, so a tag moved or deleted in one worker is seen by the others at once
  (:mod:`regmirror.links`);
- **fleet mode**: the host (``fleet.advertise_url``) is the fleet's member, the worker
  that fills a blob (the partial file's lock) holds its lease; a peer's request reaching
  another worker streams that worker's partial file, and a worker killed mid-fill has
  its lease taken over by the host's next fill at once (:mod:`regmirror.fleet.coordinator`);
- **S3 outages**: the outage circuit is the host's, a file in the run directory
  (:mod:`regmirror.storage.circuit`): one worker's failure spares the others S3's
  timeouts, one's success ends their refusals; so is the fleet's memory of which peers
  sent wrong bytes (:mod:`regmirror.fleet.distrust`);
- **metrics**: prometheus-client's multiprocess mode, in a directory of the
  supervisor's, new for each run (:mod:`regmirror.metrics_dir`): ``/metrics`` from
  any worker sums every worker's counters (dead ones' too), so each request is counted
  exactly once, and the live workers' in-flight gauges (``livesum``);
- **the host's state**: each worker writes a snapshot of itself to the run directory
  (``run/`` inside the metrics directory, so a killed supervisor's goes with it) every
  half second (:mod:`regmirror.worker_state`): ``/-/status`` from any worker shows
  every worker's, and ``/readyz`` fails when any worker's heartbeat is older
  than ``server.max_loop_lag`` (stalled or stopped), its fds are near its limit, or
  it is gone (the supervisor deletes a dead worker's snapshot when it reaps it);
- **connections**: ``server.max_connections`` is the host's bound, each worker
  taking an even share (:func:`regmirror.server.worker_share`);
- **drain**: SIGTERM or SIGINT to the supervisor goes to every worker, which drains as
  a single process does (each runs :class:`~regmirror.connections.Listener` with
  ``SO_REUSEPORT``, within ``server.drain_timeout``: they drain side by side); the supervisor waits for all of them (SIGKILL after the drain
  timeout and a margin). A worker that dies otherwise is started again, at most
  ``MAX_RESTARTS`` times a minute.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from regmirror import cpus
from regmirror.metrics_dir import MetricsDir

log = logging.getLogger("regmirror")

REINDEX_SECONDS = 10.0  # how often the eviction owner rescans the data directory
STOP_MARGIN = 10.0  # seconds past the drain timeout before a worker is killed
MAX_RESTARTS = 5  # unexpected worker deaths per minute before the supervisor gives up
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Worker:
    """Who a worker process is: its index (0 owns eviction), how many serve the host,
    and the supervisor's run directory, where each worker publishes its state
    (:mod:`regmirror.worker_state`) and the eviction owner listens
    (:mod:`regmirror.eviction_link`)."""

    index: int
    count: int
    run_dir: Path


def default_workers() -> int:
    """One per CPU this process may use (:mod:`regmirror.cpus`: its affinity, capped by
    its cgroups' CPU quota): a container limited to 2 CPUs on a 64-core node gets 2."""
    return cpus.usable_cpus()


def bind(host: str, port: int, *, listen: bool) -> socket.socket:
    """A TCP socket bound with ``SO_REUSEPORT``: the supervisor's reservation of the
    port (not listening), or a worker's listening socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(4096)
            sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def use_multiprocess_metrics() -> None:
    """In a worker, before any metric exists: values live in the shared directory."""
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()


def supervise(count: int, serve: Callable[[Worker], int], drain_timeout: float) -> int:
    """Fork ``count`` workers running ``serve(worker)`` (its return is the exit status);
    until SIGTERM/SIGINT, then drain them. The exit status: 0 when all ended cleanly."""
    metrics = MetricsDir()
    os.environ[METRICS_ENV] = metrics.path
    # Not under the data directory: a unix socket's path is at most 107 bytes.
    run_dir = Path(metrics.path) / "run"
    run_dir.mkdir(mode=0o700)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    children: dict[int, int] = {}  # pid -> worker index
    deaths: deque[float] = deque(maxlen=MAX_RESTARTS)
    status = 0
    try:
        for index in range(count):
            children[_fork(Worker(index, count, run_dir), serve)] = index
        log.info(
            "serving with %d worker processes (%s); their state in %s, their metrics in %s",
            count,
            ", ".join(map(str, children)),
            run_dir,
            metrics.path,
        )
        while children and not stopping:
            pid, code = _reap()
            if pid == 0:
                time.sleep(0.1)  # a signal sets ``stopping``; waitpid would be resumed
                continue
            index = children.pop(pid)
            _mark_dead(pid, index, run_dir)
            if stopping:
                break
            log.error("worker %d (pid %d) exited unexpectedly (%s)", index, pid, code)
            deaths.append(time.monotonic())
            if len(deaths) == MAX_RESTARTS and deaths[-1] - deaths[0] < 60.0:
                log.error("workers keep dying: stopping")
                status = 1
                break
            children[_fork(Worker(index, count, run_dir), serve)] = index
        status = max(status, _drain(children, drain_timeout + STOP_MARGIN, run_dir))
    finally:
        for pid in children:
            _kill(pid, signal.SIGKILL)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        metrics.remove()
        os.environ.pop(METRICS_ENV, None)
    return status


def _fork(worker: Worker, serve: Callable[[Worker], int]) -> int:
    """A worker, born with SIGTERM and SIGINT blocked: one sent while it starts waits
    until its event loop handles them (:func:`regmirror.server.serve` unblocks them),
    rather than finding the supervisor's handler (swallowed: the worker would serve on)
    or none (it would die undrained)."""
    index = worker.index
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid
    code = 1
    try:
        _die_with(parent)
        for signum in STOP_SIGNALS:  # the worker's loop sets its own; pending ones wait
            signal.signal(signum, signal.SIG_DFL)
        use_multiprocess_metrics()
        code = serve(worker)
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)
    return 0  # not reached


def _die_with(parent: int) -> None:
    """The worker is killed when the supervisor dies (kill -9, OOM): no orphan keeps
    serving, or keeps the data directory's lock from ``regmirror gc``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _drain(children: dict[int, int], timeout: float, run_dir: Path) -> int:
    """SIGTERM every worker and wait for them, SIGKILL after ``timeout``."""
    for pid in children:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    status = 0
    while children and time.monotonic() < deadline:
        pid, code = _reap()
        if pid == 0:
            time.sleep(0.05)
            continue
        index = children.pop(pid, None)
        if index is not None:
            _mark_dead(pid, index, run_dir)
        status = max(status, 1 if code else 0)
    for pid in list(children):
        log.error("worker pid %d did not drain in %.0f s: killed", pid, timeout)
        _kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.pop(pid)
        status = 1
    return status


def _reap() -> tuple[int, int]:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0, 0
    return (pid, os.waitstatus_to_exitcode(status)) if pid else (0, 0)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _mark_dead(pid: int, index: int, run_dir: Path) -> None:
    """Its gauges leave the live aggregations (its counters stay counted), and its
    published state the host's view (the others see it gone until it is back)."""
    from prometheus_client import multiprocess

    from regmirror import worker_state

    multiprocess.mark_process_dead(pid, os.environ.get(METRICS_ENV))
    worker_state.forget(run_dir, index, pid)
