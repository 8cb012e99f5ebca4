"""Repositories served from upstream registries (pull-through).

Tags are mutable: a tag's digest is trusted for the upstream's ``tag_ttl``, then
revalidated with a HEAD (cheap, and not counted against Docker Hub's pull limit);
when the upstream fails, the last known digest is served (stale-if-error). One tag
has one digest per representation (what the upstream answers a given ``Accept``, see
:mod:`regmirror.negotiation`), and each is cached, revalidated and recorded on its own.
Digests are immutable and kept until evicted. Identical concurrent requests
share one upstream request: manifests by (repository, reference, representation),
blobs by digest (through :class:`~regmirror.fill.Fills`). With other processes on the
data directory (``server.workers``) that holds for the host: a tag's resolution, a
manifest's GET, a blob's HEAD and a tag list are each asked by one worker, which stores
what it learnt, the others answering from that (:mod:`regmirror.hostflight`); the
in-memory coalescing stays in front, so each worker takes part once.

What was pulled is recorded under its own link tree (``<data>/proxy``, registry:2's
layout, keyed by upstream host and upstream repository name), apart from pushed
content: a cached tag is revalidated, a pushed one never is. The bytes share the
local content-addressed store.

Every read is of a digest the upstream confirmed for the repository: one it named
(a tag it resolved, a manifest it served listing the blob, a HEAD it answered), then
recorded as a link here. Only such a digest is read from local disk or from S3: S3
holds every pushed manifest and layer whatever its repository, so reading it by
digest alone would serve pushed content under any name routed to an upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from cachetools import LRUCache

from regmirror import hostflight, layout
from regmirror.digest import Digest
from regmirror.errors import (
    DigestInvalid,
    FillFailed,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnavailable,
)
from regmirror.eviction import BlobCache
from regmirror.fill import Fill, Fills, Origin, Source
from regmirror.fleet import tags as fleet_tags
from regmirror.fleet.coordinator import Fleet
from regmirror.fleet.leases import manifest_lease
from regmirror.hostflight import HostFlights
from regmirror.links import LinkStore
from regmirror.logs import served
from regmirror.logs.throttle import Throttled
from regmirror.manifest import INDEX_TYPES, MAX_MANIFEST_BYTES, Manifest, media_type_of, parse
from regmirror.negotiation import EVERYTHING, Representation, default_image, negotiate
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.stored import RemoteBlob, StoredBlob, StoredFiles
from regmirror.upstream import Route

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_ENTRIES = 100_000
TAG_LIST_TAGS = 1_000_000  # tags kept in memory across every cached tag list
# A worker waits for another's flight at most this many upstream requests' stall timeouts
# (a flight asks for a token, a HEAD and a GET at most), then asks itself.
FLIGHT_WAIT_REQUESTS = 3


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
        stored: StoredFiles | None = None,
        shared_dir: bool = False,
        fleet: Fleet | None = None,
    ):
        """``shared_dir``: other processes serve the same data directory (workers): a
        tag one of them confirmed upstream (its link's mtime) is fresh here too, and
        identical upstream requests are single-flights for the host."""
        self.local = local
        self.shared_dir = shared_dir
        self._flights = HostFlights(local.root / hostflight.DIRECTORY) if shared_dir else None
        self.fleet = fleet if write_back and shared is not None else None
        self.cache = cache or BlobCache(local.root, shared=shared)
        self.stored = stored or StoredFiles(local)
        self.links = links
        self.fills = fills
        self.manifests = manifests
        self.shared = shared
        self.write_back = write_back and shared is not None
        self._on_upstream_error = on_upstream_error
        # (cache name, tag, representation) -> (digest, when last confirmed upstream)
        self._tags: LRUCache[tuple[str, str, str], tuple[Digest, float]] = LRUCache(TAG_ENTRIES)
        # cache name -> (its tags upstream, sorted; when last fetched)
        self._tag_lists: LRUCache[str, tuple[list[str], float]] = LRUCache(
            TAG_LIST_TAGS, getsizeof=lambda entry: len(entry[0]) + 1
        )
        self._inflight: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._errors = Throttled(log)  # an outage fails every request: a line a minute
        self._background: set[asyncio.Task[None]] = set()

    # -- manifests -----------------------------------------------------------

    async def manifest(
        self, route: Route, reference: str | Digest, accept: Sequence[str]
    ) -> Manifest:
        """The manifest ``reference`` names upstream. A tag is resolved, cached, coalesced
        and recorded per representation (see :mod:`regmirror.negotiation`): what the
        upstream answers a client with this ``Accept``, never another client's answer."""
        name = cache_name(route)
        key: tuple[str, ...]
        if isinstance(reference, Digest):
            wanted, key = EVERYTHING, ("manifest", name, str(reference))
        else:
            wanted = negotiate(accept)
            key = ("manifest", name, reference, wanted.key)
        return await self._once(key, lambda: self._manifest(route, name, reference, wanted))

    async def _manifest(
        self, route: Route, name: str, reference: str | Digest, wanted: Representation
    ) -> Manifest:
        # A digest names one representation: there is nothing to negotiate, and what is
        # served must not depend on whether it was cached, so the upstream is offered
        # every type (registry:2 refuses an OCI digest to an Accept without its type).
        if isinstance(reference, Digest):
            return await self._by_digest(route, name, reference, EVERYTHING.accept)
        digest, confirmed = await self._resolve_tag(route, name, reference, wanted)
        # The upstream named this digest for the tag (now, or when it was cached).
        manifest = await self._by_digest(route, name, digest, EVERYTHING.accept, named=True)
        if confirmed:  # recorded once per revalidation, not on every pull
            await self.links.write(tag_link(name, reference, wanted), digest)
        if manifest.media_type in INDEX_TYPES and manifest.media_type not in wanted.types:
            return await self._default_image(route, name, reference, manifest, wanted)
        return manifest

    async def _default_image(
        self, route: Route, name: str, tag: str, index: Manifest, wanted: Representation
    ) -> Manifest:
        """The upstream ignored the client's ``Accept`` and answered a list or index it
        cannot read: its linux/amd64 image instead, as registry:2 and Docker Hub answer
        such a client, when the client reads that; else nothing."""
        image = default_image(index.raw)
        if image is None or image[0] not in wanted.types:
            raise ManifestUnknown(
                f"{name}:{tag} is a {index.media_type}, and it names no linux/amd64 image "
                f"of a type the client accepts ({wanted})",
                {"tag": tag},
            )
        return await self._by_digest(route, name, image[1], EVERYTHING.accept, named=True)

    async def _resolve_tag(
        self, route: Route, name: str, tag: str, wanted: Representation
    ) -> tuple[Digest, bool]:
        """The tag's digest in representation ``wanted``, and whether the upstream has
        just confirmed it."""
        known = self._tags.get((name, tag, wanted.key))
        now = time.monotonic()
        ttl = route.upstream.settings.tag_ttl
        if self.shared_dir and (known is None or now - known[1] >= ttl):
            # Another worker may have confirmed it since (one upstream HEAD per tag_ttl
            # for the host, not per worker).
            elsewhere = await self._confirmed_elsewhere(name, tag, wanted, now)
            if elsewhere is not None and (known is None or elsewhere[1] > known[1]):
                known = elsewhere
        if known is not None and now - known[1] < ttl:
            return known[0], False

        async def ask() -> Digest:
            head = await self._ask(
                route, route.upstream.head_manifest(route.name, tag, wanted.accept)
            )
            return head.digest

        asked = False

        async def confirm() -> tuple[Digest, float]:
            """The digest, and when the upstream named it (on ``time.monotonic()``)."""
            nonlocal asked
            asked = True
            if self.fleet is not None:  # one revalidation per TTL for the fleet
                key = fleet_tags.record_key(name, tag, wanted.key)
                digest, age = await fleet_tags.revalidate(
                    self.fleet, key, route.upstream.settings.tag_ttl, ask
                )
                return digest, time.monotonic() - age
            return await ask(), time.monotonic()

        async def decode(value: object) -> tuple[Digest, float] | None:
            confirmation = _decode_confirmation(value)
            if confirmation is None or time.monotonic() - confirmation[1] >= ttl:
                return None  # too old: this caller asks
            return confirmation

        try:
            # Another worker's answer, when it asked meanwhile or within the TTL: it
            # records the link, but only once the manifest is stored, after its flight.
            digest, now = await self._hostwide(
                route,
                ("tag", name, tag, wanted.key),
                confirm,
                since=now,
                fresh=now - ttl,
                encode=lambda answer: [str(answer[0]), answer[1]],
                decode=decode,
            )
        except (UpstreamUnavailable, TooManyRequests) as exc:
            stale = known[0] if known is not None else await self._last_known(name, tag, wanted)
            if stale is None:
                raise
            log.warning(
                "upstream %s failed (%s); serving %s:%s stale (to clients accepting %s)",
                route.upstream,
                exc,
                name,
                tag,
                wanted,
            )
            # Asked again after another TTL, so that a hung upstream delays one pull
            # per TTL instead of every pull.
            self._tags[(name, tag, wanted.key)] = (stale, time.monotonic())
            return stale, False
        self._tags[(name, tag, wanted.key)] = (digest, now)
        return digest, asked

    async def _confirmed_elsewhere(
        self, name: str, tag: str, wanted: Representation, now: float
    ) -> tuple[Digest, float] | None:
        """The tag as another process last confirmed it, and when (on this clock): its
        link is rewritten on every confirmation, so the file's mtime says when."""
        primary = self.links.primary
        if not isinstance(primary, FilesystemDriver):
            return None
        key = tag_link(name, tag, wanted)
        try:
            age = time.time() - (await asyncio.to_thread(os.stat, primary.path(key))).st_mtime
            digest = await self.links.read(key)
        except (OSError, PathNotFound):
            return None
        return digest, now - max(age, 0.0)

    async def _last_known(self, name: str, tag: str, wanted: Representation) -> Digest | None:
        try:
            return await self.links.read(tag_link(name, tag, wanted))
        except PathNotFound:
            return None

    async def held_manifest(self, route: Route, digest: Digest) -> Manifest | None:
        """The manifest when it was pulled through for ``route`` and this host still has
        it (in memory or on local disk); None otherwise. Asks nobody else."""
        name = cache_name(route)
        if not await self.links.exists(layout.revision_link(name, digest)):
            return None
        self.cache.touched(digest)
        cached = self.manifests.get(digest)
        if cached is None:
            try:
                cached = self._remember(digest, await read_manifest(self.local, digest), None)
            except (PathNotFound, ManifestTooLarge):
                return None  # evicted (or not a manifest we serve): fetched again
        served.mark("local")
        return cached

    def held_manifest_now(self, route: Route, digest: Digest) -> Manifest | None:
        """:meth:`held_manifest`'s answer when it is in memory; None otherwise."""
        if self.links.peek(layout.revision_link(cache_name(route), digest)) is None:
            return None
        manifest = self.manifests.get(digest)
        if manifest is not None:
            self.cache.touched(digest)
        return manifest

    async def _by_digest(
        self,
        route: Route,
        name: str,
        digest: Digest,
        accept: Sequence[str],
        *,
        named: bool = False,
    ) -> Manifest:
        """``named``: the upstream has confirmed ``digest`` for this repository."""
        since = time.monotonic()
        held = await self.held_manifest(route, digest)
        if held is not None:
            return held

        async def stored(_: object) -> Manifest | None:
            return await self.held_manifest(route, digest)  # what another worker pulled

        return await self._hostwide(
            route,
            ("manifest", name, str(digest)),
            lambda: self._pull_manifest(route, name, digest, accept, named),
            since=since,
            encode=lambda _: None,
            decode=stored,
        )

    async def _pull_manifest(
        self, route: Route, name: str, digest: Digest, accept: Sequence[str], named: bool
    ) -> Manifest:
        """Fetch manifest ``digest`` (from S3 or the upstream), store and link it."""
        linked = await self.links.exists(layout.revision_link(name, digest))
        raw, media_type = await self._fetch_manifest(route, digest, accept, named or linked)
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
        self, route: Route, digest: Digest, accept: Sequence[str], confirmed: bool
    ) -> tuple[bytes, str | None]:
        """The manifest's bytes: from S3 when another host wrote them back, else upstream.

        S3 is read only for a digest the upstream ``confirmed`` for this repository, or,
        with write-back (S3 then likely holds it), after the upstream confirms it with a
        HEAD (free on Docker Hub's pull limit); a 404 there is the answer. Without
        write-back an unconfirmed digest is simply fetched: the GET verifies it.
        """
        if self.shared is not None and (confirmed or self.write_back):
            if not confirmed:
                await self._ask(
                    route, route.upstream.head_manifest(route.name, str(digest), accept)
                )
            try:
                raw = await read_manifest(self.shared, digest)
            except (PathNotFound, ManifestTooLarge):
                pass
            except StorageUnavailable as exc:  # S3 is a shortcut here, not a requirement
                log.warning("S3 unavailable; manifest %s from the upstream: %s", digest, exc)
            else:
                served.mark("s3")
                return raw, None

        async def fetch() -> tuple[bytes, str | None]:
            fetched = await self._ask(
                route, route.upstream.get_manifest(route.name, str(digest), accept)
            )
            served.mark("upstream")
            return fetched.raw, fetched.media_type

        if self.fleet is None or self.shared is None:
            return await fetch()
        shared = self.shared

        async def published() -> tuple[bytes, str | None] | None:
            try:
                raw = await read_manifest(shared, digest)
            except (PathNotFound, ManifestTooLarge, StorageUnavailable):
                return None
            served.mark("s3")
            return raw, None

        async def fetch_and_publish() -> tuple[bytes, str | None]:
            raw, media_type = await fetch()
            if Digest.of(raw, digest.algorithm) == digest:  # only what the others may read
                try:
                    await shared.put(layout.blob_data(digest), raw)
                except StorageUnavailable as exc:
                    log.warning("writing manifest %s back to S3 failed: %s", digest, exc)
            return raw, media_type

        # One host of the fleet GETs it; the others read what it wrote back.
        return await self.fleet.single(manifest_lease(digest), published, fetch_and_publish)

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

    # -- tag lists -----------------------------------------------------------

    async def tags(self, route: Route) -> list[str]:
        """The upstream's tags of the route's repository, sorted: fetched whole (every
        ``Link`` page) once per ``tag_ttl`` for all concurrent callers, and when the
        upstream fails the last list fetched (also by a previous process) is served."""
        name = cache_name(route)
        known = self._tag_lists.get(name)
        if known is not None and time.monotonic() - known[1] < route.upstream.settings.tag_ttl:
            return known[0]
        return await self._once(("tags", name), lambda: self._fetch_tags(route, name))

    async def _fetch_tags(self, route: Route, name: str) -> list[str]:
        known = self._tag_lists.get(name)
        now = time.monotonic()
        ttl = route.upstream.settings.tag_ttl
        if self.shared_dir and (known is None or now - known[1] >= ttl):
            # Another worker may have fetched it since: one listing per TTL for the host.
            elsewhere = await self._listed_elsewhere(name, now)
            if elsewhere is not None and (known is None or elsewhere[1] > known[1]):
                known = self._tag_lists[name] = elsewhere
        if known is not None and now - known[1] < ttl:
            return known[0]  # fetched while this caller waited for its turn

        async def listed(fingerprint: object) -> list[str] | None:
            """What another worker fetched, as it recorded it (not an older list, should
            its write have failed)."""
            tags = await self._last_tag_list(name)
            return tags if tags is not None and _fingerprint(tags) == fingerprint else None

        try:
            tags = await self._hostwide(
                route,
                ("tags", name),
                lambda: self._list_upstream(route, name, known),
                since=now,
                encode=_fingerprint,
                decode=listed,
            )
        except (UpstreamUnavailable, TooManyRequests) as exc:
            stale = known[0] if known is not None else await self._last_tag_list(name)
            if stale is None:
                raise
            log.warning(
                "upstream %s failed (%s); serving the tags of %s stale", route.upstream, exc, name
            )
            self._tag_lists[name] = (stale, time.monotonic())  # ask again after a TTL
            return stale
        self._tag_lists[name] = (tags, now)
        return tags

    async def _list_upstream(
        self, route: Route, name: str, known: tuple[list[str], float] | None
    ) -> list[str]:
        """The upstream's tags, recorded: for stale-if-error after a restart, and (its
        mtime saying when) for the other workers; this answer does not depend on it."""
        tags = sorted(set(await self._ask(route, route.upstream.list_tags(route.name))))
        if self.shared_dir or known is None or known[0] != tags:
            try:
                await self.links.primary.put(tag_list_key(name), json.dumps(tags).encode())
            except (OSError, StorageUnavailable) as exc:
                log.warning("recording the tags of %s failed: %s", name, exc)
        return tags

    async def _listed_elsewhere(self, name: str, now: float) -> tuple[list[str], float] | None:
        """The tag list as another process last fetched it, and when (on this clock)."""
        primary = self.links.primary
        if not isinstance(primary, FilesystemDriver):
            return None
        try:
            path = primary.path(tag_list_key(name))
            age = time.time() - (await asyncio.to_thread(os.stat, path)).st_mtime
        except OSError:
            return None
        tags = await self._last_tag_list(name)
        return None if tags is None else (tags, now - max(age, 0.0))

    async def _last_tag_list(self, name: str) -> list[str] | None:
        try:
            raw = await self.links.primary.get(tag_list_key(name))
        except PathNotFound:
            return None
        try:
            tags = json.loads(raw)
        except ValueError:
            return None  # not a list we wrote: as good as none
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return None
        return tags

    # -- blobs ---------------------------------------------------------------

    async def held_blob(self, route: Route, digest: Digest) -> StoredBlob | None:
        """The blob when it was pulled through for ``route`` (or its upstream confirmed
        it) and local disk holds it; None otherwise. Asks nobody else."""
        if not await self.links.exists(layout.layer_link(cache_name(route), digest)):
            return None
        try:
            return await self.stored.find(digest)
        except PathNotFound:
            return None

    def held_blob_now(self, route: Route, digest: Digest) -> StoredBlob | None:
        """:meth:`held_blob`'s answer when it is known without waiting; None otherwise."""
        if self.links.peek(layout.layer_link(cache_name(route), digest)) is None:
            return None
        return self.stored.peek(digest)

    async def confirmed(self, route: Route, digest: Digest) -> bool:
        """Whether the upstream has confirmed blob ``digest`` for ``route`` (a link here)."""
        return await self.links.exists(layout.layer_link(cache_name(route), digest))

    async def blob(
        self, route: Route, digest: Digest, *, fetch: bool = True
    ) -> StoredBlob | Fill | RemoteBlob:
        """The blob on local disk, or its fill in flight from S3 or the upstream; without
        ``fetch``, only its size when it is not local."""
        name = cache_name(route)
        size = None
        since = time.monotonic()

        async def upstream_size() -> int:
            key = ("stat", name, str(digest))
            return await self._once(
                key,
                lambda: self._hostwide(
                    route,
                    key,
                    lambda: self._stat_and_link(route, name, digest),
                    since=since,
                    encode=lambda size: size,
                    decode=_decode_size,
                ),
            )

        if not await self.links.exists(layout.layer_link(name, digest)):
            size = await upstream_size()  # never pulled through here: the upstream decides
        try:
            return await self.stored.find(digest)
        except PathNotFound:
            pass
        if not fetch:
            return RemoteBlob(size if size is not None else await upstream_size(), "upstream")
        origin = Origin("upstream", str(route.upstream.url))
        fill = await self.fills.fetch(
            digest, self._source(route, digest, origin), size=size, origin=origin
        )
        if self.write_back and not fill.done:
            self._spawn(self._write_back(fill), f"write back {digest}")
        return fill

    async def _stat_and_link(self, route: Route, name: str, digest: Digest) -> int:
        """The upstream's size for the blob, linked before any waiter is answered, so a
        request arriving after this finishes finds the link instead of asking again."""
        size = await self._ask(route, route.upstream.stat_blob(route.name, digest))
        await self.links.write(layout.layer_link(name, digest), digest)
        return size

    def _source(self, route: Route, digest: Digest, origin: Origin) -> Source:
        """Where a fill reads from; only ever for a digest the upstream confirmed for this
        repository (see :meth:`blob`), so a copy in S3 is the same bytes. ``origin`` is
        told which one it was. In fleet mode a blob S3 lacks is fetched by one host of the
        fleet, the others stream it from that host
        (:class:`~regmirror.fleet.coordinator.Fleet`)."""
        key = layout.blob_data(digest)

        async def from_shared(offset: int) -> tuple[int, AsyncIterator[bytes]] | None:
            if self.shared is None:
                return None
            try:
                size = await self.shared.stat(key)
            except PathNotFound:
                return None
            except StorageUnavailable as exc:
                log.warning("S3 unavailable; blob %s from the upstream: %s", digest, exc)
                return None
            origin.reading("s3", self.shared.name)
            return size, self.shared.reader(key, offset)

        async def from_upstream(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            origin.reading("upstream", str(route.upstream.url))
            stream = await self._ask(route, route.upstream.open_blob(route.name, digest, offset))
            return stream.size, stream.chunks

        async def open_at(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            found = await from_shared(offset)
            if self.fleet is not None:
                if found is not None:  # should S3 fail mid-blob, the fleet takes over
                    size, chunks = found
                    return size, self.fleet.from_shared(
                        digest, offset, size, chunks, from_upstream, from_shared
                    )
                # Streamed from another host's fill unless the lease makes this host fill
                # (from_upstream and from_shared then say so).
                origin.reading("fill", "a fleet peer")
                return await self.fleet.open(digest, offset, from_upstream, from_shared)
            return found if found is not None else await from_upstream(offset)

        return open_at

    async def _write_back(self, fill: Fill) -> None:
        assert self.shared is not None
        key = layout.blob_data(fill.digest)
        try:
            try:
                path = await fill.wait()
            except FillFailed:
                if self.fleet is not None and not fill.done:
                    self.fleet.fill_failed(fill.digest)  # its peer is not followed again
                return  # failed, or streamed through without being kept: nothing to write back
            if self.fleet is not None and not self.fleet.owns(fill.digest):
                return  # another host of the fleet filled it from the upstream: it writes back
            try:
                await self.shared.stat(key)
            except PathNotFound:
                await self.shared.put_file(key, path)
            except Exception:  # the pull itself is unaffected; only the shared copy is missed
                log.warning("writing %s back to S3 failed", fill.digest, exc_info=True)
        finally:
            if self.fleet is not None:
                await self.fleet.release(fill.digest)  # in S3 now (or failed): others may go

    async def _ask(self, route: Route, call: Awaitable[T]) -> T:
        """An upstream request, its failure counted by upstream host and kind."""
        try:
            return await call
        except (UpstreamUnavailable, UpstreamDenied, TooManyRequests) as exc:
            kind = {UpstreamDenied: "denied", TooManyRequests: "rate_limited"}.get(
                type(exc), "unavailable"
            )
            host = route.upstream.registry_host
            if self._on_upstream_error is not None:
                self._on_upstream_error(host, kind)
            self._errors.warning(
                (host, kind),
                "upstream %s: %s (%s)",
                route.upstream.url,
                exc,
                kind,
                event="upstream_error",
                upstream=host,
                kind=kind,
            )
            raise

    # -- coalescing ----------------------------------------------------------

    async def _hostwide(
        self,
        route: Route,
        key: tuple[str, ...],
        work: Callable[[], Awaitable[T]],
        *,
        since: float,
        fresh: float | None = None,
        encode: Callable[[T], Any],
        decode: Callable[[Any], Awaitable[T | None]],
    ) -> T:
        """``work()`` (an upstream request, and storing its answer) once for every worker
        on the data directory asking at once; simply ``work()`` when serving alone."""
        if self._flights is None:
            return await work()
        wait = FLIGHT_WAIT_REQUESTS * route.upstream.stall_timeout
        return await self._flights.run(
            key, work, encode=encode, decode=decode, wait=wait, since=since, fresh=fresh
        )

    async def _once(self, key: tuple[str, ...], work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` once for all concurrent callers with the same key.

        The work belongs to no caller: one that disconnects does not cancel it.
        """
        future = self._inflight.get(key)
        joined = future is not None
        if future is None:
            future = self._inflight[key] = asyncio.ensure_future(served.collecting(work()))
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        result, marks = await asyncio.shield(future)
        served.adopt(marks, joined=joined)  # each caller's access line: where it came from
        return result  # type: ignore[no-any-return]

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        if name in {t.get_name() for t in self._background}:
            if asyncio.iscoroutine(work):
                work.close()  # already running: never started, so never awaited
            return
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._flights is not None:
            await self._flights.close()


async def read_manifest(driver: Driver, digest: Digest) -> bytes:
    """The manifest ``digest`` as ``driver`` holds it, read only when it is within the
    manifest cap (known before reading) and returned only when its bytes hash to it:
    PathNotFound when absent or other bytes, ManifestTooLarge when it is bigger."""
    key = layout.blob_data(digest)
    try:
        raw = await driver.get(key, limit=MAX_MANIFEST_BYTES)
    except TooLarge as exc:
        raise ManifestTooLarge(
            f"{digest} holds {exc.size or 'more'} bytes; no manifest is over {exc.limit}"
        ) from exc
    if Digest.of(raw, digest.algorithm) != digest:
        raise PathNotFound(f"{driver.name} holds other bytes for manifest {digest}")
    return raw


def _decode_confirmation(value: object) -> tuple[Digest, float] | None:
    """A tag's confirmation as another worker's flight recorded it: its digest, and
    when the upstream named it (``CLOCK_MONOTONIC``, one clock for the host)."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    text, when = value
    if not isinstance(text, str) or not isinstance(when, int | float):
        return None
    try:
        return Digest.parse(text), float(when)
    except DigestInvalid:
        return None


async def _decode_size(value: object) -> int | None:
    """A blob's size as another worker's flight recorded it."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _fingerprint(tags: list[str]) -> str:
    return hashlib.sha256(json.dumps(tags).encode()).hexdigest()


def tag_link(name: str, tag: str, wanted: Representation) -> str:
    """Where a tag's digest in one representation is recorded (proxy tree): registry:2's
    ``current/link`` for the representation of every type, which is what registry:2
    would serve from it; ``accept/<representation>/link`` beside it for the others."""
    if wanted.everything:
        return layout.tag_current_link(name, tag)
    return f"{layout.tag(name, tag)}/accept/{wanted.key}/link"


def tag_list_key(name: str) -> str:
    """Where the last tag list fetched for a cache name is kept (proxy tree; no
    repository name component can start with ``_``)."""
    return f"{layout.repository(name)}/_tags/list.json"


def cache_name(route: Route) -> str:
    """Where a route's pulls are recorded: the upstream (its host, and its path and account
    when it has them: :attr:`~regmirror.upstream.Upstream.cache_key`), then the upstream's
    name (as the upstream spells it: Docker Hub's ``nginx`` and ``library/nginx`` are one).
    Routes to upstreams that may read different repositories never share a record."""
    return f"{route.upstream.cache_key}/{route.upstream.remote_name(route.name)}"
