"""Repository links and tags, kept where the registry's truth is.

Without S3 the truth is local disk, written only by this process, so links read
are kept in memory until this store itself changes or deletes them (a manifest
GET then costs no disk access at all). With S3 the truth is the bucket, shared by
every host: reads are cached in memory for a short TTL (so a tag moved by another
host shows within it), and each link read or written is also copied to local
disk, so that what this host has served keeps being served while S3 is down
(stale-if-error).
"""

from __future__ import annotations

import logging
import time

from cachetools import Cache, LRUCache, TTLCache

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid, Unavailable
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver

log = logging.getLogger(__name__)

CACHE_ENTRIES = 100_000
# After S3 failed a read, links this host has a copy of are read locally for this
# long rather than each waiting out S3's timeouts again; others still ask S3.
OUTAGE_BACKOFF = 10.0


class LinkStore:
    def __init__(self, primary: Driver, *, local: FilesystemDriver | None = None, ttl: float = 0):
        self.primary = primary
        self.local = local if local is not primary else None
        self._cache: Cache[str, Digest] | None
        if self.local is None:
            self._cache = LRUCache(CACHE_ENTRIES)
        else:
            self._cache = TTLCache(CACHE_ENTRIES, ttl) if ttl > 0 else None
        self._down_until = 0.0

    async def read(self, key: str) -> Digest:
        """The digest a link holds; PathNotFound when there is no such link."""
        if self._cache is not None and (cached := self._cache.get(key)) is not None:
            return cached
        if self._marked_down() and (local := await self._local_copy(key)) is not None:
            return local  # S3 failed a moment ago: do not wait for its timeouts again
        try:
            digest = _parse(key, await self.primary.get(key))
        except StorageUnavailable as exc:
            self._mark_down(exc)
            return await self._stale(key, exc)
        if self._cache is not None:
            self._cache[key] = digest
        if self.local is not None:
            await self._copy_locally(key, digest)
        return digest

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
            self._mark_down(exc)
            try:
                return await self.local.list(key)
            except PathNotFound:
                raise Unavailable(f"storage unavailable: {exc}") from exc

    def _marked_down(self) -> bool:
        return self.local is not None and time.monotonic() < self._down_until

    def _mark_down(self, error: StorageUnavailable) -> None:
        if not self._marked_down():
            log.warning(
                "shared store failed (%s); serving local copies for %.0f s", error, OUTAGE_BACKOFF
            )
        self._down_until = time.monotonic() + OUTAGE_BACKOFF

    async def _stale(self, key: str, error: StorageUnavailable) -> Digest:
        local = await self._local_copy(key)
        if local is None:
            raise Unavailable(f"storage unavailable: {error}") from error
        return local

    async def _local_copy(self, key: str) -> Digest | None:
        if self.local is None:
            return None
        try:
            return _parse(key, await self.local.get(key))
        except PathNotFound:
            return None

    async def _copy_locally(self, key: str, digest: Digest) -> None:
        assert self.local is not None
        try:
            if _parse(key, await self.local.get(key)) == digest:
                return
        except PathNotFound:
            pass
        await self.local.put(key, str(digest).encode())


def _parse(key: str, content: bytes) -> Digest:
    try:
        return Digest.parse(content.decode("ascii", "replace").strip())
    except DigestInvalid as exc:
        raise PathNotFound(f"{key} holds no valid digest") from exc
