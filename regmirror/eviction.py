"""The bounded local blob cache: an index of what local disk holds, and LRU eviction.

The index (digest -> size, last access, whether it may be evicted) lives in memory. It
is rebuilt at startup by scanning ``<data>/docker/registry/v2/blobs`` (in a thread),
told when a blob enters the store (:meth:`BlobCache.added`) and when one is read
(:meth:`BlobCache.touched`, :meth:`BlobCache.hold`). Eviction is bounded work done after
writes, never on reads, in one background task: while the blobs exceed the high
watermark of ``max_bytes``, or the filesystem has less than ``min_free_bytes`` free,
the least recently used evictable blobs are deleted (the file, then the index entry)
down to the low watermark, or until ``min_free_bytes`` plus a margin is free.

What counts toward ``max_bytes``: the stored blobs, the sizes of the fills in flight
(reserved when a fill starts, so eviction makes room ahead of it; see
:meth:`BlobCache.admit`) and the upload sessions under ``<data>/uploads``: measured by
each eviction pass and counted up as uploads write (:meth:`BlobCache.uploads_grew`), so
a push that fills the disk or the budget starts eviction as it goes, not at the next
blob. A write that finds the disk full calls :meth:`BlobCache.make_room`:
ENOSPC is an eviction trigger, with or without configured limits.

LRU order survives a restart: a read stamps the blob file's mtime (a blob's content
never changes, so its mtime is free to mean "last used"; atime is not trusted, relatime
and noatime mounts barely keep it). The stamp is one ``utime`` in a thread, skipped
when the blob is already the most recently stamped, so a herd of hits costs one call.
The startup scan orders blobs by that mtime, coldest first.

The never-evict rule: **a blob is evictable iff another tier can give it back.**

- a fill (from S3 or an upstream) is evictable: the tier it came from still has it;
- with S3 configured, a pushed blob or manifest is evictable: it was written through
  to S3 before the push was acknowledged;
- without S3, a pushed blob or manifest is the registry's only copy: pinned, forever;
- found by the startup scan: evictable if only pull-through links name it (the
  upstream has it); else, with S3, evictable once S3 is seen to hold it (checked
  when it is about to go: the data directory may predate the bucket); else pinned.

Blobs held (being served, or being committed) are skipped; fills in flight are not in
the store yet. An :class:`~collections.OrderedDict` is the index rather than
:class:`cachetools.LRUCache`, whose eviction happens inside ``__setitem__``, by its own
size rule, with no way to skip pinned or held entries or to await a file deletion or an
S3 check: here the cache only orders entries, and this module decides what goes.

One process per data directory: another process's writes are only seen after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import DigestInvalid
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable

log = logging.getLogger(__name__)

HIGH_WATERMARK = 0.95  # of max_bytes: above it, eviction starts
LOW_WATERMARK = 0.85  # of max_bytes: eviction stops at or below it
FREE_MARGIN = 1.1  # x min_free_bytes: free space eviction stops at
MAX_RUNS = 100  # eviction passes one task makes before it lets the next write restart it
# Upload bytes written between the passes that measure them while no limit seems crossed;
# a pass (a statvfs and a walk of the sessions) then checks the free-space floor.
UPLOAD_RECHECK_BYTES = 64 * 1024**2


def disk_free(root: Path) -> int:
    """Bytes available to this process on the filesystem holding ``root``."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


class State(enum.Enum):
    PINNED = "pinned"  # the only copy: never evicted
    CHECK_S3 = "check_s3"  # evictable once S3 is seen to hold it
    EVICTABLE = "evictable"


@dataclass(slots=True)
class _Entry:
    size: int
    state: State


class CacheObserver(Protocol):
    def cache_bytes(self, total: int) -> None: ...
    def staged_bytes(self, total: int) -> None: ...
    def blob_evicted(self, nbytes: int) -> None: ...


class BlobCache:
    """The local blobs under ``root`` (the data directory), kept within a budget.

    ``max_bytes`` None means no byte budget; ``min_free_bytes`` 0 means no free-space
    floor; ``shared`` is S3 when configured (see the module's never-evict rule).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = 0,
        shared: Driver | None = None,
        observer: CacheObserver | None = None,
    ):
        self.root = root
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.shared = shared
        self.observer = observer
        self.total = 0
        self._entries: OrderedDict[Digest, _Entry] = OrderedDict()  # coldest first
        self._holds: dict[Digest, int] = {}
        self._deleting: dict[Digest, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._stuck = False  # warned that nothing more can be evicted
        self.reserved = 0  # bytes of the fills in flight (their whole size)
        self.uploads = 0  # bytes under <data>/uploads: as last measured, plus growth since
        self._uploads_unmeasured = 0  # growth since a pass was last scheduled for it
        self._stamps: set[asyncio.Task[None]] = set()
        self._last_stamp = 0
        self._newest_stamped: Digest | None = None

    # -- what the store tells us -------------------------------------------------

    def added(self, digest: Digest, size: int, *, evictable: bool) -> None:
        """``digest`` is in the store now; ``evictable`` per the module's rule. Pinned
        wins: a blob that is once the only copy stays pinned."""
        self._put(digest, size, State.EVICTABLE if evictable else State.PINNED)
        self._entries.move_to_end(digest)
        self._stamp(digest)
        self._schedule()

    def uploads_grew(self, nbytes: int) -> None:
        """Upload sessions took ``nbytes`` more on disk (negative: gave them back).

        Counted at once; an eviction pass (which measures the sessions again) is started
        when they push the budget over its high watermark, and every
        :data:`UPLOAD_RECHECK_BYTES` of growth, for the free-space floor. While nothing
        more can be evicted, only the latter: a stuck cache is not rescanned per chunk.
        """
        self.uploads = max(0, self.uploads + nbytes)
        self._report()
        if nbytes <= 0:
            return
        self._uploads_unmeasured += nbytes
        over = self.max_bytes is not None and self.budgeted > self.max_bytes * HIGH_WATERMARK
        if self._uploads_unmeasured >= UPLOAD_RECHECK_BYTES or (over and not self._stuck):
            self._uploads_unmeasured = 0
            self._schedule()

    def touched(self, digest: Digest) -> None:
        """``digest`` was read: the most recently used now."""
        if digest not in self._entries:
            return
        self._entries.move_to_end(digest)
        if digest != self._newest_stamped:  # else nothing was used since: a herd costs one
            self._stamp(digest)

    def _stamp(self, digest: Digest) -> None:
        """Record the access in the file's mtime (see the module's note on LRU order)."""
        self._newest_stamped = digest
        # Strictly increasing, so that two stamps in one clock tick still order.
        self._last_stamp = stamp = max(time.time_ns(), self._last_stamp + 1)
        path = self.root / layout.blob_data(digest)
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(_set_mtime, path, stamp))
        self._stamps.add(task)
        task.add_done_callback(self._stamps.discard)

    async def hold(self, digest: Digest) -> Hold:
        """Keep ``digest`` from eviction until the hold is released; waits for a deletion
        of it already under way, so that a lookup after this sees the truth."""
        self._holds[digest] = self._holds.get(digest, 0) + 1
        self.touched(digest)
        hold = Hold(self, digest)
        deleting = self._deleting.get(digest)
        if deleting is not None:
            try:
                await deleting.wait()
            except BaseException:
                hold.release()
                raise
        return hold

    @contextlib.asynccontextmanager
    async def holding(self, digest: Digest) -> AsyncIterator[None]:
        hold = await self.hold(digest)
        try:
            yield
        finally:
            hold.release()

    def held(self, digest: Digest) -> bool:
        return self._holds.get(digest, 0) > 0

    def state(self, digest: Digest) -> State | None:
        entry = self._entries.get(digest)
        return entry.state if entry is not None else None

    def _release(self, digest: Digest) -> None:
        left = self._holds.get(digest, 0) - 1
        if left > 0:
            self._holds[digest] = left
        else:
            self._holds.pop(digest, None)

    def _put(self, digest: Digest, size: int, state: State) -> None:
        old = self._entries.get(digest)
        if old is not None:
            self.total -= old.size
            if State.PINNED in (old.state, state):
                state = State.PINNED
            elif State.EVICTABLE in (old.state, state):
                state = State.EVICTABLE
        self._entries[digest] = _Entry(size, state)
        self.total += size
        self._report()

    # -- startup -----------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the index from the data directory, then evict if over budget."""
        found = await asyncio.to_thread(scan, self.root, s3=self.shared is not None)
        # Hottest first, each put before the previous: coldest first in the end, and
        # all of them colder than what the store has told us about since.
        for digest, size, state in reversed(found):
            if digest not in self._entries:  # what the store said since beats the scan
                self._put(digest, size, state)
                self._entries.move_to_end(digest, last=False)
        log.info("local cache: %d blobs, %d bytes", len(self._entries), self.total)
        self._schedule()

    # -- eviction ----------------------------------------------------------------

    def _schedule(self) -> None:
        if self.max_bytes is None and self.min_free_bytes <= 0:
            return  # no limits: nothing to evict, ever
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="eviction")

    async def settle(self) -> None:
        """Wait until eviction has caught up with every write so far."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._stamps:
            await asyncio.gather(*self._stamps, return_exceptions=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        for _ in range(MAX_RUNS):
            self._again = False
            try:
                await self._evict()
            except Exception:
                log.exception("eviction failed")
            if not self._again:
                return

    # -- admission and disk full ---------------------------------------------------

    async def admit(self, size: int) -> str | None:
        """Whether a blob of ``size`` bytes about to be filled can be kept: None if so,
        else why not (``over_budget``: bigger than the budget's low watermark, so keeping
        it would evict everything and then itself; ``disk_full``: bigger than the free
        space above the floor plus everything evictable)."""
        if self.max_bytes is not None and size > self.max_bytes * LOW_WATERMARK:
            return "over_budget"
        free = await asyncio.to_thread(disk_free, self.root)
        if size > free - self.min_free_bytes + self.evictable_bytes():
            return "disk_full"
        return None

    def evictable_bytes(self) -> int:
        """Bytes eviction could free now: blobs neither pinned nor held (those still to be
        checked against S3 included: S3 usually has them)."""
        return sum(
            e.size
            for d, e in self._entries.items()
            if e.state is not State.PINNED and not self.held(d)
        )

    def reserve(self, size: int) -> Reservation:
        """Count a fill of ``size`` bytes toward the budget until it is released (it is
        then in the store, or gone), making room for it now rather than after."""
        self.reserved += size
        self._schedule()
        return Reservation(self, size)

    async def make_room(self, nbytes: int) -> int:
        """The disk is full (ENOSPC): evict the least recently used evictable blobs until
        ``nbytes`` plus the floor are free and the budget is under its low watermark;
        the bytes evicted (0: nothing left to evict). Works with no limits configured."""
        freed = 0
        free = await asyncio.to_thread(disk_free, self.root)
        for digest in [d for d, e in self._entries.items() if e.state is not State.PINNED]:
            if free >= nbytes + self.min_free_bytes and self._enough(None):
                break
            if not await self._evictable(digest):
                continue
            entry = self._entries.get(digest)
            await self._delete(digest)
            if entry is not None and digest not in self._entries:
                freed += entry.size
            free = await asyncio.to_thread(disk_free, self.root)
        return freed

    async def _evict(self) -> None:
        free = await asyncio.to_thread(self._free)
        self.uploads = await asyncio.to_thread(_sessions_bytes, self.root / "uploads")
        self._report()
        if not self._over(free):
            self._stuck = False
            return
        started, count, freed = time.monotonic(), 0, 0
        for digest in [d for d, e in self._entries.items() if e.state is not State.PINNED]:
            if self._enough(free):
                break
            if not await self._evictable(digest):
                continue
            entry = self._entries.get(digest)
            free = await self._delete(digest)
            if entry is not None and digest not in self._entries:
                count, freed = count + 1, freed + entry.size
        if count:
            _log_round(count, freed, time.monotonic() - started, self)
        if self._enough(free):
            self._stuck = False
        elif not self._stuck:
            self._stuck = True
            pinned = sum(e.size for e in self._entries.values() if e.state is State.PINNED)
            log.warning(
                "local cache over its limits (%d bytes of max_bytes %s, %s bytes free of "
                "min_free_bytes %d) and nothing more can be evicted: %d bytes are pushed "
                "blobs whose only copy is this disk (configure S3 to make them evictable), "
                "the rest is in use",
                self.total,
                self.max_bytes,
                free,
                self.min_free_bytes,
                pinned,
            )

    def _free(self) -> int | None:
        return disk_free(self.root) if self.min_free_bytes > 0 else None

    @property
    def budgeted(self) -> int:
        """What counts toward ``max_bytes``: blobs, fills in flight, uploads."""
        return self.total + self.reserved + self.uploads

    def _over(self, free: int | None) -> bool:
        over_budget = self.max_bytes is not None and self.budgeted > self.max_bytes * HIGH_WATERMARK
        return over_budget or (free is not None and free < self.min_free_bytes)

    def _enough(self, free: int | None) -> bool:
        under_budget = self.max_bytes is None or self.budgeted <= self.max_bytes * LOW_WATERMARK
        return under_budget and (free is None or free >= self.min_free_bytes * FREE_MARGIN)

    async def _evictable(self, digest: Digest) -> bool:
        entry = self._entries.get(digest)
        if entry is None or entry.state is State.PINNED or self.held(digest):
            return False
        if entry.state is State.CHECK_S3:
            if not await self._in_s3(digest):
                return False
            entry = self._entries.get(digest)  # the store may have spoken meanwhile
            if entry is None or entry.state is State.PINNED or self.held(digest):
                return False
        return digest not in self._deleting

    async def _in_s3(self, digest: Digest) -> bool:
        assert self.shared is not None
        try:
            await self.shared.stat(layout.blob_data(digest))
        except PathNotFound:
            log.warning("blob %s on local disk is not in S3: kept, never evicted", digest)
            if (entry := self._entries.get(digest)) is not None:
                entry.state = State.PINNED
            return False
        except StorageUnavailable:
            return False  # asked again on a later pass
        entry = self._entries.get(digest)
        if entry is not None and entry.state is State.CHECK_S3:
            entry.state = State.EVICTABLE
        return True

    async def _delete(self, digest: Digest) -> int | None:
        """Delete the file, then the index entry; the free space after."""
        done = self._deleting[digest] = asyncio.Event()
        path = self.root / layout.blob_data(digest)
        try:
            free = await asyncio.to_thread(self._unlink, path)
        except OSError as exc:
            log.warning("evicting %s failed: %s", digest, exc)
            return await asyncio.to_thread(self._free)
        finally:
            del self._deleting[digest]
            done.set()
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.total -= entry.size
            if self.observer is not None:
                self.observer.blob_evicted(entry.size)
            self._report()
        return free

    def _unlink(self, path: Path) -> int | None:
        path.unlink(missing_ok=True)
        return self._free()

    def _report(self) -> None:
        if self.observer is not None:
            self.observer.cache_bytes(self.total)
            self.observer.staged_bytes(self.reserved + self.uploads)


def _log_round(count: int, freed: int, seconds: float, cache: BlobCache) -> None:
    log.info(
        "eviction: %d blobs, %d bytes freed in %.2f s; cache now %d bytes (max_bytes %s)",
        count,
        freed,
        seconds,
        cache.total,
        cache.max_bytes,
        extra={
            "fields": {
                "event": "eviction",
                "blobs": count,
                "bytes_freed": freed,
                "seconds": round(seconds, 3),
                "cache_bytes": cache.total,
            }
        },
    )


class Reservation:
    """A fill's size counted toward the budget; :meth:`release` it once."""

    def __init__(self, cache: BlobCache, size: int):
        self._cache: BlobCache | None = cache
        self.size = size

    def release(self) -> None:
        if self._cache is not None:
            self._cache.reserved -= self.size
            self._cache._report()
            self._cache = None


class Hold:
    """A blob kept from eviction; :meth:`release` it once (later calls do nothing)."""

    def __init__(self, cache: BlobCache, digest: Digest):
        self._cache: BlobCache | None = cache
        self.digest = digest

    def release(self) -> None:
        if self._cache is not None:
            self._cache._release(self.digest)
            self._cache = None


def _set_mtime(path: Path, ns: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, ns=(ns, ns))


def _sessions_bytes(root: Path) -> int:
    """Bytes of the upload sessions' files under ``root`` (0 if there are none), counted
    as blobs are, by size; what the filesystem adds (directories, blocks) the free-space
    floor sees. A frozen session (being committed) is left out: its bytes are moving into
    the store, counted there. Blocking."""
    total = 0
    try:
        sessions = [e.path for e in os.scandir(root) if not e.name.endswith(".commit")]
    except FileNotFoundError:
        return 0
    for session in sessions:
        for directory, _, files in os.walk(session):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(directory, name)).st_size
    return total


def scan(root: Path, *, s3: bool) -> list[tuple[Digest, int, State]]:
    """Every blob under ``root``, coldest first (by mtime: the last use stamped on it),
    with its state per the module's rule. Blocking: run it in a thread."""
    pushed = _linked(root / layout.REPOSITORIES)
    proxied = _linked(root / "proxy" / layout.REPOSITORIES)
    found = []
    blobs = root / layout.ROOT / "blobs"
    for data in blobs.glob("*/*/*/data"):
        algorithm, encoded = data.parent.parent.parent.name, data.parent.name
        try:
            st = data.stat()
        except FileNotFoundError:
            continue
        try:
            digest = Digest.parse(f"{algorithm}:{encoded}")
        except DigestInvalid:
            continue  # not a blob of ours
        if digest in proxied and digest not in pushed:
            state = State.EVICTABLE
        else:
            state = State.CHECK_S3 if s3 else State.PINNED
        found.append((st.st_mtime_ns, digest, st.st_size, state))
    found.sort(key=lambda item: item[0])
    return [(digest, size, state) for _, digest, size, state in found]


def _linked(repositories: Path) -> set[Digest]:
    """Digests that layer or manifest-revision links under ``repositories`` name (read
    from the links' directories: ``_layers/<alg>/<hex>/link``)."""
    linked = set()
    for directory, _, files in os.walk(repositories):
        if "link" not in files:
            continue
        parts = Path(directory).parts
        if len(parts) >= 3 and parts[-3] in ("_layers", "revisions"):
            with contextlib.suppress(DigestInvalid):
                linked.add(Digest.parse(f"{parts[-2]}:{parts[-1]}"))
    return linked
