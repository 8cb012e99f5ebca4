"""``regmirror gc``: reconcile a data directory with no server running on it.

Offline, under the data directory's exclusive lock (:mod:`regmirror.datalock`): with no
server, every upload session being committed, every partial fill and every temp file is
a leftover of a process that died, so each can be judged by what it is rather than
guessed at by its age. A running server already does the rest of this itself (it
expires sessions, sweeps stale partial files, evicts to its watermarks and deletes
unreferenced blobs after ``cache.unreferenced_grace``); gc is for a stopped host, a
full disk that kept a server from starting, or a cache that should shrink now.

What goes, in order:

1. upload sessions idle for longer than ``uploads.ttl``, and sessions frozen by a commit
   that never ended (``<uuid>.commit``: the client was never answered 201) or cancels
   that never ended (``<uuid>.gone-*``);
2. partial files: fills (``fills/*.partial``) and the filesystem driver's temp files;
3. blobs no repository link (pushed or pull-through) references: those unused for
   ``cache.unreferenced_grace`` seconds, or all of them with ``unreferenced``;
4. the least recently used evictable blobs, down to the low watermark of
   ``cache.max_bytes`` and the ``cache.min_free_bytes`` margin (by the index's
   never-evict rule: a pushed blob whose only copy is this disk stays).

With ``dry_run`` nothing is removed; the report says what would be.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from regmirror import datalock, layout
from regmirror.config import Settings
from regmirror.digest import Digest
from regmirror.eviction import LOW_WATERMARK, BlobCache
from regmirror.fill import PARTIAL_SUFFIX
from regmirror.storage.filesystem import TEMP_PREFIX
from regmirror.uploads import FROZEN_SUFFIX, GONE_SUFFIX

SESSION = "upload session"
PARTIAL = "partial file"
UNREFERENCED = "unreferenced blob"
EVICTED = "evicted blob"


@dataclass(frozen=True, slots=True)
class Removal:
    """One thing removed (or, in a dry run, to be removed); ``path`` is relative to the
    data directory."""

    kind: str
    path: str
    bytes: int
    reason: str


@dataclass(slots=True)
class Report:
    data_dir: str
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    unreferenced_kept: int = 0  # unreferenced blobs still within their grace period
    cache_bytes: int = 0  # blobs left in the store (in a dry run: that would be left)
    max_bytes: int | None = None
    low_watermark_bytes: int | None = None

    def bytes_of(self, kind: str) -> int:
        return sum(r.bytes for r in self.removed if r.kind == kind)

    def count_of(self, kind: str) -> int:
        return sum(1 for r in self.removed if r.kind == kind)


def collect(settings: Settings, *, unreferenced: bool = False, dry_run: bool = False) -> Report:
    """Run gc on ``settings.data_dir``; DataDirBusy when a server is running on it."""
    data_dir = Path(settings.data_dir).expanduser().resolve()
    lock = datalock.acquire(data_dir, exclusive=True)
    try:
        report = Report(str(data_dir), dry_run)
        report.removed += _sessions(data_dir, settings.uploads.ttl, dry_run)
        report.removed += _partials(data_dir, dry_run)
        asyncio.run(_store(settings, data_dir, report, unreferenced=unreferenced))
        return report
    finally:
        lock.release()


def _sessions(data_dir: Path, ttl: float, dry_run: bool) -> list[Removal]:
    root = data_dir / "uploads"
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    cutoff = time.time() - ttl
    removed = []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.endswith(FROZEN_SUFFIX):
            reason = "a commit that never finished"
        elif GONE_SUFFIX in entry.name:
            reason = "a cancel that never finished"
        elif _last_used(path) < cutoff:
            reason = f"idle for more than uploads.ttl ({ttl:g}s)"
        else:
            continue
        removed.append(Removal(SESSION, str(path.relative_to(data_dir)), _bytes(path), reason))
        if not dry_run:
            _remove(path)
    return removed


def _partials(data_dir: Path, dry_run: bool) -> list[Removal]:
    removed = []
    for directory, subdirs, files in os.walk(data_dir):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if name.startswith(TEMP_PREFIX):
                reason = "a write that never finished"
            elif name.endswith(PARTIAL_SUFFIX) and path.parent == data_dir / "fills":
                reason = "a fill that never finished"
            else:
                continue
            try:
                size = path.lstat().st_size
                if not dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(Removal(PARTIAL, str(path.relative_to(data_dir)), size, reason))
    return removed


async def _store(settings: Settings, data_dir: Path, report: Report, *, unreferenced: bool) -> None:
    shared = None
    if settings.s3.bucket:
        from regmirror.storage.s3 import S3Driver  # boto3 only when used

        shared = S3Driver(settings.s3)
    # No limits and an endless grace while it loads: nothing is deleted in the background
    # (a dry run must delete nothing); what goes is decided below.
    cache = BlobCache(data_dir, shared=shared, unreferenced_grace=float("inf"))
    try:
        await cache.load()
        cache.max_bytes = settings.cache.max_bytes
        cache.min_free_bytes = settings.cache.min_free_bytes
        grace = 0.0 if unreferenced else settings.cache.unreferenced_grace
        gone, _ = await cache.delete_unreferenced(grace, dry_run=report.dry_run)
        why = "no link references it" + ("" if unreferenced else f" for {grace:g}s")
        report.removed += [Removal(UNREFERENCED, _blob_path(d), n, why) for d, n in gone]
        report.unreferenced_kept = len(cache.unreferenced()) - (len(gone) if report.dry_run else 0)
        if report.dry_run:  # what would be left, for the trim below
            cache.total -= sum(n for _, n in gone)
        evicted = await cache.trim(dry_run=report.dry_run)
        lru = "least recently used"
        report.removed += [Removal(EVICTED, _blob_path(d), n, lru) for d, n in evicted]
        report.cache_bytes = cache.total - (sum(n for _, n in evicted) if report.dry_run else 0)
        report.max_bytes = settings.cache.max_bytes
        if settings.cache.max_bytes is not None:
            report.low_watermark_bytes = int(settings.cache.max_bytes * LOW_WATERMARK)
    finally:
        await cache.close()
        if shared is not None:
            await shared.close()


def _blob_path(digest: Digest) -> str:
    return layout.blob_data(digest)


def _last_used(directory: Path) -> float:
    """The newest mtime in a session directory (the directory's own when it is empty)."""
    newest = 0.0
    for current, _, files in os.walk(directory):
        for name in files:
            try:
                newest = max(newest, os.lstat(os.path.join(current, name)).st_mtime)
            except FileNotFoundError:
                continue
    if newest == 0.0:
        try:
            newest = os.lstat(directory).st_mtime
        except FileNotFoundError:
            pass
    return newest


def _bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for current, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(current, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
