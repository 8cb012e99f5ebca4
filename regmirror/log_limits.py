"""Bounded logging of what clients cause: a client must not be able to fill the disk
through the log.

aiohttp logs a malformed request as an ERROR with a traceback whose message holds the
bytes the client sent (garbage after a complete request on a keep-alive connection is
logged whole: 200 × 64 KiB sent made 12.6 MiB of log). :class:`ClientErrorFilter` turns
those into one WARNING line naming the error's class and the peer, never the bytes, and
rate-limits every record of aiohttp's server logger; :class:`RateLimit` is the budget.

With several workers (``server.workers``) the budget is the host's, not each worker's:
:class:`SharedRateLimit` keeps it in a small file of the supervisor's run directory,
mapped into every worker and changed under its ``flock`` (a few memory accesses, held for
microseconds), on ``CLOCK_MONOTONIC`` (one clock for the host). So N workers log at most
the 10 lines per 10 s one process does, and the line after a pause counts what every
worker suppressed. A worker that cannot have the lock at once (another one stopped while
holding it) decides by its own budget for that record rather than wait in a logging call.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import traceback
from pathlib import Path
from typing import Protocol

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"  # where aiohttp's request handler logs
MAX_TRACEBACK = 4096  # characters of a traceback kept in the log
SHARED_FILE = "log-limit"  # in the run directory
LOCK_TRIES = 50  # non-blocking tries at the shared budget's lock, then the own budget
_STATE = struct.Struct("=qqq")  # window start (ns, CLOCK_MONOTONIC), used, suppressed


class Budget(Protocol):
    def admit(self) -> int | None:
        """None: refused (counted as suppressed); else allowed, and how many events were
        refused since the last one allowed (the count is reset)."""
        ...


class RateLimit:
    """At most ``burst`` events per ``period`` seconds; :meth:`allow` also says how many
    were refused since the last one allowed, so the next line can say so."""

    def __init__(self, *, burst: int = 10, period: float = 10.0):
        self.burst = burst
        self.period = period
        self._window = -period
        self._used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self.period:
            self._window, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count

    def admit(self) -> int | None:
        return self.take_suppressed() if self.allow() else None


class SharedRateLimit:
    """A :class:`RateLimit` of every process that maps ``path`` (made if missing): at
    most ``burst`` events per ``period`` seconds among them all."""

    def __init__(self, path: Path, *, burst: int = 10, period: float = 10.0):
        self.burst = burst
        self.period_ns = int(period * 1e9)
        self._own = RateLimit(burst=burst, period=period)  # while the lock cannot be had
        self._thread = threading.Lock()  # flock does not exclude threads of one process
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _STATE.size:
                os.ftruncate(fd, _STATE.size)  # zeros: no window yet (racing makers agree)
            self._map = mmap.mmap(fd, _STATE.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def admit(self) -> int | None:
        with self._thread:
            if not self._lock():
                return self._own.admit()
            try:
                start, used, suppressed = _STATE.unpack_from(self._map)
                now = time.monotonic_ns()
                if now - start >= self.period_ns:
                    start, used = now, 0
                if used < self.burst:
                    _STATE.pack_into(self._map, 0, start, used + 1, 0)
                    return suppressed
                _STATE.pack_into(self._map, 0, start, used, suppressed + 1)
                return None
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _lock(self) -> bool:
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(0)  # let the holder (microseconds of work) finish
        return False


class ClientErrorFilter(logging.Filter):
    """Installed on aiohttp's server logger (see :func:`install`)."""

    def __init__(self, limit: Budget | None = None):
        super().__init__()
        self.limit: Budget = limit or RateLimit()

    def filter(self, record: logging.LogRecord) -> bool:
        suppressed = self.limit.admit()
        if suppressed is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        more = f" ({suppressed} similar lines suppressed)" if suppressed else ""
        if isinstance(exc, HttpProcessingError):
            # A client's malformed request: its fault, answered with 400; the message of
            # the exception quotes the request, so only its class is named.
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed HTTP request from %s: %s (%d)%s"
            record.args = (peer, type(exc).__name__, exc.code, more)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
            return True
        message = _truncate(record.getMessage(), 512)
        record.msg, record.args = "%s%s", (message, more)
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = _truncate(text, MAX_TRACEBACK)
            record.exc_info = None  # the formatter prints exc_text as it is
        return True


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text) - limit} more]"


def install(run_dir: Path | None = None) -> ClientErrorFilter:
    """Filter aiohttp's server logger (idempotent); ``run_dir``: a worker's run directory,
    where the host's budget is kept (a budget of this process's own without it, or if
    that file cannot be had)."""
    logger = logging.getLogger(SERVER_LOGGER)
    installed = next((f for f in logger.filters if isinstance(f, ClientErrorFilter)), None)
    if installed is None:
        installed = ClientErrorFilter()
        logger.addFilter(installed)
    if run_dir is not None and not isinstance(installed.limit, SharedRateLimit):
        try:
            installed.limit = SharedRateLimit(run_dir / SHARED_FILE)
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "client errors are rate-limited per worker: %s: %s", run_dir / SHARED_FILE, exc
            )
    return installed
