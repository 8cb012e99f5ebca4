"""Giving the heap back to the system after bursts of upload traffic (glibc only).

Upload bodies pass through memory in bounded pieces, but a burst of them (hundreds of
clients sending at once) leaves glibc's heap with freed holes it keeps: measured, 200
uploads each stalled after 1000 KiB left the server ~65 MiB larger after they were gone,
and ``malloc_trim(0)`` took it back to ~11 MiB above where it started. So once uploads
have moved :data:`TRIM_AFTER_BYTES` and then gone quiet for an interval, the heap is
trimmed, once, in a thread. Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 16 * 1024**2
INTERVAL = 1.0  # seconds: how long uploads must be quiet before a trim


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Counts bytes that moved through memory; trims the heap when they go quiet."""

    def __init__(self, *, after_bytes: int = TRIM_AFTER_BYTES, interval: float = INTERVAL):
        self.after_bytes = after_bytes
        self.interval = interval
        self.trims = 0
        self._trim = _malloc_trim()
        self._pending = 0  # bytes moved since the last trim
        self._recent = 0  # bytes moved in the current interval

    def moved(self, nbytes: int) -> None:
        if nbytes > 0:
            self._pending += nbytes
            self._recent += nbytes

    async def tick(self) -> bool:
        """End an interval: trim if enough moved and this interval was quiet."""
        quiet, self._recent = self._recent == 0, 0
        if self._trim is None or not quiet or self._pending < self.after_bytes:
            return False
        self._pending = 0
        await asyncio.to_thread(self._trim)
        self.trims += 1
        return True

    async def run_forever(self) -> None:
        if self._trim is None:
            log.debug("no malloc_trim in this C library: the heap is not trimmed")
            return
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()
