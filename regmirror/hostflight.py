"""Single-flight across the processes that serve one data directory (``server.workers``).

Within a process, identical concurrent upstream requests already share one (the
pull-through's in-memory coalescing, which stays in front of this: it is cheaper). A
herd spread over N workers would still make N; this makes it one for the host.

One lock file per key, in ``<data>/flights/``, named by a SHA-256 of the key (so nothing
a key holds, a repository name or a tag, ever reaches a path). Its ``flock`` is the
token: the process that takes it does the work (asks the upstream, and stores what it
learnt where every worker reads it: a manifest by digest, links, a tag list), then
writes the flight's *outcome* into the lock file before letting go: a small JSON value
(a digest, a size) or the registry error the work raised (its class, message, detail and
headers). The others poll the lock (``LOCK_NB``, backing off to :data:`POLL_MAX`; a
blocking ``flock`` would hold a thread that nothing can cancel) and, once it is free,
answer from the outcome: the same value, or the same error, without asking anyone.

Only the outcome of a flight that ended after the caller began is taken (on
``CLOCK_MONOTONIC``, one clock for every process of the host). That is the in-process
semantics exactly: a caller that joins a flight gets its result; one that comes after
it starts a new one. A caller may take a *value* from longer ago (``fresh``): one that
stays true for a while, as a tag's digest does for its ``tag_ttl``, answers a caller
that began after its flight ended but before the leader recorded it where the caller
looked first (a tag's link is written once its manifest is stored, after the flight).
So an error (an upstream 404, 5xx, timeout) reaches every
request that waited for it and nobody later: it is shared, never cached. A negative cache would
answer 404 for a tag pushed upstream a second later, and the upstream that failed is
asked again by the next request (once for the host), as one process asks it. A flight
whose leader died or was cancelled leaves no outcome: one of its waiters takes the lock
and does the work.

A waiter gives up after ``wait`` seconds (the caller sets it well past what the
upstream's own timeouts allow a leader) and does the work itself: a wedged worker delays
the others, never blocks them.

Lock files are reused by later flights of the same key, and removed once idle for
:data:`IDLE_SECONDS` (by whichever process sweeps, holding the lock; one that then locks
a removed file sees its inode is no longer the path's, and opens the new one), so the
directory holds the keys of the last few minutes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from regmirror import errors, host_lock
from regmirror.errors import RegistryError
from regmirror.logs.throttle import Throttled
from regmirror.settle import settle

log = logging.getLogger(__name__)
T = TypeVar("T")

DIRECTORY = "flights"  # under the data directory
POLL_FIRST = 0.002  # seconds before a waiter first looks at the lock again
POLL_MAX = 0.02  # the longest between two looks (one syscall: cheap)
IDLE_SECONDS = 300.0  # a lock file untouched this long is removed
SWEEP_EVERY = 60.0  # how often a process looks for idle lock files
MAX_RECORD = 64 * 1024  # an outcome is a digest, a size or an error: never near this
MAX_MESSAGE = 2000  # characters of an error message kept in an outcome

# The errors an outcome can carry: ours, built the one way RegistryError is.
_ERRORS: dict[str, type[RegistryError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type)
    and issubclass(cls, RegistryError)
    and cls.__init__ is RegistryError.__init__
}


@dataclass(frozen=True, slots=True)
class _Answer:
    """Another process's flight answered this caller."""

    value: Any


class HostFlights:
    """Cross-process single-flights over lock files in ``directory``."""

    def __init__(self, directory: Path, *, idle: float = IDLE_SECONDS):
        self.directory = directory
        self._idle = idle
        self._swept = float("-inf")
        self._sweeping: asyncio.Task[int] | None = None
        self._broken = Throttled(log)  # a full disk fails every flight: a line a minute

    def path(self, key: Sequence[str]) -> Path:
        return self.directory / f"{_hash(key)}.lock"

    async def run(
        self,
        key: Sequence[str],
        work: Callable[[], Awaitable[T]],
        *,
        encode: Callable[[T], Any],
        decode: Callable[[Any], Awaitable[T | None]],
        wait: float,
        since: float | None = None,
        fresh: float | None = None,
    ) -> T:
        """``work()`` done once for every process of the host asking at once.

        ``encode`` turns its result into the JSON value other processes get; ``decode``
        turns that value back into a result (reading what the work stored), or None when
        it cannot (then this caller does the work). ``since``: when the caller began (on
        ``time.monotonic()``), before it looked for what ``work`` stores: a flight that
        ended since then answers it. ``fresh`` (before ``since``): a value, never an
        error, of a flight that ended since then answers it too (``decode`` says whether
        it still holds).
        """
        began = time.monotonic() if since is None else since
        name = "\0".join(key)
        self._sweep_now_and_then()
        try:
            turn = await self._turn(key, name, began, fresh, wait, decode)
        except OSError as exc:  # a full or read-only disk: no token to take, nobody waits
            self._broken.warning(
                "flights",
                "%s: %s; asking without a single-flight for the host",
                self.directory,
                exc,
            )
            return await work()
        if isinstance(turn, _Answer):
            return turn.value  # type: ignore[no-any-return]
        if turn is None:
            return await work()
        fd = turn  # ours to lead: locked, the path's current file
        try:
            try:
                result = await work()
            except RegistryError as exc:
                await self._publish(fd, _error_record(name, exc))
                raise
            await self._publish(fd, _record(name, {"value": encode(result)}))
            return result
        finally:
            os.close(fd)  # releases the lock: the waiters read the outcome

    async def _turn(
        self,
        key: Sequence[str],
        name: str,
        began: float,
        fresh: float | None,
        wait: float,
        decode: Callable[[Any], Awaitable[Any]],
    ) -> _Answer | int | None:
        """Wait for this key's flight in another process, if one is under way: its answer
        (or its error, raised); else the descriptor of the lock file, locked (this caller
        leads); None when the wait outlasted ``wait`` (this caller asks on its own)."""
        path = self.path(key)
        deadline = time.monotonic() + wait
        while True:
            fd, won, record = await _enter_settled(path)
            try:
                current = True
                if not won:
                    if not await host_lock.poll(fd, deadline, first=POLL_FIRST, most=POLL_MAX):
                        log.warning(
                            "%s: another worker's flight took over %.0f s; asking here",
                            key[0],
                            wait,
                        )
                        return None
                    current, record = await settle(asyncio.to_thread(_look, fd, path))
                outcome = _parse(record, name, began, fresh)
                if outcome is not None:
                    if "error" in outcome:
                        raise _error(outcome)
                    found = await decode(outcome["value"])
                    if found is not None:
                        return _Answer(found)
                if current:
                    led, fd = fd, -1
                    return led
                # Swept while we waited: the lock on a removed file is nobody's token.
            finally:
                if fd >= 0:
                    os.close(fd)

    async def _publish(self, fd: int, record: bytes | None) -> None:
        """Write the flight's outcome for its waiters; when that fails (a full disk) they
        find none, and one of them asks in turn."""
        if record is None:
            return
        try:
            await settle(asyncio.to_thread(_write, fd, record))
        except OSError as exc:
            self._broken.warning(
                "publish", "%s: recording a flight failed: %s", self.directory, exc
            )

    def _sweep_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._swept < SWEEP_EVERY or self._sweeping is not None:
            return
        self._swept = now
        task = asyncio.ensure_future(asyncio.to_thread(sweep, self.directory, self._idle))
        self._sweeping = task

        def done(_: asyncio.Task[int]) -> None:
            self._sweeping = None
            if not task.cancelled() and task.exception() is not None:
                log.warning("sweeping %s failed: %s", self.directory, task.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        if self._sweeping is not None:
            await asyncio.gather(self._sweeping, return_exceptions=True)


def sweep(directory: Path, idle: float) -> int:
    """Remove the lock files nobody has used for ``idle`` seconds; how many. Blocking."""
    cutoff = time.time() - idle
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith(".lock"):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime >= cutoff:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Locked, and still the path's file, still idle: nobody is in a flight.
                st = os.stat(entry.path)
                if st.st_ino == os.fstat(fd).st_ino and st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except BlockingIOError:
                continue  # a flight in progress
            finally:
                os.close(fd)
    return removed


def _hash(key: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(key).encode("utf-8", "surrogatepass")).hexdigest()


def _enter(path: Path) -> tuple[int, bool, bytes]:
    """Open ``path`` (created if need be) and try its lock: (fd, whether we hold the
    lock, the outcome recorded in it when we do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False, b""
        except BaseException:
            os.close(fd)
            raise
        current, record = _look(fd, path)
        if current:
            return fd, True, record
        os.close(fd)  # swept between our open and our lock: open the new one


def _look(fd: int, path: Path) -> tuple[bool, bytes]:
    """Whether the locked ``fd`` is still ``path``'s file, and the outcome it records."""
    record = os.pread(fd, MAX_RECORD, 0)
    try:
        current = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        current = False
    return current, record


def _write(fd: int, record: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


def _record(name: str, outcome: dict[str, Any]) -> bytes:
    return json.dumps({"key": name, "ended": time.monotonic(), **outcome}).encode()


def _error_record(name: str, exc: RegistryError) -> bytes | None:
    """The outcome for an error, None when it cannot be rebuilt elsewhere (then the
    waiters do the work themselves)."""
    if type(exc).__name__ not in _ERRORS:
        return None
    error: dict[str, Any] = {"class": type(exc).__name__, "message": exc.message[:MAX_MESSAGE]}
    try:
        json.dumps(exc.detail)
    except (TypeError, ValueError):
        pass
    else:
        error["detail"] = exc.detail
    if exc.headers:
        error["headers"] = exc.headers
    try:
        return _record(name, {"error": error})
    except (TypeError, ValueError):  # headers that are not strings
        return None


def _parse(
    record: bytes, name: str, began: float, fresh: float | None = None
) -> dict[str, Any] | None:
    """The outcome ``record`` holds when it is of this key's flight that ended after
    ``began``, with a value or an error, or with a value and ended after ``fresh``;
    else None."""
    oldest = began if fresh is None else min(began, fresh)
    try:
        outcome = json.loads(record)
    except ValueError:
        return None
    if (
        not isinstance(outcome, dict)
        or outcome.get("key") != name
        or not isinstance(outcome.get("ended"), float)
        or outcome["ended"] < oldest
    ):
        return None
    if "error" in outcome:
        error = outcome["error"]
        if outcome["ended"] < began:
            return None  # shared with who waited for it, never cached
        if not isinstance(error, dict) or error.get("class") not in _ERRORS:
            return None
        return outcome
    return outcome if "value" in outcome else None


def _error(outcome: dict[str, Any]) -> RegistryError:
    error = outcome["error"]
    headers = error.get("headers")
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        headers = None
    return _ERRORS[error["class"]](
        str(error.get("message", "")), error.get("detail"), headers=headers
    )


async def _enter_settled(path: Path) -> tuple[int, bool, bytes]:
    """:func:`_enter` in a thread; if cancelled meanwhile, the descriptor it opened is
    closed once it returns."""
    task = asyncio.ensure_future(asyncio.to_thread(_enter, path))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None:
            os.close(task.result()[0])
        raise
