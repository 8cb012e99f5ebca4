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

**No body ends cleanly before the digest is verified**: whatever range a reader asks
for, its last byte is held back until the whole blob has been hashed and matched.

A fill is budgeted. When the source gives the size, the local cache admits the blob
(reserving its size, so eviction makes room ahead of it) or says it cannot be kept: bigger
than ``cache.max_bytes`` (its low watermark), or than the free space above the floor plus
everything evictable. A write that finds the disk full (ENOSPC) makes the cache evict and
is retried; when nothing more can be evicted the fill goes on without the disk. Either way
a blob that cannot be kept is *streamed through*: its bytes pass through a bounded window
in memory (:data:`WINDOW`) to the readers that are following the fill, it is verified as
usual, and nothing is stored (counted as ``stream_through``). Memory, not an unlinked
temp file, because the point is not to need the disk at all. The window keeps the newest
``WINDOW`` bytes even when nobody needs them, so a request that joins soon after still
shares the one upstream GET; a request that needs bytes already gone (a late joiner, a
Range behind the window) gets a replay: a fill, never kept, that streams the blob through
again from the start (it must be hashed whole to be verified; late readers share the
replay in flight while its window still holds what they need). A reader that holds the
window full for longer than the idle timeout is dropped (its body is cut) rather than
stalling the others.

Across processes sharing the data directory the partial file is the single-flight
token: its owner holds ``flock(LOCK_EX)`` on it for the whole fill. A process that
finds it locked does not fetch; it tails the file until the owner renames it into the
store (done) or drops it (failed); one that claims the file just after its owner
renamed it finds the blob stored instead (the owner renames before it unlocks). A
fleet peer's request reaching a process that does not fill the blob follows another
process's fill the same way (:meth:`Fills.follow`). That tailing polls (no
cross-process wake-up); within a process nothing polls. A fill another process streams
through never reaches the shared file past where it stopped writing: that process
relays it (:mod:`regmirror.fill_relay`), and the tailing process, told so by a marker
it finds while it tails, streams the rest from it into a window of its own, so a herd
spread over every worker still makes one upstream GET, with nothing more on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import FillFailed
from regmirror.eviction import BlobCache, Reservation
from regmirror.logs import served
from regmirror.logs.served import Tier
from regmirror.settle import settle
from regmirror.storage.driver import PathNotFound
from regmirror.storage.filesystem import FilesystemDriver

if TYPE_CHECKING:
    from regmirror.fill_relay import FillRelay, Relayed

__all__ = [
    "Fill",
    "FillFailed",
    "FillObserver",
    "FillStats",
    "Fills",
    "Origin",
    "Source",
    "Span",
    "holds_claim",
]

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MIN_SPAN = 2 * 1024 * 1024  # see Fill.parts
WINDOW = 16 * 1024 * 1024  # bytes of a streamed-through blob held in memory (plus a chunk)
STALL = 60.0  # seconds a streamed-through fill waits for a reader holding its window full
PARTIAL_SUFFIX = ".partial"
SIZE_XATTR = "user.regmirror.size"  # lets another process learn the size before the end
TAIL_INTERVAL = 0.05  # seconds between looks at another process's partial file
# Seconds a fill streamed through stays relayable once done, for the other workers'
# waiters that joined it but had not found its relay yet (a tail's look or two).
RELAY_GRACE = 1.0
CLAIM_ATTEMPTS = 5  # tries at locking a partial file that keeps changing under us

# Set in the task of a fill that holds its partial file's lock (see holds_claim).
_claimed: ContextVar[bool] = ContextVar("regmirror_fill_claimed", default=False)


def holds_claim() -> bool:
    """Whether the caller runs in a fill that holds its blob's partial-file lock, the
    single-flight token of every process on the data directory: no other process (worker)
    fills that blob now. False in a replay (a blob streamed through again, never claimed)
    and outside fills. A fleet source uses it to tell a lease of a dead worker of its own
    host from a live one's (:mod:`regmirror.fleet.coordinator`)."""
    return _claimed.get()


# (size, chunks from offset): Upstream.open_blob's answer, or any tier's.
Source = Callable[[int], Awaitable[tuple[int, AsyncIterator[bytes]]]]


class FillObserver(Protocol):
    """Hooks for metrics. ``result`` is one of RESULTS (a bounded label)."""

    def fill_started(self, digest: Digest) -> None: ...
    def fill_coalesced(self, digest: Digest) -> None: ...
    def fill_finished(self, digest: Digest, result: str, nbytes: int, seconds: float) -> None: ...
    def fill_streamed_through(self, digest: Digest, reason: str) -> None: ...


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
    "stream_through",  # verified and served, not kept (see STREAM_THROUGH_REASONS)
)
STREAM_THROUGH_REASONS = ("over_budget", "disk_full", "late")


@dataclass
class FillStats:
    """A :class:`FillObserver` that counts; the default."""

    started: int = 0
    coalesced: int = 0
    results: Counter[str] = field(default_factory=Counter)
    bytes_filled: int = 0
    streamed_through: Counter[str] = field(default_factory=Counter)

    def fill_started(self, digest: Digest) -> None:
        self.started += 1

    def fill_coalesced(self, digest: Digest) -> None:
        self.coalesced += 1

    def fill_finished(self, digest: Digest, result: str, nbytes: int, seconds: float) -> None:
        self.results[result] += 1
        self.bytes_filled += nbytes

    def fill_streamed_through(self, digest: Digest, reason: str) -> None:
        self.streamed_through[reason] += 1


@dataclass
class Origin:
    """Where a fill reads from: its tier (for the access log) and, for the fill's own log
    lines, which one. A source that decides only once it opens (S3 if it holds the blob,
    else the upstream) updates it with :meth:`reading`."""

    tier: Tier = "fill"
    name: str = "its source"

    def reading(self, tier: Tier, name: str) -> None:
        self.tier, self.name = tier, name


class _Failure(Exception):
    def __init__(self, result: str, message: str):
        super().__init__(message)
        self.result = result


class _Gone(Exception):
    """The bytes a reader needs are no longer held by this fill (streamed past)."""


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes ``[pos, limit)`` of the blob, to be read from ``file`` (sendfile, pread)."""

    file: BinaryIO
    pos: int
    limit: int


class Fill:
    """One blob on its way from another tier, readable while it arrives.

    ``await length()`` then iterate ``parts(start, end)``; ``await wait()`` for the
    stored file. Every method raises :class:`FillFailed` once the fill has failed.

    A fill is *kept* (its bytes go to the partial file, then into the store) or, when
    the blob cannot be kept (bigger than the budget, or the disk is full and nothing is
    left to evict), *streamed through*: bytes ``[0, file_end)`` are in the partial file
    (what was written before the disk filled up; 0 when the fill never wrote), later ones
    pass through a bounded window in memory (see :data:`WINDOW`) and are dropped once
    every reader has them.
    """

    def __init__(
        self,
        digest: Digest,
        partial: Path,
        final: Path,
        size: int | None,
        *,
        replay: Callable[[int], Fill] | None = None,
        origin: Origin | None = None,
    ):
        self.digest = digest
        self.origin = origin or Origin()
        self.partial = partial
        self.final = final
        self._expected = size
        self._size: int | None = None
        self._written = 0
        self._done = False
        self._error: str | None = None
        self._cause: BaseException | None = None
        self._changed = asyncio.Event()
        # A fill of the same blob from the start, for readers streamed past (its argument:
        # the first byte the reader needs).
        self._replay = replay
        # Streaming through (file_end is not None): the window in memory.
        self._file_end: int | None = None
        self._window: deque[bytes] = deque()  # the source's chunks, as they came
        self._window_start = 0  # the blob offset of the window's first byte
        self._window_end = 0
        # Readers that may still need bytes from the window -> the next byte they need,
        # and where each reader's range ends (once the size is known).
        self._readers: dict[int, int] = {}
        self._ends: dict[int, int] = {}
        self._behind: set[int] = set()  # readers dropped for holding the window too long
        self._next_reader = 0
        self._moved = asyncio.Event()
        # The inode of the partial file this process holds locked for the fill (None:
        # a replay, or another process's fill followed): how other workers name it.
        self._inode: int | None = None

    @classmethod
    def stored(cls, digest: Digest, final: Path, size: int) -> Fill:
        """A fill that has nothing left to do: the blob is already in the store."""
        fill = cls(digest, final, final, size, origin=Origin("local", "local disk"))
        fill._size = fill._written = size
        fill._done = True
        return fill

    @property
    def done(self) -> bool:
        """Verified: every byte arrived and matched the digest."""
        return self._done

    @property
    def kept(self) -> bool:
        """Its bytes go into the store (False: streamed through, never stored)."""
        return self._file_end is None

    @property
    def file_end(self) -> int | None:
        """Streamed through: where the bytes in the partial file end (None: kept)."""
        return self._file_end

    @property
    def written(self) -> int:
        """How many bytes of the blob have arrived so far."""
        return self._written

    @property
    def size(self) -> int | None:
        """The blob's size; None until the source has said (:meth:`length` waits)."""
        return self._size

    async def length(self) -> int:
        """The blob's size, known once the source has answered (for Content-Length)."""
        await self._until(lambda: self._size is not None)
        assert self._size is not None
        return self._size

    async def wait(self) -> Path:
        """Wait until the blob is verified and stored; its path in the store. A fill
        streamed through stores nothing: FillFailed."""
        await self._until(lambda: self._done)
        if not self.kept:
            raise FillFailed(
                f"blob {self.digest} was streamed through, not kept", {"digest": str(self.digest)}
            )
        return self.final

    async def parts(
        self, start: int = 0, end: int | None = None, *, min_span: int = MIN_SPAN
    ) -> AsyncIterator[Span | bytes]:
        """``[start, end)`` of the blob, in order, as it arrives: :class:`Span` for bytes
        in a file (send them with sendfile), ``bytes`` for bytes that pass through memory.
        The first span is whatever has arrived; later ones are at least ``min_span`` bytes
        (or the rest), so that a herd of readers makes few large sends.

        **The last byte of the range is held back until the digest is verified**,
        whatever the range: a body that comes from a fill whose bytes turn out wrong
        never ends cleanly, it raises :class:`FillFailed` instead. Cancelling the
        iteration cancels only this reader.
        """
        reader = self._join(start)
        file: BinaryIO | None = None
        pos = start
        try:
            size = await self.length()
            end = size if end is None else min(end, size)
            if not 0 <= start <= end:
                raise ValueError(f"invalid range [{start}, {end}) of a {size}-byte blob")
            self._ends[reader] = end
            span = 1  # the first span goes as soon as there is a byte
            while pos < end:
                self._check(reader)
                if self._file_end is not None and end <= self._file_end:
                    self._leave(reader)  # what it still needs is in the file: no window
                reachable = end if self._done else end - 1
                if pos >= reachable:
                    if self._file_end is not None and self._file_end <= pos < self._written:
                        # Only the held-back last byte is left: take it out of the window
                        # now, so that waiting for the digest holds nobody else back.
                        if pos < self._window_start:
                            raise _Gone
                        tail = self._from_window(pos, end)
                        self._leave(reader)
                        await self._until(lambda: self._done)
                        yield tail
                        pos = end
                        continue
                    await self._next_change()  # the digest check, or more bytes
                    continue
                if self._file_end is None or pos < self._file_end:
                    boundary = size if self._file_end is None else self._file_end
                    have = size if self._done and self._file_end is None else self._written
                    limit = min(reachable, have, boundary)
                    if limit < min(pos + span, reachable, boundary):
                        await self._next_change()
                        continue
                    if file is None:
                        file = await self._open_file()
                    yield Span(file, pos, limit)
                    span = min_span
                elif pos < self._window_start:
                    raise _Gone
                else:
                    limit = min(reachable, self._written)
                    if limit <= pos:
                        await self._next_change()
                        continue
                    passing = self._from_window(pos, limit)
                    limit = pos + len(passing)
                    yield passing
                pos = limit
                if reader in self._readers:
                    self._readers[reader] = pos
                    self._moved.set()
                if self._file_end is not None:
                    self._trim(self._window_end)
            await self._until(lambda: self._done)  # an empty range, too, waits for it
        except _Gone:
            if self._replay is None:
                raise FillFailed(
                    f"blob {self.digest} streamed past", {"digest": str(self.digest)}
                ) from None
            self._leave(reader)
            async for part in self._replay(pos).parts(pos, end, min_span=min_span):
                yield part
        finally:
            self._leave(reader)
            self._ends.pop(reader, None)
            self._behind.discard(reader)
            if file is not None:
                file.close()

    async def open(self) -> int:
        """A read-only descriptor on the blob's bytes (the partial file, or the stored one);
        call it once :meth:`length` has answered, or it waits for the whole fill."""
        try:
            return await asyncio.to_thread(os.open, self.partial, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Renamed into the store (or dropped) since: the final file, once it is there.
            path = await self.wait()
            return await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)

    async def _open_file(self) -> BinaryIO:
        try:
            fd = await self.open()
        except FillFailed:
            if self._error is not None:
                raise
            raise _Gone from None  # streamed through, and its partial file is gone
        return os.fdopen(fd, "rb")

    def _join(self, start: int) -> int:
        self._next_reader += 1
        self._readers[self._next_reader] = start
        return self._next_reader

    def _leave(self, reader: int) -> None:
        """``reader`` needs nothing more from the window."""
        if self._readers.pop(reader, None) is not None:
            self._moved.set()

    def _check(self, reader: int) -> None:
        self._raise_if_failed()
        if reader in self._behind:
            raise FillFailed(
                f"a reader of {self.digest} fell too far behind the fill",
                {"digest": str(self.digest)},
            )

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` or the fill fails; woken by each change, never polling."""
        while True:
            self._raise_if_failed()
            if ready():
                return
            await self._changed.wait()  # _notify() sets this event and installs a new one

    async def _next_change(self) -> None:
        await self._changed.wait()

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

    def _stream_through(self) -> None:
        """From now on bytes pass through memory: nothing more is written to the file."""
        self._file_end = self._window_start = self._window_end = self._written
        for reader, end in self._ends.items():
            if end <= self._file_end:
                self._readers.pop(reader, None)  # all it needs is in the file
        self._notify()

    def _stream_through_from(self, file_end: int) -> None:
        """Another process streams this fill through from ``file_end`` on (its partial
        file holds the bytes before): the rest arrives through the window."""
        self._written = file_end
        self._stream_through()

    async def _pass(self, chunk: bytes, stall: float) -> None:
        """Add ``chunk`` to the window, first waiting (at most ``stall`` seconds) for
        readers that hold more than :data:`WINDOW` bytes back; those still behind after
        it are dropped (their bodies are cut), so one stuck client cannot stop a herd."""
        while self._readers and self._written - self._held_from() > WINDOW:
            self._moved.clear()
            try:
                async with asyncio.timeout(stall):
                    await self._moved.wait()
            except TimeoutError:
                for reader, pos in list(self._readers.items()):
                    if pos < self._written - WINDOW:
                        del self._readers[reader]
                        self._behind.add(reader)
                        log.warning("a reader of %s stalled a stream-through: cut", self.digest)
                self._notify()
        self._window.append(chunk)
        self._window_end += len(chunk)
        self._trim(self._window_end)

    def _held_from(self) -> int:
        """The first byte the window must keep for the readers (a reader still in the
        file needs the window from its start)."""
        return max(min(self._readers.values()), self._window_start)

    def _trim(self, written: int) -> None:
        """Drop window bytes that no reader needs and that are older than the newest
        :data:`WINDOW` (kept for requests that join late)."""
        needed = min(self._readers.values(), default=written)
        keep_from = min(needed, written - WINDOW)
        while self._window and self._window_start + len(self._window[0]) <= keep_from:
            self._window_start += len(self._window.popleft())

    def _from_window(self, pos: int, limit: int) -> bytes:
        """Bytes ``[pos, limit)`` from the window, at most to the end of one chunk (a
        whole chunk goes out as it is, uncopied). Readers are mostly near the newest."""
        end = self._window_end
        for chunk in reversed(self._window):
            start = end - len(chunk)
            if start <= pos:
                return chunk[pos - start : min(limit, end) - start]
            end = start
        raise AssertionError(f"byte {pos} is not in the window")

    def _finish(self) -> None:
        assert self._size is not None
        self._written = self._size
        self._done = True
        self._notify()

    def _fail(self, message: str, cause: BaseException | None) -> None:
        self._error = message
        self._cause = cause
        self._window.clear()
        self._notify()


class Fills:
    """The fills in flight, at most one per digest; each owned by a background task.

    ``local`` is the store fills land in; ``timeout`` bounds a whole fill (seconds),
    ``idle_timeout`` the wait for each chunk from the source; ``on_stored(digest, size)``
    is told of each blob a fill put in the store (the local cache's index); ``cache``
    is that cache: it admits a fill (reserving its size in the budget, evicting ahead of
    it) or makes it stream through, and frees space when a write finds the disk full;
    ``relay`` (with several workers): how a fill streamed through here reaches the other
    workers' waiters, and theirs reaches ours (:mod:`regmirror.fill_relay`).
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
        cache: BlobCache | None = None,
        relay: FillRelay | None = None,
    ):
        self.local = local
        self.relay = relay
        self.on_stored = on_stored
        self.cache = cache
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        # Same filesystem as the store, so the finished file is renamed, not copied.
        self.directory = directory or local.root / "fills"
        self.observer: FillObserver = observer or FillStats()
        self._inflight: dict[Digest, Fill] = {}
        self._replays: dict[Digest, Fill] = {}  # the latest replay of each blob (see _replay)
        # Fills streamed through, done, still relayed for RELAY_GRACE (see relayable).
        self._relaying: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The writers' own threads: readers' to_thread hops cannot queue ahead of them.
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fill")

    async def follow(self, digest: Digest) -> Fill | None:
        """The fill of ``digest`` in flight on this host, never a new one: this process's,
        else another process's (another worker's), followed through its partial file as
        this process's own waiters would follow it; None when no process fills it. For
        fleet peers, whose request may reach any worker of the host."""
        fill = self._inflight.get(digest)
        if fill is not None or not await asyncio.to_thread(_locked, self.partial_path(digest)):
            return fill
        fill = self._inflight.get(digest)  # started here meanwhile
        if fill is None:
            fill = Fill(
                digest,
                self.partial_path(digest),
                self.local.path(layout.blob_data(digest)),
                None,
                origin=Origin("fill", "another process"),
            )
            self._inflight[digest] = fill
            self._start(fill, None, claim=False)
        return fill

    def relayable(self, digest: Digest, inode: int) -> Fill | None:
        """The fill of ``digest`` this process streams through from its partial file
        ``inode``, for another worker's waiters (:mod:`regmirror.fill_relay`): in flight,
        or done within the last :data:`RELAY_GRACE` seconds."""
        fill = self._inflight.get(digest)
        if fill is not None and fill._inode == inode and not fill.kept and not fill._error:
            return fill
        fill = self._relaying.get(digest)
        if fill is None or fill._inode != inode or fill._error:
            return None
        # Done: its partial file is gone. One at that path with the same inode number is
        # a new fill's (the number reused), whose bytes the asker read: not this fill.
        with contextlib.suppress(OSError):
            if fill.partial.stat().st_ino == inode:
                return None
        return fill

    def running(self) -> list[Fill]:
        """Every fill this process runs now."""
        return list(self._inflight.values())

    def partial_path(self, digest: Digest) -> Path:
        return self.directory / f"{digest.algorithm}-{digest.hex}{PARTIAL_SUFFIX}"

    async def fetch(
        self,
        digest: Digest,
        source: Source,
        *,
        size: int | None = None,
        origin: Origin | None = None,
    ) -> Fill:
        """The fill of ``digest``: joins the one in flight, else starts one reading
        ``source(0)``, else (already stored) a finished Fill. ``size``, when known (from
        a descriptor), is checked against the source's; ``origin`` says what ``source``
        reads (for the logs)."""
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
                fill = Fill(
                    digest,
                    self.partial_path(digest),
                    self.local.path(key),
                    size,
                    replay=functools.partial(self._replay, digest, source, size, origin),
                    origin=origin,
                )
                self._inflight[digest] = fill
                self._start(fill, source, claim=True)
                return fill
        self.observer.fill_coalesced(digest)
        served.mark_waited()
        return fill

    def _replay(
        self, digest: Digest, source: Source, size: int | None, origin: Origin | None, start: int
    ) -> Fill:
        """A fill streaming ``digest`` through again from the start, for a reader that
        joined a streamed-through fill after the bytes it needs (from ``start``) had
        passed: the replay in flight if its window still holds ``start``, else a new one
        (not in the single-flight map: it is never kept)."""
        fill = self._replays.get(digest)
        if fill is None or fill.done or fill._error is not None or fill._window_start > start:
            fill = Fill(
                digest,
                self.partial_path(digest),
                self.local.path(layout.blob_data(digest)),
                size,
                replay=functools.partial(self._replay, digest, source, size, origin),
                origin=origin,
            )
            self._replays[digest] = fill
            self._start(fill, source, claim=False)
        else:
            self.observer.fill_coalesced(digest)
        return fill

    def _start(self, fill: Fill, source: Source | None, *, claim: bool) -> None:
        """Run ``fill`` in a task of its own: claimed (its partial file locked, or else
        another process's fill followed), or not (a replay), or, without a ``source``,
        only following another process's fill."""
        task = asyncio.create_task(self._run(fill, source, claim), name=f"fill {fill.digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the fills in flight (their readers get FillFailed) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fill in list(self._relaying.values()):
            self._end_relay(fill)
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

    async def _run(self, fill: Fill, source: Source | None, claim: bool) -> None:
        started = time.monotonic()
        result, message = "ok", ""
        cause: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout):
                fd = await settle(asyncio.to_thread(_claim, fill.partial)) if claim else None
                if source is None or (claim and fd is None):
                    # Another process's fill (a worker's): following its file is joining
                    # a fill in flight, so the host's metrics count one fill, however
                    # many workers the herd reached.
                    self.observer.fill_coalesced(fill.digest)
                    fill.origin = Origin("fill", "another process")
                    result = await self._tail(fill)
                elif (
                    fd is not None
                    and (size := await settle(_stored_meanwhile(fill, fd))) is not None
                ):
                    # Another process stored it between our look at the store and our
                    # claim (it renames before it unlocks): nothing to fetch.
                    self.observer.fill_coalesced(fill.digest)
                    fill.origin = Origin("fill", "another process")
                    fill._set_size(size)
                    result = "other_process"
                else:
                    self.observer.fill_started(fill.digest)
                    _claimed.set(fd is not None)  # this task's context only
                    if fd is not None:
                        fill._inode = os.fstat(fd).st_ino
                    await self._copy(fill, source, fd)
                    if not fill.kept:
                        result = "stream_through"
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
            if self._replays.get(fill.digest) is fill:
                del self._replays[fill.digest]
            seconds = time.monotonic() - started
            if message:
                _log_failed(fill, result, message, cause, seconds)
                fill._fail(message, cause)
            else:
                _log_finished(fill, result, seconds)
                if self.on_stored is not None and fill._size is not None and fill.kept:
                    self.on_stored(fill.digest, fill._size)  # before any reader is done
                fill._finish()
            if self.relay is not None and fill._inode is not None and not fill.kept:
                if message:
                    self._end_relay(fill)
                else:  # a worker that joined it may look for its relay only now
                    self._relaying[fill.digest] = fill
                    asyncio.get_running_loop().call_later(RELAY_GRACE, self._end_relay, fill)
            nbytes = fill._written if result == "ok" else 0
            self.observer.fill_finished(fill.digest, result, nbytes, seconds)

    async def _copy(self, fill: Fill, source: Source, fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        stored = False
        reservation: Reservation | None = None
        try:
            size, chunks = await source(0)
            if fill._expected is not None and size != fill._expected:
                raise _Failure(
                    "size_mismatch", f"source says {size} bytes, descriptor {fill._expected}"
                )
            if fd is None:
                self._streaming_through(fill, "late")
            elif (reason := await self._admit(size)) is not None:
                self._streaming_through(fill, reason)
            else:
                reservation = self.cache.reserve(size) if self.cache is not None else None
                await settle(loop.run_in_executor(self._writer, _set_size_xattr, fd, size))
            fill._set_size(size)
            log.info(
                "fill %s started from %s: %d bytes%s",
                fill.digest,
                fill.origin.name,
                size,
                "" if fill.kept else ", streaming through (not kept)",
                extra={"fields": _fields(fill, "fill_started", size=size)},
            )
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
                    if fill.kept:
                        assert fd is not None
                        if not await self._write(fd, chunk, written, hasher, size):
                            await settle(
                                loop.run_in_executor(self._writer, os.ftruncate, fd, written)
                            )
                            self._streaming_through(fill, "disk_full")
                    if not fill.kept:
                        await fill._pass(chunk, self.idle_timeout or STALL)
                        await settle(loop.run_in_executor(self._writer, hasher.update, chunk))
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
            if fill.kept:
                assert fd is not None
                stored = await self._store(fill, fd)
        finally:
            if reservation is not None:
                reservation.release()
            if fd is not None:
                if not stored:
                    with contextlib.suppress(FileNotFoundError):
                        fill.partial.unlink()  # before unlocking, so nobody tails a dead file
                os.close(fd)

    async def _store(self, fill: Fill, fd: int) -> bool:
        """Move the verified partial file into the store. A disk that fills up now (the
        fsync, a new shard directory) does not fail the fill: its readers finish from the
        file they have open, and the blob streams through."""
        loop = asyncio.get_running_loop()
        try:
            await settle(loop.run_in_executor(self._writer, os.fsync, fd))
            # Renamed while still locked: another process sees the lock free only after.
            await settle(self.local.move_in(layout.blob_data(fill.digest), fill.partial))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._streaming_through(fill, "disk_full")
            return False
        return True

    async def _admit(self, size: int) -> str | None:
        """Why a blob of ``size`` bytes cannot be kept; None when it can."""
        return None if self.cache is None else await self.cache.admit(size)

    async def _write(self, fd: int, chunk: bytes, offset: int, hasher: Any, size: int) -> bool:
        """Write ``chunk`` at ``offset`` (and hash it); when the disk is full, evict and
        try again. False when nothing more can be evicted: the caller streams through."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await settle(
                    loop.run_in_executor(self._writer, _write_at, fd, chunk, offset, hasher)
                )
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                freed = await self.cache.make_room(size - offset) if self.cache else 0
                log.warning(
                    "disk full at byte %d of a %d-byte fill: evicted %d bytes", offset, size, freed
                )
                if freed <= 0:
                    return False

    def _end_relay(self, fill: Fill) -> None:
        """``fill`` is no longer relayed: its marker goes (a symlink in a temporary
        directory: done in the loop, as publishing it is)."""
        if self._relaying.get(fill.digest) is fill:
            del self._relaying[fill.digest]
        if self.relay is not None and fill._inode is not None:
            self.relay.withdraw(fill.digest, fill._inode)

    def _streaming_through(self, fill: Fill, reason: str) -> None:
        log.info("%s streams through without being kept (%s)", fill.digest, reason)
        fill._stream_through()
        self.observer.fill_streamed_through(fill.digest, reason)
        if self.relay is not None and fill._inode is not None:
            # The other workers tailing the partial file stream the rest from here.
            # Blocking, but a symlink in a temporary directory, once per such fill.
            self.relay.publish(fill.digest, fill._inode)

    async def _tail(self, fill: Fill) -> str:
        """Follow a fill that another process owns until it stores the blob or gives up.

        One fill is followed: the partial file first seen (its inode). A file at the same
        path later is another fill (the followed one failed and the path was claimed
        again), and a stored blob that is not the followed file renamed was stored by
        another fill: either way this one failed, since its readers may have sent bytes
        of the file that failed its digest check."""
        followed: int | None = None
        tried: tuple[Path, int] | None = None  # the relay last asked (it said no)
        seen: int | None = None  # the partial file's size at the last look
        for _ in range(int(self.timeout / TAIL_INTERVAL) + 1):
            state = await asyncio.to_thread(_look, fill.partial, fill.final)
            if state.inode is not None:
                if followed is None:
                    followed = state.inode
                elif state.inode != followed:
                    raise _Failure(
                        "other_process_failed",
                        f"another process's fill of {fill.digest} failed and started again",
                    )
            if state.size is not None and fill._size is None:
                fill._set_size(state.size)
            if state.final_size is not None:
                if followed is not None and state.final_inode != followed:
                    raise _Failure(
                        "other_process_failed",
                        f"another process's fill of {fill.digest} failed; another stored it",
                    )
                if fill._size is None:
                    fill._set_size(state.final_size)
                return "other_process"
            if state.written is not None:
                fill._advance(state.written)
            stalled = state.written is not None and state.written == seen
            seen = state.written
            # Not growing, or never to be kept (no size published), or gone unstored: a
            # fill streamed through (relayed while it runs, and for a moment after)?
            if self.relay is not None and (stalled or not state.size or not state.owned):
                found = await asyncio.to_thread(self.relay.lookup, fill.digest)
                # Another fill's relay than the one whose file was read would mix their
                # bytes; with nothing read, any fill of the digest (the same bytes) does.
                same = found is not None and found[1] == (followed or found[1])
                if found is not None and same and found != tried:
                    tried = found
                    relayed = await self.relay.connect(found[0], fill.digest, found[1])
                    if relayed is not None:
                        return await self._relayed(fill, relayed)
            if not state.owned:
                raise _Failure(
                    "other_process_failed", f"another process's fill of {fill.digest} failed"
                )
            await asyncio.sleep(TAIL_INTERVAL)
        raise TimeoutError

    async def _relayed(self, fill: Fill, relayed: Relayed) -> str:
        """Follow a fill another process streams through: the bytes past its partial
        file come over ``relayed`` into this fill's own window. Complete means verified:
        the other process sends the last byte only then."""
        size = relayed.size
        try:
            if fill._size is None:
                fill._set_size(size)
            elif fill._size != size:
                raise _Failure(
                    "other_process_failed", f"another process relays {size} bytes of {fill.digest}"
                )
            fill._stream_through_from(relayed.file_end)
            written = relayed.file_end
            idle = 2 * (self.idle_timeout or STALL)  # past the filler's own wait for its source
            while written < size:
                async with asyncio.timeout(idle):
                    chunk = await relayed.reader.read(CHUNK)
                if not chunk or written + len(chunk) > size:
                    raise _Failure(
                        "other_process_failed",
                        f"another process's fill of {fill.digest} failed while streaming through",
                    )
                await fill._pass(chunk, self.idle_timeout or STALL)
                written += len(chunk)
                fill._advance(written)
        finally:
            relayed.close()
        return "other_process"


def _fields(fill: Fill, event: str, **more: Any) -> dict[str, Any]:
    """A fill's log line as fields (``log.format: json``)."""
    return {"event": event, "digest": str(fill.digest), "source": fill.origin.name, **more}


def _log_finished(fill: Fill, result: str, seconds: float) -> None:
    nbytes = fill._size or 0
    how = {"stream_through": ", streamed through (not kept)", "other_process": ""}.get(result, "")
    log.info(
        "fill %s finished from %s: %d bytes in %.2f s%s",
        fill.digest,
        fill.origin.name,
        nbytes,
        seconds,
        how,
        extra={
            "fields": _fields(
                fill, "fill_finished", result=result, bytes=nbytes, seconds=round(seconds, 3)
            )
        },
    )


def _log_failed(
    fill: Fill, result: str, message: str, cause: BaseException | None, seconds: float
) -> None:
    if cause is not None and str(cause):  # without the "fill of ..." a client is told
        message = str(cause)
    log.warning(
        "fill %s failed from %s after %d bytes in %.2f s (%s): %s",
        fill.digest,
        fill.origin.name,
        fill._written,
        seconds,
        result,
        message,
        extra={
            "fields": _fields(
                fill,
                "fill_failed",
                result=result,
                bytes=fill._written,
                seconds=round(seconds, 3),
                error=message,
            )
        },
    )


def _claim(path: Path) -> int | None:
    """Open and lock ``path`` as this fill's partial file; None when another process
    holds it. A leftover file nobody locks (a crash) is taken over and truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(CLAIM_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if _locked(path):
                return None
            continue  # only another process's passing look (_locked, _look) held it
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its owner renamed or deleted while we opened it
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
    raise OSError(f"could not claim {path}: it keeps changing")


def _locked(path: Path) -> bool:
    """Whether a fill (of any process) holds ``path`` locked: a shared lock cannot be
    had. Taking it for an instant makes a claim at that instant fail, hence _claim's
    second look."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock
    return False


async def _stored_meanwhile(fill: Fill, fd: int) -> int | None:
    """With ``fill``'s partial file just claimed: the size of the blob if it is in the
    store already (its partial file is then dropped and ``fd`` closed), else None."""

    def look() -> int | None:
        try:
            size = fill.final.stat().st_size
        except OSError:  # not there (or unreadable: the copy that follows will tell)
            return None
        with contextlib.suppress(FileNotFoundError):
            fill.partial.unlink()  # before unlocking, so nobody tails a dead file
        os.close(fd)
        return size

    return await asyncio.to_thread(look)


def _write_at(fd: int, chunk: bytes, offset: int, hasher: Any) -> None:
    """Write all of ``chunk`` at ``offset``, then hash it: a write that fails (ENOSPC)
    hashes nothing and can be retried at the same offset."""
    view = memoryview(chunk)
    while view:
        offset += (n := os.pwrite(fd, view, offset))
        view = view[n:]
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
    inode: int | None = None  # the partial file's, when it was there
    final_inode: int | None = None  # the stored blob's (a partial file renamed keeps its own)


def _stored(size: int | None, written: int | None, inode: int | None, final: Path) -> _Look:
    st = final.stat()
    return _Look(size, written, st.st_size, False, inode, st.st_ino)


def _look(partial: Path, final: Path) -> _Look:
    with contextlib.suppress(FileNotFoundError):
        return _stored(None, None, None, final)
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):  # renamed since we looked
            return _stored(None, None, None, final)
        return _Look(None, None, None, False)
    try:
        size = None
        with contextlib.suppress(OSError, ValueError):
            size = int(os.getxattr(fd, SIZE_XATTR))
        st = os.fstat(fd)
        written, inode = st.st_size, st.st_ino
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            owned = False  # nobody holds it: the owner died (or just finished: checked next)
        except BlockingIOError:
            owned = True
        if not owned:
            with contextlib.suppress(FileNotFoundError):
                return _stored(size, written, inode, final)
        return _Look(size, written, None, owned, inode)
    finally:
        os.close(fd)
