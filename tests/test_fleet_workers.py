"""Fleet mode on hosts that run several workers (``server.workers``), with real processes:
moto, registry:2 behind a counting proxy, and ``regmirror serve`` hosts of two workers each.

The host (``fleet.advertise_url``) is the fleet's identity; whichever worker a request
reaches, the fleet still makes one upstream GET per blob, a peer request landing on a
worker that does not fill the blob streams the fill of the one that does, and a worker
killed mid-fill is replaced by another at once (no request to its own host); only the
worker holding a lease writes its blob back. Below them, the partial file's claim: a
passing look by another worker does not take it away, and a claim made just after
another worker stored the blob fetches nothing.

Requests are aimed at a given worker: a connection's server side is found in
``/proc/net/tcp`` and among the workers' descriptors, and the worker filling a blob is
the one holding its partial file's ``flock`` (``/proc/locks``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
from regmirror.fleet import credential
from regmirror.storage.driver import PathNotFound
from regmirror.storage.filesystem import FilesystemDriver
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    ServerProcess,
    regmirror_server,
)
from tests.support.s3 import MotoS3, moto_s3  # noqa: F401
from tests.support.s3_registry import PREFIX
from tests.support.upstream import (  # noqa: F401
    DOCKER_MANIFEST,
    CountingProxy,
    PushedImage,
    serve,
    upstream_registry,
)
from tests.test_fleet import (  # noqa: F401  (proxy and session are fixtures)
    SECRET,
    Fleet,
    image_of,
    manifest_requests,
    metrics,
    proxy,
    pull_manifest,
    sample,
    session,
)
from tests.test_workers import requests_by_worker, workers_of

MiB = 1024 * 1024
BOUND = 30.0
WORKERS = {"REGMIRROR_SERVER__WORKERS": "2"}
Start = Callable[..., ServerProcess]


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose every request has a connection of its own (any worker may get it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=BOUND)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as fresh:
        yield fresh


# -- reaching a given worker -------------------------------------------------------------


def worker_of_connection(host: ServerProcess, client_port: int) -> int | None:
    """The worker that accepted the connection from ``client_port``; None until one has."""
    local, remote = f"0100007F:{host.port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote and fields[9] != "0":
            inode = fields[9]
    if inode is None:
        return None
    for pid in workers_of(host):
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


async def connect(
    host: ServerProcess, worker: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that the kernel handed to ``worker`` (new ones until it does)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection(HOST, host.port)
        port = writer.get_extra_info("sockname")[1]
        found = None
        for _ in range(100):
            found = await asyncio.to_thread(worker_of_connection, host, port)
            if found is not None:
                break
            await asyncio.sleep(0.02)
        if found == worker:
            return reader, writer
        writer.close()
        await writer.wait_closed()
    raise AssertionError(f"no connection reached worker {worker} of {host.url}")


@dataclass
class Answer:
    """A response whose status and headers have arrived; its body is read by :meth:`body`."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter  # kept: the connection closes with it

    async def body(self) -> bytes | None:
        """The whole body, or None when the connection was cut short of Content-Length."""
        try:
            body = await asyncio.wait_for(self.reader.read(), BOUND)  # Connection: close
        finally:
            self.writer.close()
        return body if len(body) == int(self.headers["content-length"]) else None


async def get_at(host: ServerProcess, worker: int, path: str, **headers: str) -> Answer:
    """``GET path`` sent to ``worker`` (HTTP/1.1, ``Connection: close``), answered."""
    reader, writer = await connect(host, worker)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host.host_port}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)).decode("latin-1")
    status_line, *header_lines = head.strip().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    status = int(status_line.split()[1])
    return Answer(status, {k.lower(): v for k, v in fields.items()}, reader, writer)


async def start_pull(host: ServerProcess, worker: int, image: PushedImage) -> Answer:
    """A client's pull of the layer through ``worker``, answered 200 (body to come)."""
    answer = await get_at(host, worker, f"/v2/{image.repo}/blobs/{image.layer_digest}")
    assert answer.status == 200, (answer.status, await answer.reader.read(300))
    return answer


async def layer_of(answer: Answer, image: PushedImage) -> bytes | None:
    """The pulled layer, or None when the connection was cut (never a wrong clean body)."""
    body = await answer.body()
    assert body is None or body == image.layer, "a clean body with the wrong bytes"
    return body


async def pull_at(host: ServerProcess, worker: int, image: PushedImage) -> bytes | None:
    return await layer_of(await start_pull(host, worker, image), image)


async def peer_get_at(host: ServerProcess, worker: int, digest: Digest, start: int = 0) -> Answer:
    """A signed peer request (what another host sends) for ``digest``, to ``worker``."""
    path = f"/-/fleet/blobs/{digest}"
    headers = {"Authorization": credential.sign(SECRET, "GET", path)}
    if start:
        headers["Range"] = f"bytes={start}-"
    return await get_at(host, worker, path, **headers)


def partial_file(host: ServerProcess, digest: Digest) -> Path:
    return host.data_dir / "fills" / f"{digest.algorithm}-{digest.hex}.partial"


def filler(host: ServerProcess, digest: Digest) -> int | None:
    """The pid of the worker filling ``digest``: the holder of its partial file's lock."""
    try:
        inode = partial_file(host, digest).stat().st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.replace("->", "").split()  # "1: FLOCK ADVISORY WRITE <pid> <dev>:<ino> ..."
        if fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


async def until_filler(host: ServerProcess, digest: Digest) -> int:
    for _ in range(int(BOUND / 0.02)):
        if (pid := filler(host, digest)) is not None:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody fills {digest} on {host.url}")


def two_workers(host: ServerProcess) -> list[int]:
    pids = workers_of(host)
    assert len(pids) == 2, pids
    return pids


def total(text: str, family: str) -> float:
    """The sum of every labelled series of ``family``."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(family + "{")
    )


def blob_puts(moto: MotoS3, bucket: str, digest: Digest) -> int:
    """PUTs of the blob's data object that moto logged (write-backs; a single-part
    upload: the test blobs are below the multipart threshold)."""
    key = f"{PREFIX}/docker/registry/v2/blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}/data"
    log = moto.log_path.read_text(errors="replace")
    return len(re.findall(rf'"PUT /{bucket}/{re.escape(key)} HTTP', log))


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


async def test_a_herd_over_every_worker_of_every_host_makes_one_upstream_get(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    fresh: aiohttp.ClientSession,
) -> None:
    image = await image_of(session, upstream_registry, "fleet/workers-herd", 4 * MiB)
    fleet = Fleet(regmirror_server, moto_s3, proxy, 3, extra=WORKERS)
    proxy.requests.clear()
    await asyncio.gather(*(pull_manifest(fresh, h, image) for h in fleet.hosts for _ in range(8)))
    assert manifest_requests(proxy, "GET") == 1
    assert manifest_requests(proxy, "HEAD") == 1  # the tag, revalidated once for the fleet

    proxy.hold_after = 1 * MiB  # the filler's upstream body stops here until all have asked
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
    assert proxy.held.is_set() and proxy.blob_gets == 1
    proxy.release.set()
    bodies = await asyncio.gather(*(layer_of(answer, image) for answer in answers))
    assert all(body == image.layer for body in bodies)
    assert proxy.blob_gets == 1
    texts = [await metrics(session, h) for h in fleet.hosts]
    assert sum(sample(t, 'regmirror_fleet_leases_total{result="won"}') for t in texts) == 1
    assert sum(total(t, "regmirror_fleet_peer_errors_total") for t in texts) == 0
    route = "/v2/{name}/blobs/{digest}"
    for host in fleet.hosts:
        assert sorted(requests_by_worker(host, route).values()) == [2.0, 2.0]
    await fleet.until_gone(fleet.lease_key(image.layer_digest))  # written back, released
    assert blob_puts(moto_s3, fleet.bucket, image.layer_digest) == 1  # by the filler alone


async def test_a_peer_request_reaching_the_worker_that_does_not_fill_streams_the_fill(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    fresh: aiohttp.ClientSession,
) -> None:
    """Another host streams the blob from this one while it fills: the kernel may give its
    connection to either worker, and both must serve the fill as it grows."""
    image = await image_of(session, upstream_registry, "fleet/workers-peer", 3 * MiB)
    fleet = Fleet(regmirror_server, moto_s3, proxy, 1, extra=WORKERS)
    (host,) = fleet.hosts
    await pull_manifest(fresh, host, image)
    proxy.hold_after = 1 * MiB
    pull = asyncio.create_task(pull_at(host, two_workers(host)[0], image))
    await asyncio.wait_for(proxy.held.wait(), BOUND)
    filling = await until_filler(host, image.layer_digest)
    (other,) = set(two_workers(host)) - {filling}

    # Answered while the fill is held at 1 MiB: the other worker follows the partial file.
    whole = await peer_get_at(host, other, image.layer_digest)
    assert whole.status == 200, (whole.status, await whole.reader.read(300))
    assert int(whole.headers["content-length"]) == len(image.layer)
    ranged = await peer_get_at(host, other, image.layer_digest, 1000)
    assert ranged.status == 206
    assert ranged.headers["content-range"] == f"bytes 1000-{3 * MiB - 1}/{3 * MiB}"
    assert proxy.blob_gets == 1
    proxy.release.set()
    assert await whole.body() == image.layer
    assert await ranged.body() == image.layer[1000:]
    assert await asyncio.wait_for(pull, BOUND) == image.layer

    # Stored: either worker sends the stored file.
    for worker in two_workers(host):
        answer = await peer_get_at(host, worker, image.layer_digest, 7)
        assert answer.status == 206 and await answer.body() == image.layer[7:]
    assert proxy.blob_gets == 1


async def test_only_the_worker_holding_the_lease_writes_the_blob_back(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """A worker whose clients followed another worker's fill (through the partial file)
    did not fill the blob: it leaves the write-back to S3 to the lease holder, even when
    it has never used the fleet's leases itself (here: it served no manifest)."""
    image = await image_of(session, upstream_registry, "fleet/workers-write-back", 3 * MiB)
    async with serve(slow_blob_puts(session, moto_s3)) as store:
        fleet = Fleet(
            regmirror_server,
            moto_s3,
            proxy,
            1,
            extra={**WORKERS, "REGMIRROR_S3__ENDPOINT_URL": store},
        )
        (host,) = fleet.hosts
        first, second = two_workers(host)
        manifest = f"/v2/{image.repo}/manifests/{image.tag}"
        answer = await get_at(host, first, manifest, Accept=DOCKER_MANIFEST)
        assert answer.status == 200 and await answer.body() == image.manifest
        proxy.hold_after = 1 * MiB
        filling = await start_pull(host, first, image)
        await asyncio.wait_for(proxy.held.wait(), BOUND)
        following = await start_pull(host, second, image)
        proxy.release.set()
        assert await layer_of(filling, image) == image.layer
        assert await layer_of(following, image) == image.layer
        # The holder's PUT takes a second (slow_blob_puts): the other worker has long seen
        # the blob stored, and S3 still without it, by the time the lease is released.
        await fleet.until_gone(fleet.lease_key(image.layer_digest))
        await asyncio.sleep(1.5)
    assert blob_puts(moto_s3, fleet.bucket, image.layer_digest) == 1
    assert proxy.blob_gets == 1


def slow_blob_puts(client: aiohttp.ClientSession, moto: MotoS3) -> web.Application:
    """moto behind a proxy that holds every PUT of a blob's data for a second."""

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT" and request.path.endswith("/data"):
            await asyncio.sleep(1.0)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with client.request(
            request.method,
            f"{moto.endpoint_url}{request.path_qs}",
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as response:
            payload = await response.read()
            hop = ("transfer-encoding", "connection", "content-length")
            answer = web.StreamResponse(
                status=response.status,
                headers={k: v for k, v in response.headers.items() if k.lower() not in hop},
            )
            if request.method == "HEAD":
                if response.content_length is not None:
                    answer.headers["Content-Length"] = str(response.content_length)
            else:
                answer.content_length = len(payload)
            await answer.prepare(request)
        if request.method != "HEAD":
            await answer.write(payload)
        await answer.write_eof()
        return answer

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{path:.*}", forward)
    return app


# -- a worker killed mid-fill ----------------------------------------------------------


async def test_a_worker_killed_mid_fill_is_replaced_by_another_worker_of_its_host(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """The lease names this host but a worker that is gone: the worker that claims the
    partial file next knows (its lock was free) and takes the lease over at once, from
    the upstream; it never asks its own host for the blob, nor waits for the lease to
    expire (a long one here)."""
    image = await image_of(session, upstream_registry, "fleet/workers-killed", 3 * MiB)
    fleet = Fleet(
        regmirror_server, moto_s3, proxy, 1, extra={**WORKERS, "REGMIRROR_FLEET__LEASE_TTL": "60"}
    )
    (host,) = fleet.hosts
    await pull_manifest(session, host, image)
    proxy.hold_after = 1 * MiB
    first = await start_pull(host, two_workers(host)[0], image)
    await asyncio.wait_for(proxy.held.wait(), BOUND)
    filling = await until_filler(host, image.layer_digest)
    (other,) = set(two_workers(host)) - {filling}
    waiting = await start_pull(host, other, image)  # follows the partial file
    proxy.hold_after = None
    os.kill(filling, signal.SIGKILL)
    proxy.release.set()
    assert await layer_of(first, image) is None  # cut, never a clean short body
    assert await layer_of(waiting, image) is None  # its fill failed with the owner's

    started = time.monotonic()
    assert await asyncio.wait_for(pull_at(host, other, image), BOUND) == image.layer
    assert time.monotonic() - started < 20.0  # not after the lease's 60 s
    assert proxy.blob_gets == 2
    text = await metrics(session, host)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1
    assert total(text, "regmirror_fleet_peer_errors_total") == 0  # never asked itself
    await fleet.until_gone(fleet.lease_key(image.layer_digest))
    assert blob_puts(moto_s3, fleet.bucket, image.layer_digest) == 1
    for worker in two_workers(host):  # the killed one was started again
        assert await pull_at(host, worker, image) == image.layer
    assert proxy.blob_gets == 2


async def test_a_fleet_whose_filling_worker_is_killed_still_serves_every_client(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """A herd over both workers of two hosts; the filling worker is killed mid-fill. Its
    host's clients are cut (a client retries), the other host's stream goes on from the
    byte it had reached: one more upstream GET, and every byte right."""
    image = await image_of(session, upstream_registry, "fleet/workers-killed-herd", 4 * MiB)
    fleet = Fleet(regmirror_server, moto_s3, proxy, 2, extra=WORKERS)
    owner, follower = fleet.hosts
    await asyncio.gather(*(pull_manifest(session, h, image) for h in fleet.hosts))
    proxy.hold_after = 1 * MiB
    at_owner = [await start_pull(owner, two_workers(owner)[0], image)]
    await asyncio.wait_for(proxy.held.wait(), BOUND)
    filling = await until_filler(owner, image.layer_digest)
    at_owner += await asyncio.gather(*(start_pull(owner, w, image) for w in two_workers(owner)))
    at_follower = await asyncio.wait_for(
        asyncio.gather(
            *(start_pull(follower, w, image) for w in two_workers(follower) for _ in range(2))
        ),
        BOUND,
    )  # answered: streaming from the owner
    proxy.hold_after = None
    os.kill(filling, signal.SIGKILL)
    proxy.release.set()

    results = await asyncio.gather(*(layer_of(a, image) for a in at_owner + at_follower))
    assert all(body == image.layer for body in results[len(at_owner) :])  # not cut
    for host in fleet.hosts:  # a retry, on either worker, gets the blob
        for worker in two_workers(host):
            assert await pull_at(host, worker, image) == image.layer
    assert proxy.blob_gets == 2  # the killed worker's, and the one that took over
    await fleet.until_gone(fleet.lease_key(image.layer_digest))
    texts = [await metrics(session, h) for h in fleet.hosts]
    assert sum(sample(t, 'regmirror_fleet_leases_total{result="taken_over"}') for t in texts) == 1
