"""Repositories served from upstream registries (pull-through).

Tags are mutable: a tag's digest is trusted for the upstream's ``tag_ttl``, then
revalidated with a HEAD (cheap, and not counted against Docker Hub's pull limit);
when the upstream fails, the last known digest is served (stale-if-error).
Digests are immutable and kept until evicted. Identical concurrent requests
share one upstream request: manifests by (repository, reference), blobs by
digest (through :class:`~regmirror.fill.Fills`).

What was pulled is recorded under its own link tree (``<data>/proxy``, registry:2's
layout, keyed by upstream host and upstream repository name), apart from pushed
content: a cached tag is revalidated, a pushed one never is. The bytes share the
local content-addressed store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from cachetools import LRUCache

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import (
    FillFailed,
    ManifestInvalid,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnavailable,
)
from regmirror.eviction import BlobCache
from regmirror.fill import Fill, Fills, Source
from regmirror.links import LinkStore
from regmirror.manifest import Manifest, media_type_of, parse
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.stored import RemoteBlob, StoredBlob
from regmirror.upstream import Route

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_ENTRIES = 100_000


class PullThrough:
    def __init__(
        self,
        *,
        local: FilesystemDriver,
        links: LinkStore,
        fills: Fills,
        manifests: LRUCache[Digest, Manifest],
        shared: Driver | None = None,
        write_back: bool = False,
        on_upstream_error: Callable[[str, str], None] | None = None,
        cache: BlobCache | None = None,
    ):
        self.local = local
        self.cache = cache or BlobCache(local.root, shared=shared)
        self.links = links
        self.fills = fills
        self.manifests = manifests
        self.shared = shared
        self.write_back = write_back and shared is not None
        self._on_upstream_error = on_upstream_error
        # (cache name, tag) -> (digest, when last confirmed upstream)
        self._tags: LRUCache[tuple[str, str], tuple[Digest, float]] = LRUCache(TAG_ENTRIES)
        self._inflight: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- manifests -----------------------------------------------------------

    async def manifest(
        self, route: Route, reference: str | Digest, accept: Sequence[str]
    ) -> Manifest:
        name = cache_name(route)
        return await self._once(
            ("manifest", name, str(reference)),
            lambda: self._manifest(route, name, reference, accept),
        )

    async def _manifest(
        self, route: Route, name: str, reference: str | Digest, accept: Sequence[str]
    ) -> Manifest:
        if isinstance(reference, Digest):
            return await self._by_digest(route, name, reference, accept)
        digest, confirmed = await self._resolve_tag(route, name, reference, accept)
        manifest = await self._by_digest(route, name, digest, accept)
        if confirmed:  # recorded once per revalidation, not on every pull
            await self.links.write(layout.tag_current_link(name, reference), digest)
        return manifest

    async def _resolve_tag(
        self, route: Route, name: str, tag: str, accept: Sequence[str]
    ) -> tuple[Digest, bool]:
        """The tag's digest, and whether the upstream has just confirmed it."""
        known = self._tags.get((name, tag))
        now = time.monotonic()
        if known is not None and now - known[1] < route.upstream.settings.tag_ttl:
            return known[0], False
        try:
            head = await self._ask(route, route.upstream.head_manifest(route.name, tag, accept))
        except (UpstreamUnavailable, TooManyRequests) as exc:
            stale = known[0] if known is not None else await self._last_known(name, tag)
            if stale is None:
                raise
            log.warning(
                "upstream %s failed (%s); serving %s:%s stale", route.upstream, exc, name, tag
            )
            # Asked again after another TTL, so that a hung upstream delays one pull
            # per TTL instead of every pull.
            self._tags[(name, tag)] = (stale, time.monotonic())
            return stale, False
        self._tags[(name, tag)] = (head.digest, now)
        return head.digest, True

    async def _last_known(self, name: str, tag: str) -> Digest | None:
        try:
            return await self.links.read(layout.tag_current_link(name, tag))
        except PathNotFound:
            return None

    async def _by_digest(
        self, route: Route, name: str, digest: Digest, accept: Sequence[str]
    ) -> Manifest:
        if await self.links.exists(layout.revision_link(name, digest)):
            self.cache.touched(digest)
            cached = self.manifests.get(digest)
            if cached is not None:
                return cached
            try:
                return self._remember(digest, await self.local.get(layout.blob_data(digest)), None)
            except PathNotFound:
                pass  # evicted: fetch again
        raw, media_type = await self._fetch_manifest(route, digest, accept)
        manifest = self._remember(digest, raw, media_type)
        key = layout.blob_data(digest)
        await self.local.put(key, raw)
        self.cache.added(digest, len(raw), evictable=True)  # the upstream has it
        if self.write_back:
            assert self.shared is not None
            try:
                await self.shared.put(key, raw)
            except StorageUnavailable as exc:  # only the other hosts' copy is missed
                log.warning("writing manifest %s back to S3 failed: %s", digest, exc)
        for blob in manifest.blobs:
            await self.links.write(layout.layer_link(name, blob.digest), blob.digest)
        await self.links.write(layout.revision_link(name, digest), digest)
        return manifest

    async def _fetch_manifest(
        self, route: Route, digest: Digest, accept: Sequence[str]
    ) -> tuple[bytes, str | None]:
        """The manifest's bytes: from S3 when another host wrote them back, else upstream."""
        if self.shared is not None:
            try:
                raw = await self.shared.get(layout.blob_data(digest))
                if Digest.of(raw, digest.algorithm) == digest:
                    return raw, None
            except PathNotFound:
                pass
            except StorageUnavailable as exc:  # S3 is a shortcut here, not a requirement
                log.warning("S3 unavailable; manifest %s from the upstream: %s", digest, exc)
        fetched = await self._ask(
            route, route.upstream.get_manifest(route.name, str(digest), accept)
        )
        return fetched.raw, fetched.media_type

    def _remember(self, digest: Digest, raw: bytes, media_type: str | None) -> Manifest:
        try:
            manifest = parse(raw, media_type, digest)
        except ManifestInvalid:
            # The upstream's business: serve it as it is, with nothing to link.
            manifest = Manifest(
                media_type or media_type_of(raw), raw, digest, (), (), None, None, None
            )
        self.manifests[digest] = manifest
        return manifest

    # -- blobs ---------------------------------------------------------------

    async def blob(
        self, route: Route, digest: Digest, *, fetch: bool = True
    ) -> StoredBlob | Fill | RemoteBlob:
        """The blob on local disk, or its fill in flight from S3 or the upstream; without
        ``fetch``, only its size when it is not local."""
        name = cache_name(route)
        size = None

        async def upstream_size() -> int:
            return await self._once(
                ("stat", name, str(digest)), lambda: self._stat_and_link(route, name, digest)
            )

        if not await self.links.exists(layout.layer_link(name, digest)):
            size = await upstream_size()  # never pulled through here: the upstream decides
        key = layout.blob_data(digest)
        try:
            return StoredBlob(self.local.path(key), await self.local.stat(key))
        except PathNotFound:
            pass
        if not fetch:
            return RemoteBlob(size if size is not None else await upstream_size())
        fill = await self.fills.fetch(digest, self._source(route, digest), size=size)
        if self.write_back and not fill.done:
            self._spawn(self._write_back(fill), f"write back {digest}")
        return fill

    async def _stat_and_link(self, route: Route, name: str, digest: Digest) -> int:
        """The upstream's size for the blob, linked before any waiter is answered, so a
        request arriving after this finishes finds the link instead of asking again."""
        size = await self._ask(route, route.upstream.stat_blob(route.name, digest))
        await self.links.write(layout.layer_link(name, digest), digest)
        return size

    def _source(self, route: Route, digest: Digest) -> Source:
        async def open_at(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            if self.shared is not None:
                key = layout.blob_data(digest)
                try:
                    size = await self.shared.stat(key)
                except PathNotFound:
                    pass
                except StorageUnavailable as exc:
                    log.warning("S3 unavailable; blob %s from the upstream: %s", digest, exc)
                else:
                    return size, self.shared.reader(key, offset)
            stream = await self._ask(route, route.upstream.open_blob(route.name, digest, offset))
            return stream.size, stream.chunks

        return open_at

    async def _write_back(self, fill: Fill) -> None:
        assert self.shared is not None
        key = layout.blob_data(fill.digest)
        try:
            path = await fill.wait()
        except FillFailed:
            return  # failed, or streamed through without being kept: nothing to write back
        try:
            await self.shared.stat(key)
        except PathNotFound:
            await self.shared.put_file(key, path)
        except Exception:  # the pull itself is unaffected; only the shared copy is missed
            log.warning("writing %s back to S3 failed", fill.digest, exc_info=True)

    async def _ask(self, route: Route, call: Awaitable[T]) -> T:
        """An upstream request, its failure counted by upstream host and kind."""
        try:
            return await call
        except (UpstreamUnavailable, UpstreamDenied, TooManyRequests) as exc:
            if self._on_upstream_error is not None:
                kind = {UpstreamDenied: "denied", TooManyRequests: "rate_limited"}
                self._on_upstream_error(
                    route.upstream.registry_host, kind.get(type(exc), "unavailable")
                )
            raise

    # -- coalescing ----------------------------------------------------------

    async def _once(self, key: tuple[str, ...], work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` once for all concurrent callers with the same key.

        The work belongs to no caller: one that disconnects does not cancel it.
        """
        future = self._inflight.get(key)
        if future is None:
            future = self._inflight[key] = asyncio.ensure_future(work())
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        result: T = await asyncio.shield(future)
        return result

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        if name in {t.get_name() for t in self._background}:
            return
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def cache_name(route: Route) -> str:
    """Where a route's pulls are recorded: upstream host, then the upstream's name (as
    the upstream spells it: Docker Hub's ``nginx`` and ``library/nginx`` are one)."""
    host = route.upstream.registry_host.lower().replace(":", "-")
    return f"{host}/{route.upstream.remote_name(route.name)}"
