"""Fleet mode on a host of two workers: a peer whose bytes failed a fill is distrusted by
the host, not only by the worker that saw them. The next pull of the blob, whichever
worker it reaches, takes the liar's lease over and fetches from the upstream; it never
follows the liar once more (another client cut mid-blob).

Real processes: moto, registry:2 behind a counting proxy, ``regmirror serve`` with two
workers; the liar is a peer endpoint in the test answering the right length of zeros.
Below it, :class:`~regmirror.fleet.distrust.Distrust` as two workers see its directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from aiohttp import web

from regmirror.digest import Digest
from regmirror.fleet import credential
from regmirror.fleet.distrust import Distrust
from tests.support.fleet import (  # noqa: F401  (proxy is a fixture)
    SECRET,
    Fleet,
    Start,
    image_of,
    metric,
    metrics,
    proxy,
    pull_manifest,
    sample,
)
from tests.support.fleet_workers import WORKERS, pull_at, two_workers
from tests.support.http import session  # noqa: F401
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.s3 import MotoS3, moto_s3  # noqa: F401
from tests.support.upstream import (  # noqa: F401
    CountingProxy,
    serve,
    upstream_registry,
)

MiB = 1024 * 1024


async def test_a_peer_that_lied_to_one_worker_is_not_followed_by_another(
    regmirror_server: Start,  # noqa: F811
    moto_s3: MotoS3,  # noqa: F811
    proxy: CountingProxy,  # noqa: F811
    upstream_registry: ServerProcess,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    image = await image_of(session, upstream_registry, "fleet/distrust-workers", 1 * MiB)
    fleet = Fleet(regmirror_server, moto_s3, proxy, 1, extra=WORKERS)
    (host,) = fleet.hosts
    first, second = two_workers(host)
    await pull_manifest(session, host, image)
    asked: list[str | None] = []

    async def lying_peer(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Authorization"))
        return web.Response(body=bytes(len(image.layer)))  # right length, wrong bytes

    app = web.Application()
    app.router.add_get("/-/fleet/blobs/{digest}", lying_peer)
    async with serve(app) as liar:
        fleet.plant_lease(image.layer_digest, liar, expires_in=600.0)
        assert await pull_at(host, first, image) is None  # cut: never a clean body
        assert len(asked) == 1 and credential.verify(
            SECRET, asked[0], "GET", f"/-/fleet/blobs/{image.layer_digest}"
        )
        series = 'regmirror_fills_total{result="digest_mismatch"}'
        assert await metric(session, host, series) == 1
        assert proxy.blob_gets == 0
        # The other worker does not follow the liar (its lease has long to run): it takes
        # the lease over and fetches from the upstream.
        assert await pull_at(host, second, image) == image.layer
        assert len(asked) == 1, "the other worker followed the peer that lied"
    assert proxy.blob_gets == 1
    text = await metrics(session, host)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1


# -- the host's memory, two workers' views of one directory ---------------------------------


def test_what_one_worker_distrusts_the_other_reads_and_the_memory_is_bounded(
    tmp_path: Path,
) -> None:
    first, second = (Distrust(tmp_path / "distrust", remembered=3) for _ in range(2))
    digests = [Digest.of(bytes([i])) for i in range(5)]
    assert second.get(digests[0]) is None
    first.add(digests[0], "liar-0")
    assert second.get(digests[0]) == "liar-0"
    for i, digest in enumerate(digests[1:], 1):
        time.sleep(0.01)  # the oldest is pruned first: distinct mtimes
        second.add(digest, f"liar-{i}")
    assert [first.get(d) for d in digests] == [None, None, "liar-2", "liar-3", "liar-4"]
    alone = Distrust()  # one process: in memory, as bounded
    alone.add(digests[0], "liar-0")
    assert alone.get(digests[0]) == "liar-0" and alone.get(digests[1]) is None
