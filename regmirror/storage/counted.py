"""The wrapper around the shared store (S3): what every call to it needs, written once.

- Failures are counted by operation.
- Reads have a short deadline (get and stat :data:`READ_DEADLINE`, list
  :data:`LIST_DEADLINE`): S3 answers a small read in milliseconds, so one that has not
  answered by then is an outage, not a slow answer, and the request goes on without it
  rather than waiting out the SDK's timeouts and retries (~12 s when S3 hangs).
- An outage circuit: after a call fails, reads fail at once with
  :class:`StorageUnavailable` for :data:`OUTAGE_BACKOFF` seconds, so every caller falls
  back to what local disk holds (links, blobs) or to an upstream without asking S3
  again. Then one read at a time is let through as a trial (the others still fail at
  once): its failure opens the circuit again, its success closes it. So a hung S3
  costs one request a deadline every few seconds, not every request, and a recovered
  one is used again within seconds. Writes are always tried (a push must not fail on
  an earlier error), and so is :meth:`check` (readiness reports what S3 does now); any
  call that succeeds closes the circuit. With several workers the circuit is the host's
  (:class:`~regmirror.storage.circuit.HostCircuit`): one worker's failure opens it for
  all, one's success closes it for all, and one trial read is made for the host.

Every S3 read on the request path goes through here: this is the one chokepoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from regmirror.storage.circuit import Circuit, LocalCircuit, Turn
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_DEADLINE = 1.0
LIST_DEADLINE = 5.0
OUTAGE_BACKOFF = 2.0


class CountedDriver(Driver):
    def __init__(
        self,
        inner: Driver,
        on_error: Callable[[str], None],
        *,
        read_deadline: float = READ_DEADLINE,
        list_deadline: float = LIST_DEADLINE,
        backoff: float = OUTAGE_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        circuit: Circuit | None = None,
    ):
        """``circuit``: the host's, shared with the other workers; this process's own
        (``backoff``, ``clock``) by default."""
        self.inner = inner
        self.name = inner.name
        self._on_error = on_error
        self._read_deadline = read_deadline
        self._list_deadline = list_deadline
        self._circuit = circuit or LocalCircuit(backoff=backoff, clock=clock)

    @property
    def down(self) -> bool:
        """Whether the last call failed and none has succeeded since."""
        return self._circuit.down

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        return await self._read(
            "get", lambda: self.inner.get(key, limit=limit), self._read_deadline
        )

    async def put(self, key: str, data: bytes) -> None:
        await self._call("put", self.inner.put(key, data))

    async def put_file(self, key: str, source: Path) -> None:
        await self._call("put_file", self.inner.put_file(key, source))

    async def stat(self, key: str) -> int:
        return await self._read("stat", lambda: self.inner.stat(key), self._read_deadline)

    async def list(self, key: str) -> list[str]:
        return await self._read("list", lambda: self.inner.list(key), self._list_deadline)

    async def delete(self, key: str) -> None:
        await self._call("delete", self.inner.delete(key))

    async def check(self) -> None:
        await self._call("check", asyncio.wait_for(self.inner.check(), self._list_deadline))

    async def close(self) -> None:
        await self.inner.close()

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        # Opened right after a stat that went through the circuit; its chunks are
        # bounded by the SDK's read timeout, the fill by its idle timeout.
        if self.down:
            raise StorageUnavailable(f"{self.name}: not asked while it is down")
        try:
            async for chunk in self.inner.reader(key, offset):
                yield chunk
        except StorageUnavailable as exc:
            self._failed("read", exc)
            raise

    async def _read(self, operation: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        turn = self._circuit.admit(deadline)
        if turn is Turn.REFUSE:
            raise StorageUnavailable(f"{self.name}: not asked while it is down")
        try:
            return await self._call(operation, asyncio.wait_for(call(), deadline))
        finally:
            if turn is Turn.TRIAL:
                self._circuit.end_trial()

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        try:
            result = await call
        except TimeoutError as exc:
            error = StorageUnavailable(f"{self.name}: {operation} got no answer in time")
            self._failed(operation, error)
            raise error from exc
        except StorageUnavailable as exc:
            self._failed(operation, exc)
            raise
        except (PathNotFound, TooLarge):
            self._answered()
            raise
        self._answered()
        return result

    def _answered(self) -> None:
        recovery = self._circuit.answered()
        if recovery is not None:
            log.warning(
                "%s answers again after %.0f s; reads ask it again (%d calls failed meanwhile)",
                self.name,
                recovery.seconds,
                recovery.failures,
                extra={"fields": {"event": "s3_recovered", "failed_calls": recovery.failures}},
            )

    def _failed(self, operation: str, error: StorageUnavailable) -> None:
        # Logged when it goes down and when it comes back, not for each call between.
        self._on_error(operation)
        if self._circuit.failed():
            log.warning(
                "%s failed (%s); reads use local copies until it answers",
                self.name,
                error,
                extra={"fields": {"event": "s3_error", "operation": operation}},
            )
