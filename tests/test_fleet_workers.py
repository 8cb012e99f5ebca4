"""Fleet mode on hosts that run several workers (``server.workers``), with real processes:
moto, registry:2 behind a counting proxy, and ``regmirror serve`` hosts of two workers each.

The host (``fleet.advertise_url``) is the fleet's identity; whichever worker a request
reaches, the fleet still makes one upstream GET per blob, a peer request landing on a
worker that does not fill the blob streams the fill of the one that does, and a worker
killed mid-fill is replaced by another at once (no request to its own host); only the
worker holding a lease writes its blob back. Below them, the partial file's claim: a
passing look by another worker does not take it away, and a claim made just after
another worker stored the blob fetches nothing.

Requests are aimed at a given worker (tests/support/fleet_workers.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from regmirror import fill as fill_module
from regmirror import layout
from regmirror.app import check_fleet
from regmirror.config import load
from regmirror.digest import Digest
from regmirror.fill import Fill, Fills, FillStats, Source
from regmirror.storage.driver import PathNotFound
from regmirror.storage.filesystem import FilesystemDriver
from tests.support.fleet import (
    Rig,
    manifest_requests,
    metrics,
    proxy,
    pull_manifest,
    rig,
    sample,
)
from tests.support.fleet_workers import (
    BOUND,
    WORKERS,
    MiB,
    fresh,
    get_at,
    held_fill,
    layer_of,
    other_worker,
    peer_get_at,
    pull_at,
    pull_at_every_worker,
    start_pull,
    total,
    two_workers,
    written_back_once,
)
from tests.support.http import session
from tests.support.processes import regmirror_server
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_front import answer, forward, front
from tests.support.upstream import DOCKER_MANIFEST, serve, upstream_registry
from tests.test_workers import requests_by_worker

__all__ = ["fresh", "moto_s3", "proxy", "regmirror_server", "rig", "session", "upstream_registry"]


# -- the configuration ---------------------------------------------------------------


def test_fleet_mode_takes_several_workers() -> None:
    environ = {
        "REGMIRROR_S3__BUCKET": "b",
        "REGMIRROR_S3__WRITE_BACK": "true",
        "REGMIRROR_FLEET__ADVERTISE_URL": "http://10.0.0.1:5000",
        "REGMIRROR_FLEET__SECRET": "s3cret",
    }
    for workers in ("1", "2", "0"):
        check_fleet(load(environ={**environ, "REGMIRROR_SERVER__WORKERS": workers}))


# -- the partial file's lock, the host's single-flight token -----------------------------


def memory_source(data: bytes, calls: list[int]) -> Source:
    async def open_source(offset: int) -> tuple[int, AsyncIterator[bytes]]:
        calls.append(offset)

        async def chunks() -> AsyncIterator[bytes]:
            yield data[offset:]

        return len(data), chunks()

    return open_source


async def read_fill(fill: Fill) -> bytes:
    parts = []
    async for part in fill.parts():
        if isinstance(part, bytes):
            parts.append(part)
        else:
            parts.append(os.pread(part.file.fileno(), part.limit - part.pos, part.pos))
    return b"".join(parts)


async def test_a_claim_is_not_lost_to_another_worker_merely_looking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker looking whether a fill runs (a peer request's follow, a tail) holds
    the partial file's lock shared for an instant; a claim at that instant must not
    conclude that a fill runs, tail nothing, and fail its clients."""
    data = os.urandom(100_000)
    digest = Digest.of(data)
    stats = FillStats()
    fills = Fills(FilesystemDriver(tmp_path), timeout=BOUND, observer=stats)
    partial = fills.partial_path(digest)
    partial.parent.mkdir(parents=True)
    looking = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(looking, fcntl.LOCK_SH)  # the other worker's look, under way
    real = getattr(fill_module, "_locked", None)

    def look_ends(path: Path) -> bool:  # ...and over by the claimer's second look
        os.close(looking)
        assert real is not None
        return real(path)

    monkeypatch.setattr(fill_module, "_locked", look_ends, raising=False)
    calls: list[int] = []
    try:
        fill = await fills.fetch(digest, memory_source(data, calls))
        assert await asyncio.wait_for(read_fill(fill), BOUND) == data
    finally:
        await fills.close()
    assert stats.results == {"ok": 1} and calls == [0]


async def test_a_claim_just_after_another_worker_stored_the_blob_fetches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker looks at the store, another renames its finished fill into it and unlocks,
    then the first claims the (new, empty) partial file: it finds the blob stored."""
    data = os.urandom(100_000)
    digest = Digest.of(data)
    local = FilesystemDriver(tmp_path)
    stored = local.path(layout.blob_data(digest))
    stored.parent.mkdir(parents=True)
    stored.write_bytes(data)

    async def looked_before_the_rename(key: str) -> int:
        raise PathNotFound(key)

    monkeypatch.setattr(local, "stat", looked_before_the_rename)
    stats = FillStats()
    fills = Fills(local, timeout=BOUND, observer=stats)
    calls: list[int] = []
    try:
        fill = await fills.fetch(digest, memory_source(data, calls))
        assert await asyncio.wait_for(read_fill(fill), BOUND) == data
        assert await fill.wait() == stored
    finally:
        await fills.close()
    assert calls == []  # no second upstream GET
    assert stats.results == {"other_process": 1}
    assert not fills.partial_path(digest).exists()


# -- one fetch per fleet, whichever worker a request reaches ---------------------------


# -- one fetch per fleet, whichever worker a request reaches ---------------------------


async def test_a_herd_over_every_worker_of_every_host_makes_one_upstream_get(
    rig: Rig, fresh: aiohttp.ClientSession
) -> None:
    image = await rig.image("fleet/workers-herd", 4 * MiB)
    fleet = rig.fleet(3, WORKERS)
    rig.proxy.requests.clear()
    await asyncio.gather(*(pull_manifest(fresh, h, image) for h in fleet.hosts for _ in range(8)))
    assert manifest_requests(rig.proxy, "GET") == 1
    assert manifest_requests(rig.proxy, "HEAD") == 1  # the tag, revalidated once for the fleet

    rig.proxy.hold_after = 1 * MiB  # the filler's upstream body stops here until all have asked
    # Answered (200, Content-Length) while the fill is held: every pull has reached it.
    answers = await asyncio.wait_for(
        asyncio.gather(
            *(
                start_pull(host, worker, image)
                for host in fleet.hosts
                for worker in two_workers(host)
                for _ in range(2)
            )
        ),
        BOUND,
    )
    assert rig.proxy.held.is_set() and rig.proxy.blob_gets == 1
    rig.proxy.release.set()
    bodies = await asyncio.gather(*(layer_of(answer, image) for answer in answers))
    assert all(body == image.layer for body in bodies)
    assert rig.proxy.blob_gets == 1
    texts = [await metrics(rig.session, h) for h in fleet.hosts]
    assert sum(sample(t, 'regmirror_fleet_leases_total{result="won"}') for t in texts) == 1
    assert sum(total(t, "regmirror_fleet_peer_errors_total") for t in texts) == 0
    route = "/v2/{name}/blobs/{digest}"
    for host in fleet.hosts:
        assert sorted(requests_by_worker(host, route).values()) == [2.0, 2.0]
    await written_back_once(fleet, image.layer_digest)  # by the filler alone


async def test_a_peer_request_reaching_the_worker_that_does_not_fill_streams_the_fill(
    rig: Rig, fresh: aiohttp.ClientSession
) -> None:
    """Another host streams the blob from this one while it fills: the kernel may give its
    connection to either worker, and both must serve the fill as it grows."""
    image = await rig.image("fleet/workers-peer", 3 * MiB)
    fleet = rig.fleet(1, WORKERS)
    (host,) = fleet.hosts
    await pull_manifest(fresh, host, image)
    pull, filling = await held_fill(rig, host, two_workers(host)[0], image)
    other = other_worker(host, filling)

    # Answered while the fill is held at 1 MiB: the other worker follows the partial file.
    whole = await peer_get_at(host, other, image.layer_digest)
    assert whole.status == 200, (whole.status, await whole.reader.read(300))
    assert int(whole.headers["content-length"]) == len(image.layer)
    ranged = await peer_get_at(host, other, image.layer_digest, 1000)
    assert ranged.status == 206
    assert ranged.headers["content-range"] == f"bytes 1000-{3 * MiB - 1}/{3 * MiB}"
    assert rig.proxy.blob_gets == 1
    rig.proxy.release.set()
    assert await whole.body() == image.layer
    assert await ranged.body() == image.layer[1000:]
    assert await layer_of(pull, image) == image.layer

    # Stored: either worker sends the stored file.
    for worker in two_workers(host):
        answer = await peer_get_at(host, worker, image.layer_digest, 7)
        assert answer.status == 206 and await answer.body() == image.layer[7:]
    assert rig.proxy.blob_gets == 1


async def test_only_the_worker_holding_the_lease_writes_the_blob_back(rig: Rig) -> None:
    """A worker whose clients followed another worker's fill (through the partial file)
    did not fill the blob: it leaves the write-back to S3 to the lease holder, even when
    it has never used the fleet's leases itself (here: it served no manifest)."""
    image = await rig.image("fleet/workers-write-back", 3 * MiB)
    async with serve(slow_blob_puts(rig.session, rig.moto)) as store:
        fleet = rig.fleet(1, {**WORKERS, "REGMIRROR_S3__ENDPOINT_URL": store})
        (host,) = fleet.hosts
        first, second = two_workers(host)
        manifest = f"/v2/{image.repo}/manifests/{image.tag}"
        got = await get_at(host, first, manifest, Accept=DOCKER_MANIFEST)
        assert got.status == 200 and await got.body() == image.manifest
        filling, _ = await held_fill(rig, host, first, image)
        following = await start_pull(host, second, image)
        rig.proxy.release.set()
        assert await layer_of(filling, image) == image.layer
        assert await layer_of(following, image) == image.layer
        # The holder's PUT takes a second (slow_blob_puts): the other worker has long seen
        # the blob stored, and S3 still without it, by the time the lease is released.
        await fleet.until_gone(fleet.lease_key(image.layer_digest))
        await asyncio.sleep(1.5)
    await written_back_once(fleet, image.layer_digest)
    assert rig.proxy.blob_gets == 1


def slow_blob_puts(session: aiohttp.ClientSession, moto: MotoS3) -> web.Application:
    """moto behind a proxy that holds every PUT of a blob's data for a second."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and request.path.endswith("/data"):
            await request.read()
            await asyncio.sleep(1.0)
        return await answer(request, await forward(session, moto, request))

    return front(handle)


# -- a worker killed mid-fill ----------------------------------------------------------


async def test_a_worker_killed_mid_fill_is_replaced_by_another_worker_of_its_host(
    rig: Rig,
) -> None:
    """The lease names this host but a worker that is gone: the worker that claims the
    partial file next knows (its lock was free) and takes the lease over at once, from
    the upstream; it never asks its own host for the blob, nor waits for the lease to
    expire (a long one here)."""
    image = await rig.image("fleet/workers-killed", 3 * MiB)
    fleet = rig.fleet(1, {**WORKERS, "REGMIRROR_FLEET__LEASE_TTL": "60"})
    (host,) = fleet.hosts
    await pull_manifest(rig.session, host, image)
    first, filling = await held_fill(rig, host, two_workers(host)[0], image)
    other = other_worker(host, filling)
    waiting = await start_pull(host, other, image)  # follows the partial file
    rig.proxy.hold_after = None
    os.kill(filling, signal.SIGKILL)
    rig.proxy.release.set()
    assert await layer_of(first, image) is None  # cut, never a clean short body
    assert await layer_of(waiting, image) is None  # its fill failed with the owner's

    started = time.monotonic()
    assert await asyncio.wait_for(pull_at(host, other, image), BOUND) == image.layer
    assert time.monotonic() - started < 20.0  # not after the lease's 60 s
    assert rig.proxy.blob_gets == 2
    text = await metrics(rig.session, host)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1
    assert total(text, "regmirror_fleet_peer_errors_total") == 0  # never asked itself
    await written_back_once(fleet, image.layer_digest)
    await pull_at_every_worker([host], image)  # the killed one was started again
    assert rig.proxy.blob_gets == 2


async def test_a_fleet_whose_filling_worker_is_killed_still_serves_every_client(
    rig: Rig,
) -> None:
    """A herd over both workers of two hosts; the filling worker is killed mid-fill. Its
    host's clients are cut (a client retries), the other host's stream goes on from the
    byte it had reached: one more upstream GET, and every byte right."""
    image = await rig.image("fleet/workers-killed-herd", 4 * MiB)
    fleet = rig.fleet(2, WORKERS)
    owner, follower = fleet.hosts
    await asyncio.gather(*(pull_manifest(rig.session, h, image) for h in fleet.hosts))
    first, filling = await held_fill(rig, owner, two_workers(owner)[0], image)
    at_owner = [first]
    at_owner += await asyncio.gather(*(start_pull(owner, w, image) for w in two_workers(owner)))
    at_follower = await asyncio.wait_for(
        asyncio.gather(
            *(start_pull(follower, w, image) for w in two_workers(follower) for _ in range(2))
        ),
        BOUND,
    )  # answered: streaming from the owner
    rig.proxy.hold_after = None
    os.kill(filling, signal.SIGKILL)
    rig.proxy.release.set()

    results = await asyncio.gather(*(layer_of(a, image) for a in at_owner + at_follower))
    assert all(body == image.layer for body in results[len(at_owner) :])  # not cut
    await pull_at_every_worker(fleet.hosts, image)  # a retry, on either worker, gets the blob
    assert rig.proxy.blob_gets == 2  # the killed worker's, and the one that took over
    await fleet.until_gone(fleet.lease_key(image.layer_digest))
    texts = [await metrics(rig.session, h) for h in fleet.hosts]
    assert sum(sample(t, 'regmirror_fleet_leases_total{result="taken_over"}') for t in texts) == 1
