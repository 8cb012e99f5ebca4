"""Single-flight fills: one background copy per digest, streamed to every reader as it grows.

A miss on local disk becomes a :class:`Fill`: a task owned by :class:`Fills` (not by any
request, so a client that disconnects cancels nothing; bounded by the fill timeout)
copies the blob from the next tier into ``<data>/fills/<alg>-<hex>.partial``, hashing
as it goes. Every reader streams from that file as it grows, woken by the fill's
progress event, so a slow reader slows nobody and the first byte reaches a waiter
about as soon as it reaches the first caller. When the bytes are complete the digest
and size are checked, the file is fsynced and renamed into the store
(``layout.blob_data``); readers finish from the same inode. A failed fill deletes the
partial file, stores nothing, and makes every reader raise :class:`FillFailed`; the
next fetch starts a new fill.

Across processes sharing the data directory the partial file is the single-flight
token: its owner holds ``flock(LOCK_EX)`` on it for the whole fill. A process that
finds it locked does not fetch; it tails the file until the owner renames it into the
store (done) or drops it (failed). That tailing polls (no cross-process wake-up);
within a process nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import FillFailed
from regmirror.storage.driver import PathNotFound
from regmirror.storage.filesystem import FilesystemDriver

__all__ = ["Fill", "FillFailed", "FillObserver", "FillStats", "Fills", "Source"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 256 * 1024
MIN_SPAN = 2 * 1024 * 1024  # see Fill.windows
PARTIAL_SUFFIX = ".partial"
SIZE_XATTR = "user.regmirror.size"  # lets another process learn the size before the end
TAIL_INTERVAL = 0.05  # seconds between looks at another process's partial file

# (size, chunks from offset): Upstream.open_blob's answer, or any tier's.
Source = Callable[[int], Awaitable[tuple[int, AsyncIterator[bytes]]]]


class FillObserver(Protocol):
    """Hooks for metrics. ``result`` is one of RESULTS (a bounded label)."""

    def fill_started(self, digest: Digest) -> None: ...
    def fill_coalesced(self, digest: Digest) -> None: ...
    def fill_finished(self, digest: Digest, result: str, nbytes: int, seconds: float) -> None: ...


RESULTS = (
    "ok",
    "source_error",
    "digest_mismatch",
    "size_mismatch",
    "timeout",
    "io_error",
    "cancelled",
    "other_process",
    "other_process_failed",
)


@dataclass
class FillStats:
    """A :class:`FillObserver` that counts; the default."""

    started: int = 0
    coalesced: int = 0
    results: Counter[str] = field(default_factory=Counter)
    bytes_filled: int = 0

    def fill_started(self, digest: Digest) -> None:
        self.started += 1

    def fill_coalesced(self, digest: Digest) -> None:
        self.coalesced += 1

    def fill_finished(self, digest: Digest, result: str, nbytes: int, seconds: float) -> None:
        self.results[result] += 1
        self.bytes_filled += nbytes


class _Failure(Exception):
    def __init__(self, result: str, message: str):
        super().__init__(message)
        self.result = result


class Fill:
    """One blob on its way into the local store, readable while it arrives.

    ``await length()`` then ``stream(start, end)``; ``await wait()`` for the stored file.
    Every method raises :class:`FillFailed` once the fill has failed.
    """

    def __init__(self, digest: Digest, partial: Path, final: Path, size: int | None):
        self.digest = digest
        self.partial = partial
        self.final = final
        self._expected = size
        self._size: int | None = None
        self._written = 0
        self._done = False
        self._error: str | None = None
        self._cause: BaseException | None = None
        self._changed = asyncio.Event()

    @classmethod
    def stored(cls, digest: Digest, final: Path, size: int) -> Fill:
        """A fill that has nothing left to do: the blob is already in the store."""
        fill = cls(digest, final, final, size)
        fill._size = fill._written = size
        fill._done = True
        return fill

    @property
    def done(self) -> bool:
        return self._done

    async def length(self) -> int:
        """The blob's size, known once the source has answered (for Content-Length)."""
        await self._until(lambda: self._size is not None)
        assert self._size is not None
        return self._size

    async def wait(self) -> Path:
        """Wait until the blob is verified and stored; its path in the store."""
        await self._until(lambda: self._done)
        return self.final

    async def windows(
        self, start: int = 0, end: int | None = None, *, min_span: int = MIN_SPAN
    ) -> AsyncIterator[tuple[int, int]]:
        """The spans ``[pos, limit)`` of ``[start, end)`` that are in the file, in order, as
        they arrive: each may be read from a descriptor from :meth:`open` (or sent with
        sendfile) as soon as it is yielded. The first span is whatever has arrived; later
        ones are at least ``min_span`` bytes (or the rest), so that a herd of readers
        following the fill makes few large sends rather than many small ones.

        A read that reaches the blob's end holds its last byte back until the digest is
        verified, so a body whose digest turns out wrong never ends cleanly: it raises
        :class:`FillFailed` instead. Cancelling the iteration cancels only this reader.
        """
        size = await self.length()
        end = size if end is None else min(end, size)
        if not 0 <= start <= end:
            raise ValueError(f"invalid range [{start}, {end}) of a {size}-byte blob")
        pos, span = start, 1  # the first span goes as soon as there is a byte
        while pos < end:
            self._raise_if_failed()
            # The last byte is held back until the digest is verified.
            reachable = end if self._done or end < size else size - 1
            if pos >= reachable:
                await self.wait()
                continue
            limit = min(reachable, size if self._done else self._written)
            wanted = min(pos + span, reachable)
            if limit < wanted:
                await self._until(functools.partial(self._past, wanted - 1))
                continue
            yield pos, limit
            pos, span = limit, min_span
        if end == size:
            await self.wait()

    async def open(self) -> int:
        """A read-only descriptor on the blob's bytes (the partial file, or the stored one);
        call it once :meth:`length` has answered, or it waits for the whole fill."""
        try:
            return await asyncio.to_thread(os.open, self.partial, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Renamed into the store (or dropped) since: the final file, once it is there.
            path = await self.wait()
            return await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` or the fill fails; woken by each change, never polling."""
        while True:
            self._raise_if_failed()
            if ready():
                return
            await self._changed.wait()  # _notify() sets this event and installs a new one

    def _past(self, pos: int) -> bool:
        return self._done or self._written > pos

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise FillFailed(self._error, {"digest": str(self.digest)}) from self._cause

    # -- the writer's side (Fills) ---------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _set_size(self, size: int) -> None:
        self._size = size
        self._notify()

    def _advance(self, written: int) -> None:
        if written != self._written:
            self._written = written
            self._notify()

    def _finish(self) -> None:
        assert self._size is not None
        self._written = self._size
        self._done = True
        self._notify()

    def _fail(self, message: str, cause: BaseException | None) -> None:
        self._error = message
        self._cause = cause
        self._notify()


class Fills:
    """The fills in flight, at most one per digest; each owned by a background task.

    ``local`` is the store fills land in; ``timeout`` bounds a whole fill (seconds),
    ``idle_timeout`` the wait for each chunk from the source; ``on_stored(digest, size)``
    is told of each blob a fill put in the store (the local cache's index).
    """

    def __init__(
        self,
        local: FilesystemDriver,
        *,
        timeout: float,
        idle_timeout: float | None = None,
        directory: Path | None = None,
        observer: FillObserver | None = None,
        on_stored: Callable[[Digest, int], None] | None = None,
    ):
        self.local = local
        self.on_stored = on_stored
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        # Same filesystem as the store, so the finished file is renamed, not copied.
        self.directory = directory or local.root / "fills"
        self.observer: FillObserver = observer or FillStats()
        self._inflight: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The writers' own threads: readers' to_thread hops cannot queue ahead of them.
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fill")

    def partial_path(self, digest: Digest) -> Path:
        return self.directory / f"{digest.algorithm}-{digest.hex}{PARTIAL_SUFFIX}"

    async def fetch(self, digest: Digest, source: Source, *, size: int | None = None) -> Fill:
        """The fill of ``digest``: joins the one in flight, else starts one reading
        ``source(0)``, else (already stored) a finished Fill. ``size``, when known (from
        a descriptor), is checked against the source's."""
        fill = self._inflight.get(digest)
        if fill is None:
            key = layout.blob_data(digest)
            try:
                stored: int | None = await self.local.stat(key)
            except PathNotFound:
                stored = None
            fill = self._inflight.get(digest)  # another fetch may have started it meanwhile
            if fill is None:
                if stored is not None:
                    return Fill.stored(digest, self.local.path(key), stored)
                fill = Fill(digest, self.partial_path(digest), self.local.path(key), size)
                self._inflight[digest] = fill
                self.observer.fill_started(digest)
                task = asyncio.create_task(self._run(fill, source), name=f"fill {digest}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return fill
        self.observer.fill_coalesced(digest)
        return fill

    async def close(self) -> None:
        """Cancel the fills in flight (their readers get FillFailed) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.shutdown(wait=False)

    def remove_stale(self) -> int:
        """Delete partial files no live fill holds (left by a crash). Blocking: run it
        in a thread at startup."""
        removed = 0
        for path in self.directory.glob(f"*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a fill in another process
                finally:
                    os.close(fd)  # closing releases the lock
                path.unlink()
                removed += 1
        return removed

    # -- the fill task -----------------------------------------------------------

    async def _run(self, fill: Fill, source: Source) -> None:
        started = time.monotonic()
        result, message = "ok", ""
        cause: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout):
                fd = await _settle(asyncio.to_thread(_claim, fill.partial))
                if fd is None:
                    result = await self._tail(fill)
                else:
                    await self._copy(fill, source, fd)
        except _Failure as exc:
            result, cause, message = exc.result, exc, str(exc)
        except TimeoutError as exc:
            result, cause = "timeout", exc
            message = f"fill of {fill.digest} timed out after {self.timeout:g}s"
        except asyncio.CancelledError as exc:  # Fills.close(): clean up, then stay cancelled
            result, cause, message = "cancelled", exc, f"fill of {fill.digest} was cancelled"
            raise
        except OSError as exc:
            result, cause, message = "io_error", exc, f"fill of {fill.digest}: {exc}"
        except Exception as exc:  # noqa: BLE001 -- any error of the source's fails the fill (UpstreamUnavailable, ...)
            result, cause, message = "source_error", exc, f"fill of {fill.digest} failed: {exc}"
        finally:
            if self._inflight.get(fill.digest) is fill:
                del self._inflight[fill.digest]
            if message:
                log.warning("%s", message)
                fill._fail(message, cause)
            else:
                if self.on_stored is not None and fill._size is not None:
                    self.on_stored(fill.digest, fill._size)  # before any reader is done
                fill._finish()
            nbytes = fill._written if result == "ok" else 0
            self.observer.fill_finished(fill.digest, result, nbytes, time.monotonic() - started)

    async def _copy(self, fill: Fill, source: Source, fd: int) -> None:
        loop = asyncio.get_running_loop()
        stored = False
        try:
            size, chunks = await source(0)
            if fill._expected is not None and size != fill._expected:
                raise _Failure(
                    "size_mismatch", f"source says {size} bytes, descriptor {fill._expected}"
                )
            await _settle(loop.run_in_executor(self._writer, _set_size_xattr, fd, size))
            fill._set_size(size)
            hasher = fill.digest.hasher()
            written = 0
            try:
                while True:
                    async with asyncio.timeout(self.idle_timeout):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    if written + len(chunk) > size:
                        raise _Failure("size_mismatch", f"source sent more than {size} bytes")
                    await _settle(loop.run_in_executor(self._writer, _append, fd, chunk, hasher))
                    written += len(chunk)
                    fill._advance(written)
            finally:
                aclose: Any = getattr(chunks, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
            if written != size:
                raise _Failure("size_mismatch", f"source sent {written} of {size} bytes")
            if hasher.hexdigest() != fill.digest.hex:
                raise _Failure(
                    "digest_mismatch",
                    f"source sent bytes of {fill.digest.algorithm}:"
                    f"{hasher.hexdigest()}, not {fill.digest}",
                )
            await _settle(loop.run_in_executor(self._writer, os.fsync, fd))
            # Renamed while still locked: another process sees the lock free only after.
            await _settle(self.local.move_in(layout.blob_data(fill.digest), fill.partial))
            stored = True
        finally:
            if not stored:
                with contextlib.suppress(FileNotFoundError):
                    fill.partial.unlink()  # before unlocking, so nobody tails a dead file
            os.close(fd)

    async def _tail(self, fill: Fill) -> str:
        """Follow a fill that another process owns until it stores the blob or gives up."""
        for _ in range(int(self.timeout / TAIL_INTERVAL) + 1):
            state = await asyncio.to_thread(_look, fill.partial, fill.final)
            if state.size is not None and fill._size is None:
                fill._set_size(state.size)
            if state.final_size is not None:
                if fill._size is None:
                    fill._set_size(state.final_size)
                return "other_process"
            if state.written is not None:
                fill._advance(state.written)
            if not state.owned:
                raise _Failure(
                    "other_process_failed", f"another process's fill of {fill.digest} failed"
                )
            await asyncio.sleep(TAIL_INTERVAL)
        raise TimeoutError


async def _settle(work: Awaitable[T]) -> T:
    """Await ``work``; if cancelled meanwhile, let it finish first (it may be a thread
    using a file descriptor the caller is about to close), then stay cancelled."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


def _claim(path: Path) -> int | None:
    """Open and lock ``path`` as this fill's partial file; None when another process
    holds it. A leftover file nobody locks (a crash) is taken over and truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its owner renamed or deleted while we opened it
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
    raise OSError(f"could not claim {path}: it keeps being replaced")


def _append(fd: int, chunk: bytes, hasher: Any) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]
    hasher.update(chunk)


def _set_size_xattr(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):  # not every filesystem has user xattrs
        os.setxattr(fd, SIZE_XATTR, str(size).encode())


@dataclass(frozen=True, slots=True)
class _Look:
    size: int | None  # the blob's size, if the owner published it
    written: int | None  # bytes in the partial file
    final_size: int | None  # the stored blob's size, once stored
    owned: bool  # the partial file exists and is still locked by its owner


def _look(partial: Path, final: Path) -> _Look:
    with contextlib.suppress(FileNotFoundError):
        return _Look(None, None, final.stat().st_size, False)
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):  # renamed since we looked
            return _Look(None, None, final.stat().st_size, False)
        return _Look(None, None, None, False)
    try:
        size = None
        with contextlib.suppress(OSError, ValueError):
            size = int(os.getxattr(fd, SIZE_XATTR))
        written = os.fstat(fd).st_size
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            owned = False  # nobody holds it: the owner died (or just finished: checked next)
        except BlockingIOError:
            owned = True
        if not owned:
            with contextlib.suppress(FileNotFoundError):
                return _Look(size, written, final.stat().st_size, False)
        return _Look(size, written, None, owned)
    finally:
        os.close(fd)
