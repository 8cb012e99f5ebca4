"""A fill's lease against a real moto S3 whose answers to lease writes go astray.

The fleet's lease (:mod:`regmirror.fleet.leases`) is written with conditional PUTs; S3
stores a write and then the answer may never reach the host (a connection cut, a read
timed out). botocore sends the write again, and the copy is refused with 412: the
lease's ETag is the first copy's now. And a renewal's PUT runs in a thread: the fill's
release cannot cancel it once sent. Each of these once made a fill that held its lease
(and wrote its blob back) believe it had lost it, or delete it with a stale ETag: the
lease then stayed in the bucket, as test_fleet_workers.py's write-back test saw once in
four CI runs (a renewal under way when the blob was written back: DELETE got 412).

Between :class:`~regmirror.fleet.coordinator.Fleet` and moto_server sits a small HTTP
proxy on 127.0.0.1 (tests/support/s3_front.py) that passes every request on to moto,
and for a PUT of a blob's lease can hold the answer until told (the write has landed)
or drop it (moto stored it, the connection is cut before the answer).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from regmirror.config import FleetSettings, S3Settings
from regmirror.digest import Digest
from regmirror.fleet.coordinator import Fleet
from regmirror.fleet.leases import blob_key
from regmirror.storage.s3 import S3Driver
from tests.support.http import session
from tests.support.s3 import REGION, MotoS3, moto_s3
from tests.support.s3_front import answer, drop_answer, forward, front
from tests.support.upstream import serve

__all__ = ["moto_s3", "session"]

BOUND = 20.0
LEASE_TTL = 0.6  # renewed every 0.2 s
BLOB = os.urandom(256 * 1024)
DIGEST = Digest.of(BLOB)
LEASE = blob_key(DIGEST)


@dataclass
class LeaseWrites:
    """A proxy to moto that records the lease's requests and, on request, drops or holds
    the answer to the lease's PUT number ``drop`` or ``hold`` (counted from 1), after
    moto has stored it."""

    moto: MotoS3
    client: aiohttp.ClientSession
    seen: list[tuple[str, int]] = field(default_factory=list)  # (method, moto's status)
    drop: int | None = None
    hold: int | None = None
    landed: asyncio.Event = field(default_factory=asyncio.Event)
    let_go: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        return front(self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        forwarded = await forward(self.client, self.moto, request)
        if request.path.endswith(LEASE):
            self.seen.append((request.method, forwarded.status))
            self.changed.set()
            if request.method == "PUT" and len(self.puts()) == self.drop:
                drop_answer(request)  # stored by moto; the answer never comes
            if request.method == "PUT" and len(self.puts()) == self.hold:
                self.landed.set()
                await self.let_go.wait()
        return await answer(request, forwarded)

    async def until_puts(self, count: int, within: float = BOUND) -> None:
        """Until moto has answered ``count`` PUTs of the lease."""
        deadline = time.monotonic() + within
        while len(self.puts()) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))

    def puts(self) -> list[int]:
        return [status for method, status in self.seen if method == "PUT"]


@dataclass
class Observed:
    """What the fleet counts (its FleetObserver): the lease results here."""

    leases: list[str] = field(default_factory=list)

    def fleet_lease(self, result: str) -> None:
        self.leases.append(result)

    def fleet_bytes_received(self, source: str, nbytes: int) -> None:
        pass

    def fleet_peer_error(self, kind: str) -> None:
        pass

    def fleet_tag(self, result: str) -> None:
        pass


@dataclass
class Rig:
    fleet: Fleet
    writes: LeaseWrites
    observed: Observed
    moto: MotoS3
    bucket: str
    upstream_opens: list[int] = field(default_factory=list)

    async def fill(self) -> bytes:
        """A fill of the blob through the fleet, from the (in-memory) upstream, read whole."""

        async def upstream(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            self.upstream_opens.append(offset)

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(offset, len(BLOB), 64 * 1024):
                    yield BLOB[start : start + 64 * 1024]

            return len(BLOB), chunks()

        async def stored(offset: int) -> tuple[int, AsyncIterator[bytes]] | None:
            return None  # not in S3: the fill reads the upstream

        size, chunks = await self.fleet.open(DIGEST, 0, upstream, stored)
        assert size == len(BLOB)
        return b"".join([chunk async for chunk in chunks])

    def lease_in_bucket(self) -> bool:
        return LEASE in self.moto.keys(self.bucket)

    def plant_expired_lease(self) -> None:
        body = {"owner": "http://127.0.0.2:5000", "instance": "dead", "expires": time.time() - 1}
        self.moto.client().put_object(Bucket=self.bucket, Key=LEASE, Body=json.dumps(body))


@pytest.fixture
async def rig(moto_s3: MotoS3, session: aiohttp.ClientSession) -> AsyncIterator[Rig]:
    writes = LeaseWrites(moto_s3, session)
    async with serve(writes.app()) as url:
        bucket = moto_s3.new_bucket("lease")
        settings = S3Settings(bucket=bucket, endpoint_url=url, path_style=True, region=REGION)
        s3 = await S3Driver.create(settings)
        observed = Observed()
        fleet_settings = FleetSettings(
            advertise_url="http://127.0.0.1:9", secret="lease-secret", lease_ttl=LEASE_TTL
        )
        fleet = Fleet(s3, fleet_settings, observed)
        await fleet.start()
        try:
            yield Rig(fleet, writes, observed, moto_s3, bucket)
        finally:
            writes.let_go.set()
            await fleet.close()
            await s3.close()


async def test_a_release_waits_for_the_renewal_under_way_and_deletes_what_it_wrote(
    rig: Rig,
) -> None:
    """The blob is written back while a renewal's PUT is under way: that PUT has landed
    (a new ETag) when the release comes. The release deletes the lease as renewed, not
    with the ETag before it (412: the lease would stay in the bucket)."""
    assert await rig.fill() == BLOB
    assert rig.fleet.owns(DIGEST)
    rig.writes.hold = len(rig.writes.puts()) + 1
    await asyncio.wait_for(rig.writes.landed.wait(), BOUND)  # renewed in moto, not yet answered
    releasing = asyncio.create_task(rig.fleet.release(DIGEST))
    seen = len(rig.writes.seen)
    await asyncio.sleep(1.0)
    assert len(rig.writes.seen) == seen  # no delete yet: it could only use the stale ETag
    rig.writes.let_go.set()
    await asyncio.wait_for(releasing, BOUND)
    assert not rig.lease_in_bucket()
    assert rig.writes.seen[-1] == ("DELETE", 204)
    assert rig.observed.leases == ["won", "released"]


async def test_a_renewal_sent_again_after_it_landed_keeps_the_lease(rig: Rig) -> None:
    """The first renewal's answer is lost after moto stored it; botocore sends it again
    and gets 412. The lease is still this fill's: it is renewed on, the fill writes its
    blob back (owns) and releases it."""
    rig.writes.drop = 2  # the first renewal (the acquire is the first PUT)
    assert await rig.fill() == BLOB
    await rig.writes.until_puts(3)  # the acquire, the renewal (dropped), its copy
    assert rig.writes.puts() == [200, 200, 412]
    try:
        await rig.writes.until_puts(4, within=5.0)  # renewed on, with the first copy's ETag
    except TimeoutError:
        pytest.fail("no renewal after the 412: the fill took its lease for lost")
    assert rig.writes.puts()[3] == 200
    assert rig.fleet.owns(DIGEST)
    await rig.fleet.release(DIGEST)
    assert not rig.lease_in_bucket()
    assert "renew_lost" not in rig.observed.leases and rig.observed.leases[-1] == "released"


async def test_a_lease_won_by_a_write_sent_again_is_won(rig: Rig) -> None:
    """The winning ``If-None-Match: *`` write's answer is lost; its copy gets 412 and the
    lease read back is this very write: won, not another fill's of this process (which
    would read the upstream with no lease, never write back, never release)."""
    rig.writes.drop = 1
    assert await rig.fill() == BLOB
    assert rig.writes.puts()[:2] == [200, 412]
    assert rig.fleet.owns(DIGEST)
    assert rig.observed.leases[0] == "won"
    await rig.fleet.release(DIGEST)
    assert not rig.lease_in_bucket()
    assert rig.upstream_opens == [0]


async def test_a_take_over_sent_again_after_it_landed_is_taken(rig: Rig) -> None:
    """A dead host's expired lease is taken over; the ``If-Match`` write's answer is lost
    and its copy refused: the lease read back is this take-over's, so it is held."""
    rig.plant_expired_lease()
    rig.writes.drop = 2  # the take-over (the first PUT, the acquire, meets the dead lease)
    assert await rig.fill() == BLOB
    assert rig.writes.puts()[:3] == [412, 200, 412]  # lost to the dead lease; taken; copy
    assert rig.fleet.owns(DIGEST)
    assert rig.observed.leases[:2] == ["lost", "taken_over"]
    await rig.fleet.release(DIGEST)
    assert not rig.lease_in_bucket()
