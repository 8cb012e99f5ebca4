"""Repository links and tags, kept where the registry's truth is.

Without S3 the truth is local disk, written only by this process, so links read
are kept in memory until this store itself changes or deletes them (a manifest
GET then costs no disk access at all). With S3 the truth is the bucket, shared by
every host: reads are cached in memory for a short TTL (so a tag moved by another
host shows within it), and each link read or written is also copied to local
disk, so that what this host has served keeps being served while S3 is down
(stale-if-error). How long a read may wait for S3, and that it is not asked again for
a while after it failed, is the shared store's wrapper's business
(:mod:`regmirror.storage.counted`): a failed read falls back to the local copy here.

With several worker processes on one data directory (``server.workers``) local disk is
written by all of them: a link kept in memory is then checked against its file on every
read (one ``stat``: a link is replaced by a rename, so a new inode says it changed, and a
missing file that it was deleted), so what one worker changes the others see at once.
With S3 too, a read cached for the TTL is kept only while the local copy is the one it
made or found (one ``stat``): a worker that read a moved tag from S3 rewrote that copy,
so the others ask S3 again rather than serve the old digest after it served the new.
"""

from __future__ import annotations

import functools
import os

from cachetools import Cache, LRUCache, TTLCache

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid, Unavailable
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge
from regmirror.storage.filesystem import FilesystemDriver

CACHE_ENTRIES = 100_000
MAX_LINK_BYTES = 1024  # a link holds one digest; anything bigger is not a link


class LinkStore:
    def __init__(
        self,
        primary: Driver,
        *,
        local: FilesystemDriver | None = None,
        ttl: float = 0,
        shared_dir: bool = False,
    ):
        """``shared_dir``: other processes write the same directory (workers), so a link
        kept in memory is checked against its file on every read."""
        self.primary = primary
        self.local = local if local is not primary else None
        self._cache: Cache[str, Digest] | None
        # key -> the link file's (inode, mtime, size) when its digest was read
        self._seen: Cache[str, tuple[int, int, int]] | None = None
        self._dir = primary if shared_dir and isinstance(primary, FilesystemDriver) else None
        # The files stat'ed on every read, by key (their paths cost more to build than the stat).
        self._path_of = functools.lru_cache(maxsize=CACHE_ENTRIES)(_file_path)
        # key -> the local copy's identity when a read from S3 was cached (workers)
        self._copies: Cache[str, tuple[int, int, int] | None] | None = None
        if self.local is None and self._dir is not None:
            self._cache = LRUCache(CACHE_ENTRIES)
            self._seen = LRUCache(CACHE_ENTRIES)
        elif self.local is None:
            self._cache = LRUCache(CACHE_ENTRIES)
        else:
            self._cache = TTLCache(CACHE_ENTRIES, ttl) if ttl > 0 else None
            if shared_dir and self._cache is not None:
                self._copies = LRUCache(CACHE_ENTRIES)

    def peek(self, key: str) -> Digest | None:
        """The digest :meth:`read` answers, when it is known without waiting on storage
        (memory, and one ``stat`` where other processes share the directory); None when
        only ``read`` can tell (not read yet, changed, deleted or absent). The fast
        path's lookup (:mod:`regmirror.lean`), and ``read``'s own first step."""
        if self._dir is not None:
            assert self._cache is not None and self._seen is not None
            try:
                seen = self._file_id(key)
            except PathNotFound:
                return None
            return self._cache.get(key) if self._seen.get(key) == seen else None
        if self._cache is None:
            return None
        cached = self._cache.get(key)
        if cached is None or self._copies is None:
            return cached
        if key in self._copies and self._copies[key] == self._copy_id(key):
            return cached  # no other worker has rewritten the copy since
        return None

    async def read(self, key: str) -> Digest:
        """The digest a link holds; PathNotFound when there is no such link."""
        cached = self.peek(key)
        if cached is not None:
            return cached
        # Stat'ed before the read: a change after it is seen by the next peek.
        seen = self._file_id(key) if self._dir is not None else None  # PathNotFound: deleted
        try:
            digest = _parse(key, await self.primary.get(key, limit=MAX_LINK_BYTES))
        except TooLarge as exc:
            raise PathNotFound(f"{key} holds no valid digest") from exc
        except StorageUnavailable as exc:
            return await self._stale(key, exc)
        if self._cache is not None:
            self._cache[key] = digest
        if self._seen is not None and seen is not None:
            self._seen[key] = seen  # as stat'ed before the read: a change since reads again
        if self.local is not None:
            await self._copy_locally(key, digest)
        if self._copies is not None:
            await self._remember_copy(key, digest)
        return digest

    def _copy_id(self, key: str) -> tuple[int, int, int] | None:
        """The local copy's identity now; None when there is none."""
        assert self.local is not None
        try:
            st = os.stat(self._path_of(self.local, key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def _remember_copy(self, key: str, digest: Digest) -> None:
        """Keep ``digest`` (just read from S3) cached while the local copy stays the one
        holding it: stat'ed first, then read, so another worker's rewrite in between is
        seen (not cached: the next read asks S3), and one after it changes the identity."""
        assert self._copies is not None and self._cache is not None
        seen = self._copy_id(key)
        if await self._local_copy(key) == digest:
            self._copies[key] = seen
        else:
            self._cache.pop(key, None)
            self._copies.pop(key, None)

    def _file_id(self, key: str) -> tuple[int, int, int]:
        """The link file's identity now (a stat of a hot dentry: microseconds, no thread)."""
        assert self._dir is not None
        try:
            st = os.stat(self._path_of(self._dir, key))
        except (FileNotFoundError, NotADirectoryError) as exc:
            if self._cache is not None:
                self._cache.pop(key, None)
            raise PathNotFound(key) from exc
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def exists(self, key: str) -> bool:
        try:
            await self.read(key)
        except PathNotFound:
            return False
        return True

    async def write(self, key: str, digest: Digest) -> None:
        await self.primary.put(key, str(digest).encode())
        if self._cache is not None:
            self._cache[key] = digest
        if self._seen is not None:
            self._seen.pop(key, None)  # the next read stat()s the file written
        if self._copies is not None:
            self._copies.pop(key, None)  # the next read asks S3 once
        if self.local is not None:
            await self.local.put(key, str(digest).encode())

    async def delete(self, key: str) -> None:
        """Delete ``key`` (a link file or a directory of them) everywhere."""
        await self.primary.delete(key)
        if self._cache is not None:
            for cached in [k for k in self._cache if k == key or k.startswith(key + "/")]:
                self._cache.pop(cached, None)
        if self.local is not None:
            await self.local.delete(key)

    async def list(self, key: str) -> list[str]:
        """Names below ``key``; empty when there are none."""
        try:
            return await self.primary.list(key)
        except PathNotFound:
            return []
        except StorageUnavailable as exc:
            if self.local is None:
                raise Unavailable(f"storage unavailable: {exc}") from exc
            try:
                return await self.local.list(key)
            except PathNotFound:
                raise Unavailable(f"storage unavailable: {exc}") from exc

    async def _stale(self, key: str, error: StorageUnavailable) -> Digest:
        local = await self._local_copy(key)
        if local is None:
            raise Unavailable(f"storage unavailable: {error}") from error
        return local

    async def _local_copy(self, key: str) -> Digest | None:
        if self.local is None:
            return None
        try:
            return _parse(key, await self.local.get(key, limit=MAX_LINK_BYTES))
        except (PathNotFound, TooLarge):
            return None

    async def _copy_locally(self, key: str, digest: Digest) -> None:
        assert self.local is not None
        try:
            if _parse(key, await self.local.get(key, limit=MAX_LINK_BYTES)) == digest:
                return
        except (PathNotFound, TooLarge):
            pass
        await self.local.put(key, str(digest).encode())


def _file_path(driver: FilesystemDriver, key: str) -> str:
    return os.fspath(driver.path(key))


def _parse(key: str, content: bytes) -> Digest:
    try:
        return Digest.parse(content.decode("ascii", "replace").strip())
    except DigestInvalid as exc:
        raise PathNotFound(f"{key} holds no valid digest") from exc
