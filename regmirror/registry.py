"""The registry façade: repositories, their links, tags and manifests, over the tiers.

Content lives in registry:2's layout (:mod:`regmirror.layout`). Local disk
always holds what this host serves; when S3 is configured it is the shared
truth behind local disk: pushes are written through to it before they are
acknowledged, and local misses are filled from it. A blob is served under a
repository only when the repository links it, as registry:2 does, so a digest
known from one image does not leak through another name: pushed links of that
name, or (for a name routed to an upstream) links recorded for digests the upstream
confirmed for it (:mod:`regmirror.pullthrough`). No read is by digest alone.

Pushes never depend on upstreams: a blob probe (HEAD) answers from what is held
here, and an upstream that is down, refuses or hangs makes it a 404, not an error
(:meth:`Registry.blob`). Names matching an upstream's ``push_only`` globs are never
routed to it at all.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from cachetools import LRUCache

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    Unavailable,
    UpstreamDenied,
    UpstreamUnavailable,
)
from regmirror.eviction import BlobCache
from regmirror.fill import Fill, Fills, Origin
from regmirror.fleet.coordinator import Fleet
from regmirror.links import LinkStore
from regmirror.logs import served
from regmirror.manifest import Descriptor, Manifest, media_type_of, parse
from regmirror.pullthrough import PullThrough, read_manifest
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.stored import RemoteBlob, StoredBlob, StoredFiles
from regmirror.upstream import Route, UpstreamRouter

log = logging.getLogger(__name__)

# Parsed manifests by digest (immutable), bounded by their total size in bytes.
MANIFEST_CACHE_BYTES = 64 * 1024 * 1024
# The longest a blob probe (HEAD) waits for an upstream before answering 404: clients
# probe every layer before pushing it and must not hang on an upstream they do not need.
PROBE_TIMEOUT = 5.0


class Registry:
    def __init__(
        self,
        *,
        local: FilesystemDriver,
        fills: Fills,
        shared: Driver | None = None,
        link_ttl: float = 0,
        router: UpstreamRouter | None = None,
        write_back: bool = False,
        on_upstream_error: Callable[[str, str], None] | None = None,
        cache: BlobCache | None = None,
        shared_dir: bool = False,
        fleet: Fleet | None = None,
    ):
        """``shared_dir``: other processes serve the same data directory
        (:mod:`regmirror.workers`)."""
        self.local = local
        # What local disk holds, kept within its budget; unbounded unless given one.
        self.cache = cache or BlobCache(local.root, shared=shared)
        self.shared = shared
        self.fills = fills
        # Stored blobs' sizes and headers, forgotten when eviction deletes one.
        self.stored = StoredFiles(local)
        self.cache.on_evicted(self.stored.forget)
        self.links = LinkStore(shared or local, local=local, ttl=link_ttl, shared_dir=shared_dir)
        self.router = router
        self._on_upstream_error = on_upstream_error
        self._manifests: LRUCache[Digest, Manifest] = LRUCache(
            MANIFEST_CACHE_BYTES, getsizeof=lambda m: len(m.raw)
        )
        self.pullthrough = PullThrough(
            local=local,
            links=LinkStore(FilesystemDriver(local.root / "proxy"), shared_dir=shared_dir),
            fills=fills,
            manifests=self._manifests,
            shared=shared,
            write_back=write_back,
            on_upstream_error=on_upstream_error,
            cache=self.cache,
            stored=self.stored,
            shared_dir=shared_dir,
            fleet=fleet,
        )

    @property
    def primary(self) -> Driver:
        """Where the truth lives: S3 when configured, else local disk."""
        return self.shared or self.local

    def route(self, name: str, ns: str | None = None) -> Route | None:
        """The upstream serving ``name``, unless ``name`` is one of its push-only names."""
        route = self.router.route(name, ns) if self.router else None
        if route is None:
            return None
        if any(fnmatch.fnmatchcase(name, glob) for glob in route.upstream.settings.push_only):
            return None
        return route

    # -- blobs ---------------------------------------------------------------

    async def blob(
        self, name: str, digest: Digest, *, ns: str | None = None, fetch: bool = True
    ) -> StoredBlob | Fill | RemoteBlob:
        """The blob ``digest`` as seen from repository ``name``: on local disk, or its fill
        in flight from S3 or an upstream (only its size, without ``fetch``: a HEAD must not
        copy gigabytes). Pushed content answers before upstreams."""
        route = self.route(name, ns)
        if route is not None:
            # Confirmed upstream for this name and on local disk: the very bytes a pushed
            # link would give, served without asking S3 (which may be slow, or hung).
            held = await self.pullthrough.held_blob(route, digest)
            if held is not None:
                return held
        try:
            linked = await self.is_linked(name, digest)
        except Unavailable:
            if route is None and fetch:
                raise
            if route is None:  # a probe: the client uploads, and its PUT tries S3 anew
                raise BlobUnknown(
                    f"blob {digest} is not known here while S3 is unavailable",
                    {"digest": str(digest)},
                ) from None
            log.warning("shared store down; %s@%s goes to the upstream", name, digest)
            linked = False
        if not linked:
            if route is None:
                raise BlobUnknown(f"blob {digest} is not known in {name}", {"digest": str(digest)})
            if not fetch:
                return await self._probe(name, route, digest)
            return await self.pullthrough.blob(route, digest)
        key = layout.blob_data(digest)
        try:
            return await self.stored.find(digest)
        except PathNotFound:
            pass
        shared = self.shared
        if shared is None:
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)})
        if not fetch:
            try:
                return RemoteBlob(await shared.stat(key), "s3")
            except PathNotFound as exc:
                raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)}) from exc

        async def from_shared(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            try:
                return await shared.stat(key), shared.reader(key, offset)
            except PathNotFound as exc:
                raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)}) from exc

        return await self.fills.fetch(digest, from_shared, origin=Origin("s3", shared.name))

    def blob_now(self, name: str, digest: Digest, *, ns: str | None = None) -> StoredBlob | None:
        """The blob :meth:`blob` finds on local disk, when memory (and a ``stat`` per link
        where workers share the directory) tells it without waiting; None when only
        ``blob`` can tell. The fast path's (:mod:`regmirror.lean`)."""
        route = self.route(name, ns)
        if route is not None and (held := self.pullthrough.held_blob_now(route, digest)):
            return held
        links = self.links
        if links.peek(layout.layer_link(name, digest)) or links.peek(
            layout.revision_link(name, digest)
        ):
            return self.stored.peek(digest)
        return None

    async def _probe(self, name: str, route: Route, digest: Digest) -> StoredBlob | RemoteBlob:
        """A HEAD of a blob ``name`` has not linked, as docker, podman and skopeo send for
        every layer before pushing it. The upstream is asked only when this name has
        nothing pushed (a first push building on an upstream image finds its base layers
        there, and the manifest PUT adopts them: :meth:`_adopt`), and whatever goes wrong
        there is a 404, counted, so the client uploads: pushes never depend on upstreams.
        """
        unknown = BlobUnknown(f"blob {digest} is not known in {name}", {"digest": str(digest)})
        if not await self.pullthrough.confirmed(route, digest) and await self._has_pushed(name):
            raise unknown
        try:
            found = await asyncio.wait_for(
                self.pullthrough.blob(route, digest, fetch=False), PROBE_TIMEOUT
            )
        except TimeoutError as exc:  # the upstream request goes on, shielded, for others
            if self._on_upstream_error is not None:
                self._on_upstream_error(route.upstream.registry_host, "unavailable")
            log.warning("blob probe %s@%s: upstream %s timed out", name, digest, route.upstream)
            raise unknown from exc
        except (UpstreamUnavailable, UpstreamDenied, TooManyRequests) as exc:  # counted there
            log.info("blob probe %s@%s: upstream %s failed: %s", name, digest, route.upstream, exc)
            raise unknown from exc
        assert not isinstance(found, Fill)  # not fetched
        return found

    async def _has_pushed(self, name: str) -> bool:
        """Whether ``name`` holds pushed content (registry:2: it has layer or manifest links)."""
        try:
            children = await self.links.list(layout.repository(name))
        except Unavailable:
            return False  # unknown: the upstream may still answer the probe
        return "_layers" in children or "_manifests" in children

    async def is_linked(self, name: str, digest: Digest) -> bool:
        return await self.links.exists(layout.layer_link(name, digest)) or await self.links.exists(
            layout.revision_link(name, digest)
        )

    async def commit_blob(self, name: str, digest: Digest, data: Path) -> None:
        """Take a verified, fsynced upload file into the store and link it to ``name``.

        With S3 the blob is durable in the bucket before this returns.
        """
        key = layout.blob_data(digest)
        await self._to_shared(key, data)
        # The verified upload always becomes the local copy: one rename, and a file already
        # there (from whatever wrote it) is never trusted over bytes just verified. Held: it
        # is not evicted before it is linked and pinned.
        async with self.cache.holding(digest):
            await self.local.move_in(key, data)
            # A file it replaced (damaged: another size) must not be served by the size
            # remembered for it: that body would miss its digest.
            self.stored.forget(digest)
            await self._link_pushed(name, digest)

    async def _to_shared(self, key: str, source: Path) -> None:
        """With S3, make sure it holds ``key`` as ``source``: a pushed blob is durable there
        first. An object of another size under this digest is not this blob: the verified
        file replaces it. (One of the same size is kept: hashing it again would read every
        pushed layer back from S3.)"""
        if self.shared is None:
            return
        size = (await asyncio.to_thread(source.stat)).st_size
        try:
            held: int | None = await self.shared.stat(key)
        except PathNotFound:
            held = None
        except StorageUnavailable:
            held = None  # not known (reads may be skipping S3 after a failure): write it
        if held != size:
            await self.shared.put_file(key, source)

    async def _link_pushed(self, name: str, digest: Digest) -> None:
        """Link a blob now on local disk into ``name`` and record it in the cache: without
        S3 this disk holds the only copy (see eviction's never-evict rule)."""
        await self.links.write(layout.layer_link(name, digest), digest)
        size = await self.local.stat(layout.blob_data(digest))
        self.cache.added(digest, size, evictable=self.shared is not None)

    async def mount(self, name: str, source: str, digest: Digest) -> bool:
        """Link a blob that ``source`` holds into ``name``; False when ``source`` lacks it,
        or when S3 cannot tell now (the client then uploads: a push does not wait on a
        read S3 cannot answer; its upload tries S3 anew)."""
        try:
            if not await self.is_linked(source, digest):
                return False
            if not await _exists(self.primary, layout.blob_data(digest)):
                return False
        except (Unavailable, StorageUnavailable):
            return False
        await self.links.write(layout.layer_link(name, digest), digest)
        return True

    async def delete_blob(self, name: str, digest: Digest) -> None:
        key = layout.layer_link(name, digest)
        if not await self.links.exists(key):
            raise BlobUnknown(f"blob {digest} is not known in {name}", {"digest": str(digest)})
        await self.links.delete(key.removesuffix("/link"))

    # -- manifests -----------------------------------------------------------

    async def manifest(
        self,
        name: str,
        reference: str | Digest,
        *,
        ns: str | None = None,
        accept: Sequence[str] = (),
    ) -> Manifest:
        """A pushed manifest, else (when an upstream serves ``name``) a pulled one."""
        route = self.route(name, ns)
        if route is not None and isinstance(reference, Digest):
            # Same bytes whoever holds them: what was pulled here needs no S3 read.
            held = await self.pullthrough.held_manifest(route, reference)
            if held is not None:
                return held
        try:
            return await self.pushed_manifest(name, reference)
        except ManifestUnknown:
            if route is None:
                raise
        except Unavailable:
            # Pushed content cannot be looked up: the upstream is better than nothing.
            if route is None:
                raise
            log.warning("shared store down; %s:%s goes to the upstream", name, reference)
        return await self.pullthrough.manifest(route, reference, accept)

    def manifest_now(
        self, name: str, reference: str | Digest, *, ns: str | None = None
    ) -> Manifest | None:
        """What :meth:`manifest` answers, when memory (and a ``stat`` per link where
        workers share the directory) tells it without waiting on storage or an upstream:
        a pushed manifest, or one pulled through asked for by digest. None when only
        ``manifest`` can tell (it may answer the same). The fast path's
        (:mod:`regmirror.lean`); a tag an upstream serves is always ``manifest``'s, which
        revalidates it."""
        route = self.route(name, ns)
        if route is None:
            digest = (
                reference
                if isinstance(reference, Digest)
                else self.links.peek(layout.tag_current_link(name, reference))
            )
            if digest is None or self.links.peek(layout.revision_link(name, digest)) is None:
                return None
            manifest = self._manifests.get(digest)
            if manifest is not None:
                self.cache.touched(digest)
            return manifest
        if isinstance(reference, Digest):
            return self.pullthrough.held_manifest_now(route, reference)
        return None

    async def pushed_manifest(self, name: str, reference: str | Digest) -> Manifest:
        digest = await self.resolve(name, reference)
        if not await self.links.exists(layout.revision_link(name, digest)):
            raise ManifestUnknown(
                f"manifest {digest} is not known in {name}", {"reference": str(reference)}
            )
        return await self._load_manifest(digest)

    async def resolve(self, name: str, reference: str | Digest) -> Digest:
        if isinstance(reference, Digest):
            return reference
        try:
            return await self.links.read(layout.tag_current_link(name, reference))
        except PathNotFound as exc:
            raise ManifestUnknown(
                f"tag {reference!r} is not known in {name}", {"tag": reference}
            ) from exc

    async def put_manifest(
        self, name: str, reference: str | Digest, raw: bytes, content_type: str | None
    ) -> Manifest:
        """Validate and store a manifest; every blob and child it names must be in ``name``."""
        algorithm = reference.algorithm if isinstance(reference, Digest) else "sha256"
        manifest = parse(raw, content_type, Digest.of(raw, algorithm))
        if isinstance(reference, Digest) and manifest.digest != reference:
            raise DigestInvalid(
                f"manifest content has digest {manifest.digest}, not {reference}",
                {"expected": str(reference), "actual": str(manifest.digest)},
            )
        await self._check_references(name, manifest)
        key = layout.blob_data(manifest.digest)
        digest = manifest.digest
        async with self.cache.holding(digest):
            await self.primary.put(key, raw)
            if self.shared is not None:
                await self.local.put(key, raw)
            self.cache.added(digest, len(raw), evictable=self.shared is not None)
        await self.links.write(layout.revision_link(name, digest), digest)
        if manifest.subject is not None:
            await self.links.write(
                layout.referrer_link(name, manifest.subject.digest, digest), digest
            )
        if isinstance(reference, str):
            # The index entry first: registry:2 reads a tag's history from it.
            await self.links.write(layout.tag_index_link(name, reference, digest), digest)
            await self.links.write(layout.tag_current_link(name, reference), digest)
        self._manifests[digest] = manifest
        return manifest

    async def delete_manifest(self, name: str, reference: str | Digest) -> None:
        """Delete a tag, or a manifest together with the tags that point at it."""
        if isinstance(reference, str):
            await self.resolve(name, reference)
            await self.links.delete(layout.tag(name, reference))
            return
        manifest = await self.pushed_manifest(name, reference)
        for tag in await self.links.list(layout.tags(name)):
            try:
                if await self.resolve(name, tag) == reference:
                    await self.links.delete(layout.tag(name, tag))
            except ManifestUnknown:
                continue  # deleted concurrently
        if manifest.subject is not None:
            link = layout.referrer_link(name, manifest.subject.digest, reference)
            await self.links.delete(link.removesuffix("/link"))
        await self.links.delete(layout.revision_link(name, reference).removesuffix("/link"))

    async def _check_references(self, name: str, manifest: Manifest) -> None:
        for blob in manifest.blobs:
            if blob.foreign:
                continue  # non-distributable layers live at their urls
            if await self.links.exists(layout.layer_link(name, blob.digest)):
                continue
            if not await self._adopt(name, blob.digest):
                raise ManifestBlobUnknown(
                    f"blob {blob.digest} ({blob.media_type}) is not pushed to {name}",
                    {"digest": str(blob.digest)},
                )
        for child in manifest.children:
            if not await self.links.exists(layout.revision_link(name, child.digest)):
                raise ManifestBlobUnknown(
                    f"manifest {child.digest} is not pushed to {name}",
                    {"digest": str(child.digest)},
                )

    async def _adopt(self, name: str, digest: Digest) -> bool:
        """Make a blob the upstream serves under ``name`` part of what was pushed there.

        A client pushing to a name an upstream also serves skips the layers our HEAD
        said exist (base layers, typically): they are copied into the pushed store, to
        S3 as well, so the pushed manifest never names a blob the store lacks.
        """
        route = self.route(name)
        if route is None:
            return False
        try:
            found = await self.pullthrough.blob(route, digest)
        except (BlobUnknown, UpstreamDenied):
            return False  # an upstream outage stays a 503: the client may retry
        assert not isinstance(found, RemoteBlob)  # fetched: local, or filling
        async with self.cache.holding(digest):
            path = found.path if isinstance(found, StoredBlob) else await found.wait()
            await self._to_shared(layout.blob_data(digest), path)
            await self._link_pushed(name, digest)
        return True

    async def _load_manifest(self, digest: Digest) -> Manifest:
        self.cache.touched(digest)
        cached = self._manifests.get(digest)
        if cached is not None:
            served.mark("local")
            return cached
        try:
            raw = await read_manifest(self.local, digest)
            served.mark("local")
        except PathNotFound:  # evicted: read again from S3
            raw = await self._fetch_manifest(digest)
            served.mark("s3")
        try:
            manifest = parse(raw, None, digest)
        except ManifestInvalid:
            # Stored by another registry in a form we would not accept: serve it as is.
            manifest = Manifest(media_type_of(raw), raw, digest, (), (), None, None, None)
        self._manifests[digest] = manifest
        return manifest

    async def _fetch_manifest(self, digest: Digest) -> bytes:
        """A linked manifest from S3: bounded by the cap and verified (read_manifest)."""
        if self.shared is None:
            raise ManifestUnknown(f"manifest {digest} is not stored")
        try:
            raw = await read_manifest(self.shared, digest)
        except PathNotFound as exc:
            raise ManifestUnknown(f"manifest {digest} is not stored") from exc
        await self.local.put(layout.blob_data(digest), raw)
        self.cache.added(digest, len(raw), evictable=True)  # S3 holds it
        return raw

    # -- listings ------------------------------------------------------------

    async def tags(self, name: str, *, ns: str | None = None) -> list[str]:
        """The tags of ``name`` in lexical order: those pushed here and, when an upstream
        serves the name, the upstream's. A repository with pushed content is listed
        even when its upstream fails or does not know the name."""
        route = self.route(name, ns)
        try:
            pushed = await self.links.list(layout.tags(name))
            known = bool(pushed) or bool(await self.links.list(layout.repository(name)))
        except Unavailable:
            if route is None:
                raise
            log.warning("shared store down; the tags of %s come from the upstream only", name)
            pushed, known = [], False
        if route is None:
            if not known:
                raise NameUnknown(f"repository {name} is not known", {"name": name})
            return pushed
        try:
            pulled = await self.pullthrough.tags(route)
        except (NameUnknown, UpstreamDenied, Unavailable, TooManyRequests) as exc:
            if not known:
                raise
            log.info("listing only the pushed tags of %s: %s", name, exc)
            return pushed
        return sorted({*pushed, *pulled})

    async def catalog(self) -> list[str]:
        return sorted(await self._walk_repositories(layout.REPOSITORIES, ""))

    async def referrers(self, name: str, subject: Digest) -> list[Descriptor]:
        found = []
        base = layout.referrers(name, subject)
        for algorithm in await self.links.list(base):
            for encoded in await self.links.list(f"{base}/{algorithm}"):
                try:
                    digest = await self.links.read(f"{base}/{algorithm}/{encoded}/link")
                    found.append((await self._load_manifest(digest)).describe())
                except (PathNotFound, ManifestUnknown):
                    continue  # deleted while we listed
        return found

    async def _walk_repositories(self, key: str, prefix: str) -> list[str]:
        names = []
        children = await self.links.list(key)
        if prefix and ("_manifests" in children or "_layers" in children):
            names.append(prefix.rstrip("/"))
        for child in children:
            if not child.startswith("_"):
                names += await self._walk_repositories(f"{key}/{child}", f"{prefix}{child}/")
        return names


async def _exists(driver: Driver, key: str) -> bool:
    try:
        await driver.stat(key)
    except PathNotFound:
        return False
    return True
