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
  when it is about to go: the data directory may predate the bucket); else pinned;
- found by the startup scan with no link naming it at all (a kill between a blob's
  rename into the store and its link, or links deleted since): *unreferenced*. No
  request can reach it (every read goes through a link), so once it is older than
  ``unreferenced_grace`` seconds (by its mtime, its last use) it is deleted, links
  re-read first; the grace leaves a push in flight elsewhere time to write its link.

Blobs held (being served, or being committed) are skipped; fills in flight are not in
the store yet. An :class:`~collections.OrderedDict` is the index rather than
:class:`cachetools.LRUCache`, whose eviction happens inside ``__setitem__``, by its own
size rule, with no way to skip pinned or held entries or to await a file deletion or an
S3 check: here the cache only orders entries, and this module decides what goes.

The index is built in the background (:meth:`BlobCache.start_loading`): serving never
waits for it (a stored blob is found by its path), eviction and admission do
(:meth:`BlobCache.wait_loaded`), so startup takes the same time whatever the store holds.

Several processes on one data directory (``server.workers``): one of them owns eviction;
the others never delete (``evicts=False``). They tell the owner at once what they store
and reserve, and ask it for room (``link``, :mod:`regmirror.eviction_link`), so its index
is the host's; it also rescans the directory every ``reindex`` seconds, a backstop for
what a restart lost. A blob is deleted only when no process holds ``flock(LOCK_SH)`` on
it, which a process serving it does (:mod:`regmirror.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import DigestInvalid
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable

if TYPE_CHECKING:
    from regmirror.eviction_link import OwnerLink

log = logging.getLogger(__name__)

HIGH_WATERMARK = 0.95  # of max_bytes: above it, eviction starts
LOW_WATERMARK = 0.85  # of max_bytes: eviction stops at or below it
FREE_MARGIN = 1.1  # x min_free_bytes: free space eviction stops at
RETRY_SECONDS = 60.0  # until an unreferenced blob in use (or failing to go) is tried again
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
    UNREFERENCED = "unreferenced"  # no link names it: deleted after the grace period


UNREFERENCED_GRACE = 3600.0  # seconds an unreferenced blob is kept after its last use


@dataclass(slots=True)
class _Entry:
    size: int
    state: State
    mtime: float = 0.0  # seconds; for UNREFERENCED, when the grace period started


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
        unreferenced_grace: float = UNREFERENCED_GRACE,
        evicts: bool = True,
        reindex: float | None = None,
        link: OwnerLink | None = None,
    ):
        """``evicts`` False: this process never deletes a blob (another process owns
        eviction, :mod:`regmirror.workers`); ``link``: how it tells that owner what it
        stores and asks it for room; ``reindex``: seconds between the owner's rescans
        of the data directory (a backstop)."""
        self.root = root
        self.unreferenced_grace = unreferenced_grace
        self.evicts = evicts
        self.link = link
        self.reindex = reindex
        self._remote: dict[str, int] = {}  # the other workers' reservations (owner)
        self._reindexing: asyncio.Task[None] | None = None
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
        self._loading: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._reconciling: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._on_evicted: list[Callable[[Digest], None]] = []

    def on_evicted(self, forget: Callable[[Digest], None]) -> None:
        """Call ``forget(digest)`` whenever eviction deletes a blob's file."""
        self._on_evicted.append(forget)

    # -- what the store tells us -------------------------------------------------

    def added(self, digest: Digest, size: int, *, evictable: bool) -> None:
        """``digest`` is in the store now; ``evictable`` per the module's rule. Pinned
        wins: a blob that is once the only copy stays pinned."""
        self._put(digest, size, State.EVICTABLE if evictable else State.PINNED)
        self._entries.move_to_end(digest)
        self._stamp(digest)
        if self.link is not None:
            self.link.stored(digest, size, pinned=not evictable)
        self._schedule()

    # -- what the other workers tell the owner (regmirror.eviction_link) ------------

    def learned(self, digest: Digest, size: int, *, evictable: bool) -> None:
        """Another worker stored ``digest`` (and stamped its mtime): as :meth:`added`."""
        self._put(digest, size, State.EVICTABLE if evictable else State.PINNED)
        self._entries.move_to_end(digest)
        self._schedule()

    def remote_reserve(self, key: str, size: int) -> None:
        """Another worker's fill of ``size`` bytes counts toward the budget until
        :meth:`remote_release` of ``key``; room is made for it now."""
        self.reserved += size - self._remote.get(key, 0)
        self._remote[key] = size
        self._report()
        self._schedule()

    def remote_release(self, key: str) -> None:
        self.reserved -= self._remote.pop(key, 0)
        self._report()

    def remote_pass(self) -> None:
        """Another worker's uploads grew: measure them (an eviction pass does)."""
        self._schedule()

    def drop_remote(self, alive: Callable[[int], bool]) -> None:
        """Release the reservations of workers that are gone (``key``: ``<pid>.<n>``)."""
        for key in [k for k in self._remote if not alive(int(k.split(".")[0]))]:
            self.remote_release(key)

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
            if self.link is not None:
                self.link.check()
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

    def hold_now(self, digest: Digest) -> Hold | None:
        """:meth:`hold`'s, when no deletion of ``digest`` is under way; else None (a hold
        would wait for it)."""
        if digest in self._deleting:
            return None
        self._holds[digest] = self._holds.get(digest, 0) + 1
        self.touched(digest)
        return Hold(self, digest)

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

    def _put(self, digest: Digest, size: int, state: State, mtime: float = 0.0) -> None:
        old = self._entries.get(digest)
        if old is not None:
            self.total -= old.size
            if old.state is State.UNREFERENCED:
                pass  # the store has spoken since the scan: it knows better
            elif State.PINNED in (old.state, state):
                state = State.PINNED
            elif State.EVICTABLE in (old.state, state):
                state = State.EVICTABLE
        self._entries[digest] = _Entry(size, state, mtime)
        self.total += size
        self._report()

    # -- startup -----------------------------------------------------------------

    def start_loading(self) -> None:
        """Build the index in the background (see the module's note on startup)."""
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load(), name="index")

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def blob_count(self) -> int:
        """How many blobs on local disk the index holds."""
        return len(self._entries)

    async def wait_loaded(self) -> None:
        """Until the index holds every blob on disk (at once when it does, or when no
        load was started: an index told about writes only)."""
        if self._loading is not None:
            await self._loaded.wait()

    async def load(self) -> None:
        """Rebuild the index from the data directory, then evict if over budget."""
        self.start_loading()
        await self.wait_loaded()

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            found = await asyncio.to_thread(scan, self.root, s3=self.shared is not None)
        except Exception:
            log.exception("indexing the local cache failed: only new blobs are known")
            found = []
        # Hottest first, each put before the previous: coldest first in the end, and
        # all of them colder than what the store has told us about since.
        unreferenced = 0
        for digest, size, state, mtime in reversed(found):
            if digest not in self._entries:  # what the store said since beats the scan
                self._put(digest, size, state, mtime)
                self._entries.move_to_end(digest, last=False)
                unreferenced += state is State.UNREFERENCED
        self._loaded.set()
        log.info(
            "local cache indexed in %.2fs: %d blobs, %d bytes (%d referenced by no link)",
            time.monotonic() - started,
            len(self._entries),
            self.total,
            unreferenced,
        )
        self._schedule()
        if unreferenced and self.evicts:
            self._reconcile_soon(0)
        if self.reindex is not None and self._reindexing is None:
            self._reindexing = asyncio.get_running_loop().create_task(self._rescan(self.reindex))

    # -- unreferenced blobs ----------------------------------------------------------

    def unreferenced(self) -> list[tuple[Digest, int]]:
        """The blobs in the index that no link named when they were found."""
        return [(d, e.size) for d, e in self._entries.items() if e.state is State.UNREFERENCED]

    def _reconcile_soon(self, delay: float) -> None:
        if self._reconciling is not None:
            return
        loop = asyncio.get_running_loop()
        if delay <= 0:
            self._reconciling = loop.create_task(self._reconcile(), name="reconcile")
            return

        def start() -> None:
            self._reconciling = loop.create_task(self._reconcile(), name="reconcile")

        self._reconciling = loop.call_later(delay, start)

    async def _reconcile(self) -> None:
        """Delete the unreferenced blobs past their grace period; runs again when the
        next one's grace ends."""
        next_due: float | None = None
        try:
            deleted, next_due = await self.delete_unreferenced(self.unreferenced_grace)
            if deleted:
                log.info(
                    "deleted %d blobs (%d bytes) that no link references (left by a crash "
                    "between a blob and its link, or unlinked since)",
                    len(deleted),
                    sum(size for _, size in deleted),
                )
        except Exception:
            log.exception("deleting unreferenced blobs failed")
            next_due = time.time() + RETRY_SECONDS
        finally:
            self._reconciling = None
        if next_due is not None and math.isfinite(next_due):
            self._reconcile_soon(max(next_due - time.time(), 0.0) + 0.01)

    async def delete_unreferenced(
        self, grace: float, *, dry_run: bool = False
    ) -> tuple[list[tuple[Digest, int]], float | None]:
        """Delete the blobs no link references whose last use is ``grace`` seconds old
        (links are read again first: one may have been written since the scan). Returns
        what was deleted (with ``dry_run``: would be) and when the next one is due."""
        next_due: float | None = None
        pushed, proxied = await asyncio.to_thread(linked_digests, self.root)
        now = time.time()
        deleted: list[tuple[Digest, int]] = []
        for digest in [d for d, e in self._entries.items() if e.state is State.UNREFERENCED]:
            entry = self._entries.get(digest)  # the store may have spoken meanwhile
            if entry is None or entry.state is not State.UNREFERENCED:
                continue
            if digest in pushed or digest in proxied:
                entry.state = _state(digest, pushed, proxied, s3=self.shared is not None)
                continue
            due = entry.mtime + grace
            if due <= now and (self.held(digest) or digest in self._deleting):
                due = now + RETRY_SECONDS  # in use now: asked again later
            if due > now:
                next_due = due if next_due is None else min(next_due, due)
                continue
            if not dry_run:
                await self._delete(digest, evicted=False)
                if digest in self._entries:
                    continue  # the deletion failed (logged)
            deleted.append((digest, entry.size))
        return deleted, next_due

    async def _rescan(self, every: float) -> None:
        """Learn, every ``every`` seconds, what other processes stored (and evict)."""
        while True:
            await asyncio.sleep(every)
            try:
                found = await asyncio.to_thread(scan, self.root, s3=self.shared is not None)
            except OSError as exc:
                log.warning("rescanning the local cache failed: %s", exc)
                continue
            unreferenced = 0
            for digest, size, state, mtime in reversed(found):
                if digest not in self._entries:
                    self._put(digest, size, state, mtime)
                    self._entries.move_to_end(digest, last=False)
                    unreferenced += state is State.UNREFERENCED
            self._schedule()
            if unreferenced and self.evicts:
                self._reconcile_soon(0)

    # -- eviction ----------------------------------------------------------------

    def _schedule(self) -> None:
        if not self.evicts:
            return  # another process owns eviction
        if self.max_bytes is None and self.min_free_bytes <= 0:
            return  # no limits: nothing to evict, ever
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="eviction")

    async def settle(self) -> None:
        """Wait until the index is built and eviction (and a deletion of unreferenced
        blobs under way) has caught up with every write so far."""
        await self.wait_loaded()
        if isinstance(self._reconciling, asyncio.Task):
            await asyncio.shield(self._reconciling)
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._stamps:
            await asyncio.gather(*self._stamps, return_exceptions=True)

    async def close(self) -> None:
        if isinstance(self._reconciling, asyncio.TimerHandle):
            self._reconciling.cancel()
        tasks: list[asyncio.Task[None]] = [
            t
            for t in (self._task, self._loading, self._reconciling, self._reindexing)
            if isinstance(t, asyncio.Task)
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        await self.wait_loaded()  # evicting by a partial index would pick the wrong blobs
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
        if size <= free - self.min_free_bytes:
            return None  # fits as things are: no need to wait for the index
        if self.link is not None:  # the owner's index knows every worker's blobs
            answer = await self.link.admit(size)
            if answer is not None:
                return None if answer == "ok" else answer
        await self.wait_loaded()
        if size > free - self.min_free_bytes + self.evictable_bytes():
            return "disk_full"
        return None

    def evictable_bytes(self) -> int:
        """Bytes eviction could free now: blobs neither pinned nor held (those still to be
        checked against S3 included: S3 usually has them), nor unreferenced and still
        within their grace. Only what is indexed so far while the index loads."""
        now = time.time()
        return sum(
            e.size
            for d, e in self._entries.items()
            if e.state is not State.PINNED
            and not self.held(d)
            and not (e.state is State.UNREFERENCED and e.mtime + self.unreferenced_grace > now)
        )

    def reserve(self, size: int) -> Reservation:
        """Count a fill of ``size`` bytes toward the budget until it is released (it is
        then in the store, or gone), making room for it now rather than after."""
        self.reserved += size
        key = self.link.reserve(size) if self.link is not None else None
        self._schedule()
        return Reservation(self, size, key)

    async def make_room(self, nbytes: int) -> int:
        """The disk is full (ENOSPC): evict the least recently used evictable blobs until
        ``nbytes`` plus the floor are free and the budget is under its low watermark;
        the bytes evicted (0: nothing left to evict). Works with no limits configured."""
        if not self.evicts:  # another process owns eviction: ask it, a bounded wait
            freed = await self.link.room(nbytes) if self.link is not None else None
            return freed or 0  # nothing (or no answer): the fill streams through
        await self.wait_loaded()
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

    async def trim(self, *, dry_run: bool = False) -> list[tuple[Digest, int]]:
        """Evict the least recently used evictable blobs until the budget is at its low
        watermark and the free-space floor has its margin, whether or not the high
        watermark was passed (``regmirror gc``); the blobs evicted, or with ``dry_run``
        those that would be (nothing is deleted then)."""
        await self.wait_loaded()
        self.uploads = await asyncio.to_thread(_sessions_bytes, self.root / "uploads")
        free = await asyncio.to_thread(self._free)
        budgeted = self.budgeted
        chosen: list[tuple[Digest, int]] = []
        for digest in [d for d, e in self._entries.items() if e.state is not State.PINNED]:
            if self._enough(free, budgeted):
                break
            entry = self._entries.get(digest)
            if entry is None or not await self._evictable(digest):
                continue
            if dry_run:
                budgeted -= entry.size
                free = None if free is None else free + entry.size
            else:
                free = await self._delete(digest)
                if digest in self._entries:
                    continue  # the deletion failed (logged)
                budgeted = self.budgeted
            chosen.append((digest, entry.size))
        return chosen

    def _free(self) -> int | None:
        return disk_free(self.root) if self.min_free_bytes > 0 else None

    @property
    def budgeted(self) -> int:
        """What counts toward ``max_bytes``: blobs, fills in flight, uploads."""
        return self.total + self.reserved + self.uploads

    def _over(self, free: int | None) -> bool:
        over_budget = self.max_bytes is not None and self.budgeted > self.max_bytes * HIGH_WATERMARK
        return over_budget or (free is not None and free < self.min_free_bytes)

    def _enough(self, free: int | None, budgeted: int | None = None) -> bool:
        if budgeted is None:
            budgeted = self.budgeted
        under_budget = self.max_bytes is None or budgeted <= self.max_bytes * LOW_WATERMARK
        return under_budget and (free is None or free >= self.min_free_bytes * FREE_MARGIN)

    async def _evictable(self, digest: Digest) -> bool:
        entry = self._entries.get(digest)
        if entry is None or entry.state is State.PINNED or self.held(digest):
            return False
        if entry.state is State.UNREFERENCED:
            return entry.mtime + self.unreferenced_grace <= time.time()
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

    async def _delete(self, digest: Digest, *, evicted: bool = True) -> int | None:
        """Delete the file, then the index entry; the free space after. ``evicted``:
        counted as an eviction (else an unreferenced blob reconciled away)."""
        done = self._deleting[digest] = asyncio.Event()
        path = self.root / layout.blob_data(digest)
        try:
            free = await asyncio.to_thread(self._unlink, path)
            for forget in self._on_evicted:
                forget(digest)
        except BlockingIOError:
            log.debug("not evicting %s: another process is serving it", digest)
            return await asyncio.to_thread(self._free)
        except OSError as exc:
            log.warning("evicting %s failed: %s", digest, exc)
            return await asyncio.to_thread(self._free)
        finally:
            del self._deleting[digest]
            done.set()
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.total -= entry.size
            if self.observer is not None and evicted:
                self.observer.blob_evicted(entry.size)
            self._report()
        return free

    def _unlink(self, path: Path) -> int | None:
        """Delete the blob unless a process is serving it (it holds ``LOCK_SH``:
        BlockingIOError, and the blob stays)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return self._free()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
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

    def __init__(self, cache: BlobCache, size: int, key: str | None = None):
        self._cache: BlobCache | None = cache
        self.size = size
        self.key = key  # the owner's name for it, in another worker

    def release(self) -> None:
        if self._cache is not None:
            self._cache.reserved -= self.size
            self._cache._report()
            if self.key is not None and self._cache.link is not None:
                self._cache.link.release(self.key)
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


def scan(root: Path, *, s3: bool) -> list[tuple[Digest, int, State, float]]:
    """Every blob under ``root``, coldest first (by mtime: the last use stamped on it),
    with its state per the module's rule and its mtime (seconds). Blocking: run it in a
    thread. Links are read before blobs, so a blob linked while this runs is at worst
    found unreferenced (and its link is read again before it could be deleted)."""
    pushed, proxied = linked_digests(root)
    found = []
    for algorithm, encoded, st in _blob_files(str(root / layout.ROOT / "blobs")):
        try:
            digest = Digest.parse(f"{algorithm}:{encoded}")
        except DigestInvalid:
            continue  # not a blob of ours
        found.append((st.st_mtime_ns, digest, st.st_size, _state(digest, pushed, proxied, s3=s3)))
    found.sort(key=lambda item: item[0])
    return [(digest, size, state, ns / 1e9) for ns, digest, size, state in found]


def _blob_files(blobs: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(algorithm, encoded, stat) of each ``<alg>/<2 hex>/<encoded>/data`` under
    ``blobs``; os.scandir, not pathlib: a 100,000-blob store is scanned at startup."""
    for algorithm in _subdirs(blobs):
        for prefix in _subdirs(algorithm.path):
            for encoded in _subdirs(prefix.path):
                try:
                    st = os.stat(os.path.join(encoded.path, "data"))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                yield algorithm.name, encoded.name, st


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _state(digest: Digest, pushed: set[Digest], proxied: set[Digest], *, s3: bool) -> State:
    if digest in proxied and digest not in pushed:
        return State.EVICTABLE  # the upstream has it
    if digest not in pushed:
        return State.UNREFERENCED
    return State.CHECK_S3 if s3 else State.PINNED


def linked_digests(root: Path) -> tuple[set[Digest], set[Digest]]:
    """The digests pushed links name, and those pull-through links name. Blocking."""
    return _linked(root / layout.REPOSITORIES), _linked(root / "proxy" / layout.REPOSITORIES)


def _linked(repositories: Path) -> set[Digest]:
    """Digests that layer or manifest-revision links under ``repositories`` name (read
    from the links' directories: ``_layers/<alg>/<hex>/link``)."""
    linked = set()
    for directory, _, files in os.walk(repositories):
        if "link" not in files:
            continue
        parts = directory.rsplit(os.sep, 3)
        if len(parts) == 4 and parts[-3] in ("_layers", "revisions"):
            with contextlib.suppress(DigestInvalid):
                linked.add(Digest.parse(f"{parts[-2]}:{parts[-1]}"))
    return linked
