"""The nginx tier of deploy/nginx/ in front of two regmirror replicas: each blob digest goes
to one replica (consistent hash), so the tier fetches it from the upstream once even when
nginx's own cache is bypassed, and a replica that dies passes its share to the next.

Real processes: nginx with the tier config as shipped (backends and listen rewritten to
this machine's ports), regmirror replicas, registry:2 behind a counting proxy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.http import session
from tests.support.nginx import tier
from tests.support.processes import (  # pytest fixtures among them
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import CountingProxy, push_image, serve, upstream_registry

__all__ = ["regmirror_server", "session", "tier", "upstream_registry"]

BOUND = 30.0
Start = Callable[..., ServerProcess]
# Never answered from nginx's cache: every request reaches a replica (as CI's do).
UNCACHED = {"Authorization": "Bearer not-checked-by-these-replicas"}

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


async def fills(session: aiohttp.ClientSession, replica: ServerProcess) -> float:
    async with session.get(f"{replica.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("regmirror_fills_started_total "):
            return float(line.split()[1])
    return 0.0


async def test_each_blob_goes_to_one_replica_and_fails_over_to_the_next(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
    tier: Callable[[list[int]], str],
) -> None:
    layer = os.urandom(2 * 1024 * 1024)
    image = await push_image(session, upstream_registry.url, "tier/app", layer=layer)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        replicas = [regmirror_server(config={"upstreams": [{"url": upstream_url}]}) for _ in "ab"]
        url = tier([replica.port for replica in replicas])
        blob = f"{url}/v2/{image.repo}/blobs/{image.layer_digest}"

        async def pull() -> bytes:
            async with session.get(blob, headers=UNCACHED) as response:
                assert response.status == 200
                assert response.headers.get("X-Cache-Status") in (None, "BYPASS")
                return await response.read()

        # Concurrent and then one at a time: every request reaches the same replica.
        assert await asyncio.gather(*(pull() for _ in range(6))) == [layer] * 6
        assert [await pull() for _ in range(4)] == [layer] * 4
        assert proxy.blob_gets == 1
        counts = [await fills(session, replica) for replica in replicas]
        assert sorted(counts) == [0, 1]

        owner = replicas[counts.index(1)]
        owner.stop()  # its share goes to the next replica on the ring
        assert await pull() == layer
        assert proxy.blob_gets == 2
