"""The fleet's fill source: one host fetches a blob from the upstream, the others stream
it from that host while it arrives.

:meth:`Fleet.open` is what a fill reads from when the blob is neither on local disk nor
in S3. It claims the blob's lease. Won: the fill reads the upstream, and the lease is
renewed while bytes come (:meth:`Fleet.release` drops it once the blob is written back to
S3). Held by another host: the fill streams from that host's peer endpoint. When that
stream fails (the owner was killed, stalls for ``fleet.peer_timeout``, cannot be reached),
the lease is taken over (If-Match on the ETag seen) and the fill goes on *from the byte it
had reached*: from S3 if the blob got there meanwhile, else from the upstream with a
Range, else from whichever host took the lease first. The fill hashes the whole blob
whatever the mix of sources, so bytes a peer got wrong fail that fill only.

**A host of several workers** (``server.workers``) is still one member of the fleet:
the host is the fleet's identity (a lease's ``owner`` is its ``fleet.advertise_url``,
the address every peer uses), while the lease is held by the one worker that fills: its
``instance`` (one per process) and the ETag only that worker knows make renewals and the
release that worker's alone. On the host, the partial file's lock already decides which
worker fills (:mod:`regmirror.fill`): the others follow its partial file and never
reach this source, so a host takes at most one lease per blob. Chosen over an identity
per worker (peers cannot address one worker behind a shared ``SO_REUSEPORT`` port, and
two leases per host would undo the partial file's single-flight) and over one worker
doing the fleet's work for the others (a new channel between workers, a bottleneck, and
one more thing to fail): the two single-flights compose with no new shared state but
one, which peers' bytes failed a fill (:mod:`regmirror.fleet.distrust`, in the run
directory). What stays per process is correct so: ``_held`` is the holder's alone,
``_alone`` is what this worker filled without a lease, ``_followed`` is what this worker's
fill streamed from (the fill that fails is the one that followed). The cases this adds:

- a lease that names this host but another worker, seen by a fill that holds the
  partial file's lock: that worker no longer fills the blob (it was killed, or it is an
  earlier run of the host), since it would hold the lock. The lease is taken over at
  once (``If-Match`` on its ETag) rather than at its expiry, and the fill reads the
  upstream. A host never asks itself for a blob over HTTP: the request could reach
  the very worker waiting for it;
- the same lease seen by a fill without the lock (a replay of a blob streamed through)
  is treated as this process's own: the replay reads the upstream, without a lease;
- a peer's request may reach any worker of the host: one that does not fill the blob
  streams the filling worker's partial file (``api/fleet.py``, ``Fills.follow``); a
  fill streamed through (not kept: no room) leaves no partial file to follow, and such
  a peer is cut and takes the lease over;
- only the worker holding the lease writes the blob back to S3 (:meth:`Fleet.owns`):
  the workers that followed its partial file, and have probed nothing, do not;
- which peers' bytes failed a fill here (:meth:`Fleet.fill_failed`) is remembered by the
  host: whichever worker the next pull reaches takes that peer's lease over.

Manifests and tag revalidations (:meth:`Fleet.single`) need nothing more: every worker
is a contender for the small lease, and the losers read what the winner published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import aiohttp
from cachetools import LRUCache

from regmirror.config import FleetSettings
from regmirror.digest import Digest
from regmirror.errors import UpstreamUnavailable
from regmirror.fill import holds_claim
from regmirror.fleet import distrust
from regmirror.fleet.distrust import Distrust
from regmirror.fleet.leases import Lease, Leases, blob_key
from regmirror.fleet.peers import PeerError, Peers
from regmirror.storage.driver import StorageUnavailable
from regmirror.storage.s3 import S3Driver

__all__ = ["Fleet", "FleetObserver", "Opened", "Stored"]

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL = 0.05  # seconds between looks at S3 while another host does a small thing
SWITCHES = 6
REMEMBERED = 1024  # blobs whose last peer is remembered
# Seconds a lease is still renewed after its fill finished, while the blob is written back.
FINISHED_HOLD = 1800.0  # sources one fill may go through before it fails
Opened = tuple[int, AsyncIterator[bytes]]
Upstream = Callable[[int], Awaitable[Opened]]
Stored = Callable[[int], Awaitable[Opened | None]]  # S3, when it holds the blob


class FleetObserver(Protocol):
    def fleet_lease(self, result: str) -> None: ...
    def fleet_bytes_received(self, source: str, nbytes: int) -> None: ...
    def fleet_peer_error(self, kind: str) -> None: ...
    def fleet_tag(self, result: str) -> None: ...


@dataclass
class _Held:
    """A lease this host owns, and what its renewal needs to know. ``stop`` ends the
    renewal between two renewals, never during one (see :meth:`Fleet.release`)."""

    lease: Lease
    progress: int = 0
    finished: bool = False
    lost: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    renewal: asyncio.Task[None] | None = field(default=None, repr=False)


class Fleet:
    def __init__(
        self,
        s3: S3Driver,
        settings: FleetSettings,
        observer: FleetObserver,
        *,
        run_dir: Path | None = None,
    ):
        """``run_dir``: the supervisor's, where the host's workers remember together which
        peers' bytes failed a fill (None: one process, which remembers alone)."""
        assert settings.advertise_url is not None
        self.settings = settings
        self.observer = observer
        self.leases = Leases(
            s3, owner=settings.advertise_url, ttl=settings.lease_ttl, observe=observer.fleet_lease
        )
        # Leases on manifests and tags (see single()): short, and not counted with blobs'.
        self.small = Leases(s3, owner=settings.advertise_url, ttl=settings.lease_ttl)
        self.small.instance = self.leases.instance
        self.secret = settings.secret
        self._session: aiohttp.ClientSession | None = None
        self._peers: Peers | None = None
        self._held: dict[Digest, _Held] = {}
        # The owner (its instance) each blob was last streamed from by this process, and
        # the host's owners whose bytes failed a fill: their lease is taken over, not
        # followed again.
        self._followed: LRUCache[Digest, str] = LRUCache(REMEMBERED)
        self._distrusted = Distrust(run_dir / distrust.DIRECTORY if run_dir else None)
        # Blobs this process filled from the upstream without a lease (leases unsupported,
        # S3 unavailable): it writes them back itself, as without fleet mode.
        self._alone: LRUCache[Digest, bool] = LRUCache(REMEMBERED)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._peers = Peers(self._session, secret=self.secret, timeout=self.settings.peer_timeout)

    async def close(self) -> None:
        for held in list(self._held.values()):
            if held.renewal is not None:
                held.renewal.cancel()
        if self._session is not None:
            await self._session.close()

    @property
    def peers(self) -> Peers:
        assert self._peers is not None, "Fleet.start() first"
        return self._peers

    def owns(self, digest: Digest) -> bool:
        """Whether this process is the one to write ``digest`` back to S3: it holds the
        lease, or it filled the blob without one (leases are not in use: every host
        writes back what it filled). A worker whose fill followed another worker's
        partial file never opened this source: not it."""
        held = self._held.get(digest)
        if held is not None:
            return not held.lost
        return digest in self._alone

    async def open(self, digest: Digest, offset: int, upstream: Upstream, stored: Stored) -> Opened:
        """Where a fill of ``digest`` reads from ``offset``: the upstream (lease won) or
        the owner (lease held elsewhere); see the module's docstring."""
        try:
            supported = await self.leases.supported()
        except StorageUnavailable as exc:
            log.warning("fleet: S3 unavailable (%s); %s filled by this host alone", exc, digest)
            supported = False
        if supported:
            try:
                return await self._source(digest, offset, upstream, stored, None, 0)
            except StorageUnavailable as exc:  # no lease to be had: this host fills alone
                log.warning("fleet: S3 unavailable (%s); %s filled by this host alone", exc, digest)
        self._alone[digest] = True
        size, chunks = await upstream(offset)
        return size, self.counted("upstream", chunks)

    async def single(
        self, key: str, ready: Callable[[], Awaitable[T | None]], work: Callable[[], Awaitable[T]]
    ) -> T:
        """``work()`` done once for the fleet, for small things it publishes to S3 itself
        (a manifest, a tag's revalidation): the host that wins the lease ``key`` runs it;
        the others poll ``ready()`` (what the winner published) until it answers, or the
        lease goes away or expires (then they try for it again). Past ``fleet.tag_wait``
        seconds a waiter runs ``work()`` itself, so a slow peer delays, never blocks."""
        try:
            if not await self.leases.supported():
                return await work()
        except StorageUnavailable:
            return await work()
        deadline = time.monotonic() + self.settings.tag_wait
        while time.monotonic() < deadline:
            try:
                lease, won = await self.small.acquire(key)
                if not won and lease.expired():
                    taken = await self.small.take_over(lease)
                    lease, won = (taken, True) if taken is not None else (lease, False)
            except StorageUnavailable:
                break
            if won:
                try:
                    found = await ready()  # published between our look and our win
                    return found if found is not None else await work()
                finally:
                    with contextlib.suppress(StorageUnavailable):
                        await self.small.release(lease)
            try:
                while time.monotonic() < deadline:
                    await asyncio.sleep(POLL)
                    if (found := await ready()) is not None:
                        return found
                    current = await self.small.read(key)
                    if current is None or current.etag != lease.etag or current.expired():
                        break  # the owner gave up (or died): try for the lease again
            except StorageUnavailable:
                break
        log.warning("fleet: %s not done by another host in time; doing it here", key)
        return await work()

    def fill_failed(self, digest: Digest) -> None:
        """A fill of ``digest`` failed here (wrong bytes, short): if it streamed from a
        peer, the next fill takes that peer's lease over instead of following it."""
        instance = self._followed.pop(digest, None)
        if instance is not None:
            self._distrusted.add(digest, instance)

    async def release(self, digest: Digest) -> None:
        """Drop this host's lease on ``digest`` (its blob is in S3, or its fill failed)."""
        self._alone.pop(digest, None)
        held = self._held.pop(digest, None)
        if held is None:
            return
        # A renewal under way is waited for, not cancelled: its PUT runs in a thread
        # and lands anyway, and the release must delete the ETag it wrote, not the one
        # before (refused with 412, the lease stayed in the bucket).
        held.stop.set()
        if held.renewal is not None:
            await asyncio.wait({held.renewal})
        if held.lost:
            return
        try:
            await self.leases.release(held.lease, sole=True)
        except StorageUnavailable as exc:  # it expires by itself
            log.warning("fleet: could not delete the lease on %s: %s", digest, exc)

    # -- choosing a source ---------------------------------------------------------

    async def _source(
        self,
        digest: Digest,
        offset: int,
        upstream: Upstream,
        stored: Stored,
        failed: Lease | None,
        switches: int,
    ) -> Opened:
        key = blob_key(digest)
        while switches < SWITCHES:
            switches += 1
            if failed is not None and (found := await stored(offset)) is not None:
                log.info("fleet: %s resumes from S3 at byte %d", digest, offset)
                return found[0], self.counted("s3", found[1])
            lease, won = await self.leases.acquire(key)
            if won:
                return await self._own(lease, digest, offset, upstream, stored)
            ours = lease.owner == self.leases.owner  # this host's, maybe another worker's
            if self.leases.mine(lease) or (ours and not holds_claim()):
                # A second fill of this host's (a replay of a blob streamed through): no lease.
                size, chunks = await upstream(offset)
                return size, self.counted("upstream", chunks)
            if ours:
                # Another worker's, yet this fill holds the partial file's lock: that worker
                # fills no more (killed, or an earlier run of this host). Taken over now,
                # never asked for over HTTP (see the module's docstring).
                taken = await self.leases.take_over(lease, "its worker is gone")
                if taken is not None:
                    return await self._own(taken, digest, offset, upstream, stored)
                continue  # changed since we read it: look again
            if failed is None and self._distrusted.get(digest) == lease.instance:
                failed = lease  # its bytes failed a fill here before
            if lease.expired() or (failed is not None and lease.instance == failed.instance):
                taken = await self.leases.take_over(lease)
                if taken is not None:
                    return await self._own(taken, digest, offset, upstream, stored)
                continue  # changed since we read it: look again
            try:
                size, chunks = await self.peers.open(lease.owner, digest, offset)
            except PeerError as exc:
                self._peer_failed(digest, exc)
                failed = lease
                continue
            log.info("fleet: %s streams from %s from byte %d", digest, lease.owner, offset)
            self._followed[digest] = lease.instance
            return size, self._resuming(
                "peer", digest, offset, size, chunks, upstream, stored, lease, switches
            )
        raise UpstreamUnavailable(f"fleet: no source delivered {digest} after {SWITCHES} tries")

    async def _own(
        self, lease: Lease, digest: Digest, offset: int, upstream: Upstream, stored: Stored
    ) -> Opened:
        held = self._held[digest] = _Held(lease)
        try:
            # Written back and released between our look at S3 and our win: no new fetch.
            if (found := await stored(offset)) is not None:
                await self.release(digest)
                return found[0], self.counted("s3", found[1])
            held.renewal = asyncio.create_task(self._renew(held), name=f"lease {digest}")
            size, chunks = await upstream(offset)
        except BaseException:
            await self.release(digest)
            raise
        log.info("fleet: %s is filled here (from byte %d)", digest, offset)
        return size, self._owning(held, digest, chunks)

    # -- the streams -----------------------------------------------------------------

    async def _owning(
        self, held: _Held, digest: Digest, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                held.progress += len(chunk)
                self.observer.fleet_bytes_received("upstream", len(chunk))
                yield chunk
            held.finished = True  # renewed until written back (release)
        except BaseException:
            await self.release(digest)
            raise
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    def from_shared(
        self,
        digest: Digest,
        offset: int,
        size: int,
        chunks: AsyncIterator[bytes],
        upstream: Upstream,
        stored: Stored,
    ) -> AsyncIterator[bytes]:
        """``chunks`` read from S3; should S3 fail mid-blob, the rest comes through the
        fleet (a peer, or the upstream under a lease) from the byte reached."""
        return self._resuming("s3", digest, offset, size, chunks, upstream, stored, None, 0)

    async def _resuming(
        self,
        source: str,
        digest: Digest,
        offset: int,
        size: int,
        chunks: AsyncIterator[bytes],
        upstream: Upstream,
        stored: Stored,
        lease: Lease | None,
        switches: int,
    ) -> AsyncIterator[bytes]:
        position = offset
        try:
            async for chunk in chunks:
                position += len(chunk)
                self.observer.fleet_bytes_received(source, len(chunk))
                yield chunk
            return
        except PeerError as exc:
            self._peer_failed(digest, exc)
        except StorageUnavailable as exc:
            if source != "s3":
                raise
            log.warning("fleet: reading %s from S3 failed at byte %d: %s", digest, position, exc)
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
        try:
            resumed_size, rest = await self._source(
                digest, position, upstream, stored, lease, switches
            )
        except StorageUnavailable as exc:  # no lease to be had: on from the upstream alone
            log.warning("fleet: S3 unavailable (%s); %s resumed from the upstream", exc, digest)
            resumed_size, plain = await upstream(position)
            rest = self.counted("upstream", plain)
        if resumed_size != size:
            raise UpstreamUnavailable(f"fleet: {digest} is {resumed_size} bytes now, {size} before")
        async for chunk in rest:
            yield chunk

    async def counted(self, source: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``chunks``, counted as bytes received from ``source``."""
        try:
            async for chunk in chunks:
                self.observer.fleet_bytes_received(source, len(chunk))
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    def _peer_failed(self, digest: Digest, exc: PeerError) -> None:
        log.warning("fleet: fill of %s from a peer failed (%s): %s", digest, exc.kind, exc)
        self.observer.fleet_peer_error(exc.kind)

    # -- renewal -------------------------------------------------------------------

    async def _renew(self, held: _Held) -> None:
        """Push the deadline on while the fill progresses (or is done and being written
        back); a fill that stalls stops renewing, so its lease runs out."""
        interval = self.settings.lease_ttl / 3
        seen = 0
        finished_at: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.stop.wait(), interval)
            if held.stop.is_set():
                return  # released
            if held.progress == seen and not held.finished:
                continue
            if held.finished:
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > FINISHED_HOLD:
                    return  # nobody released it (a fill never written back): let it expire
            seen = held.progress
            try:
                renewed = await self.leases.renew(held.lease)
            except StorageUnavailable as exc:
                log.warning("fleet: renewing %s failed: %s", held.lease.key, exc)
                continue
            if renewed is None:
                held.lost = True
                return
            held.lease = renewed
