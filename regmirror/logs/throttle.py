"""Log lines that an outage would repeat for every request: at most one per key a period.

The first error of a kind is logged at once; the same kind again within ``period``
seconds is only counted, and the next line logged says how many were not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

PERIOD = 60.0


class Throttled:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        period: float = PERIOD,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ):
        self.logger = logger
        self.period = period
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}  # key -> when last logged
        self._skipped: dict[Hashable, int] = {}

    def warning(self, key: Hashable, message: str, *args: Any, **fields: Any) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()  # bounded: keys come from configured upstreams, rarely many
            self._skipped.clear()
        skipped = self._skipped.pop(key, 0)
        self._last[key] = now
        if skipped:
            message += f" ({skipped} more like it in the last %.0f s not logged)"
            args = (*args, now - last if last is not None else self.period)
        self.logger.warning(message, *args, extra={"fields": {**fields, "suppressed": skipped}})
