"""Bounded logging of what clients cause: a client must not be able to fill the disk
through the log.

aiohttp logs a malformed request as an ERROR with a traceback whose message holds the
bytes the client sent (garbage after a complete request on a keep-alive connection is
logged whole: 200 × 64 KiB sent made 12.6 MiB of log). :class:`ClientErrorFilter` turns
those into one WARNING line naming the error's class and the peer, never the bytes, and
rate-limits every record of aiohttp's server logger; :class:`RateLimit` is the budget.
"""

from __future__ import annotations

import logging
import time
import traceback

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"  # where aiohttp's request handler logs
MAX_TRACEBACK = 4096  # characters of a traceback kept in the log


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


class ClientErrorFilter(logging.Filter):
    """Installed on aiohttp's server logger (see :func:`install`)."""

    def __init__(self, limit: RateLimit | None = None):
        super().__init__()
        self.limit = limit or RateLimit()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.limit.allow():
            return False
        exc = record.exc_info[1] if record.exc_info else None
        suppressed = self.limit.take_suppressed()
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


def install() -> ClientErrorFilter:
    """Filter aiohttp's server logger (idempotent)."""
    logger = logging.getLogger(SERVER_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, ClientErrorFilter):
            return existing
    installed = ClientErrorFilter()
    logger.addFilter(installed)
    return installed
