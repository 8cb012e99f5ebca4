"""Fleet tests' rig: several ``regmirror serve`` hosts on one moto bucket, pulling
through from registry:2 behind a counting proxy (tests/test_fleet*.py).

Import the fixtures a test module uses (``rig`` needs ``regmirror_server``, ``moto_s3``,
``proxy``, ``upstream_registry`` and ``session`` imported beside it)::

    from tests.support.fleet import Rig, proxy, rig  # noqa: F401
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from regmirror.digest import Digest
from regmirror.fleet.leases import blob_key
from tests.support.processes import HOST, ServerProcess
from tests.support.s3 import MotoS3
from tests.support.s3_registry import PREFIX, regmirror_env
from tests.support.upstream import (
    DOCKER_MANIFEST,
    CountingProxy,
    PushedImage,
    push_image,
    serve,
)

MiB = 1024 * 1024
BOUND = 30.0
SECRET = "fleet-test-secret"
LEASE_TTL = 3.0
PEER_TIMEOUT = 1.5
Start = Callable[..., ServerProcess]


@pytest.fixture
async def proxy(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession
) -> AsyncIterator[CountingProxy]:
    counting = CountingProxy(upstream_registry.url, session)
    async with serve(counting.app()) as url:
        counting.url = url  # type: ignore[attr-defined]
        try:
            yield counting
        finally:
            counting.release.set()


@dataclass
class Rig:
    """What every fleet test starts from: a server factory, the bucket's moto, registry:2
    behind the counting proxy, and a client session."""

    start: Start
    moto: MotoS3
    proxy: CountingProxy
    upstream: ServerProcess
    session: aiohttp.ClientSession

    def fleet(self, count: int, extra: dict[str, str] | None = None, **kwargs: Any) -> Fleet:
        return Fleet(self.start, self.moto, self.proxy, count, extra, **kwargs)

    async def image(self, repo: str, size: int) -> PushedImage:
        return await image_of(self.session, self.upstream, repo, size)

    async def owner_held(
        self, repo: str, size: int
    ) -> tuple[PushedImage, Fleet, asyncio.Task[bytes | None]]:
        """Two hosts with the image's manifest; the first (the owner) pulls the blob and
        its upstream body is held after 1 MiB: (image, fleet, the owner's pull)."""
        image = await self.image(repo, size)
        fleet = self.fleet(2)
        await asyncio.gather(*(pull_manifest(self.session, h, image) for h in fleet.hosts))
        self.proxy.hold_after = 1 * MiB
        at_owner = asyncio.create_task(pull_blob(self.session, fleet.hosts[0], image))
        await asyncio.wait_for(self.proxy.held.wait(), BOUND)
        return image, fleet, at_owner


@pytest.fixture
def rig(
    regmirror_server: Start,
    moto_s3: MotoS3,
    proxy: CountingProxy,
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> Rig:
    return Rig(regmirror_server, moto_s3, proxy, upstream_registry, session)


class Fleet:
    """``count`` hosts on a fresh bucket, all pulling through ``proxy``."""

    def __init__(
        self,
        start: Start,
        moto: MotoS3,
        proxy: CountingProxy,
        count: int,
        extra: dict[str, str] | None = None,
        ready_status: int = 200,
    ):
        self.moto = moto
        self.bucket = moto.new_bucket("fleet")
        self.proxy = proxy
        env = regmirror_env(moto, self.bucket, write_back="true")
        env.update(
            {
                "REGMIRROR_UPSTREAMS__0__URL": proxy.url,  # type: ignore[attr-defined]
                "REGMIRROR_FLEET__ADVERTISE_URL": f"http://{HOST}:{{port}}",
                "REGMIRROR_FLEET__SECRET": SECRET,
                "REGMIRROR_FLEET__LEASE_TTL": str(LEASE_TTL),
                "REGMIRROR_FLEET__PEER_TIMEOUT": str(PEER_TIMEOUT),
                "REGMIRROR_CACHE__FILL_IDLE_TIMEOUT": "20",
                **(extra or {}),
            }
        )
        self.hosts = [start(env=env, ready_status=ready_status) for _ in range(count)]

    def lease_key(self, digest: Digest) -> str:
        return f"{PREFIX}/{blob_key(digest)}"

    def has(self, key: str) -> bool:
        return key in self.moto.keys(self.bucket)

    async def until_gone(self, key: str) -> None:
        for _ in range(int(BOUND / 0.1)):
            if not await asyncio.to_thread(self.has, key):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{key} still in the bucket")

    def plant_lease(self, digest: Digest, owner: str, expires_in: float) -> None:
        body = {"owner": owner, "instance": "a-dead-host", "expires": time.time() + expires_in}
        self.moto.client().put_object(
            Bucket=self.bucket, Key=self.lease_key(digest), Body=json.dumps(body).encode()
        )


def manifest_requests(proxy: CountingProxy, method: str) -> int:
    return sum(1 for m, path in proxy.requests if m == method and "/manifests/" in path)


async def metrics(session: aiohttp.ClientSession, host: ServerProcess) -> str:
    async with session.get(f"{host.url}/metrics") as response:
        return await response.text()


def sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


async def metric(session: aiohttp.ClientSession, host: ServerProcess, series: str) -> float:
    return sample(await metrics(session, host), series)


async def until_metric(
    session: aiohttp.ClientSession, host: ServerProcess, series: str, at_least: float
) -> None:
    for _ in range(int(BOUND / 0.05)):
        if await metric(session, host, series) >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{series} never reached {at_least} on {host.url}")


async def pull_blob(
    session: aiohttp.ClientSession, host: ServerProcess, image: PushedImage
) -> bytes | None:
    """The body, or None when the connection was cut (a short body never ends cleanly)."""
    url = f"{host.url}/v2/{image.repo}/blobs/{image.layer_digest}"
    try:
        async with session.get(url) as response:
            body = await response.read()
    except aiohttp.ClientPayloadError:
        return None
    except aiohttp.ServerDisconnectedError:
        return None
    assert response.status == 200, body[:300]
    assert body == image.layer, "a clean body with the wrong bytes"
    return body


async def pull_manifest(
    session: aiohttp.ClientSession, host: ServerProcess, image: PushedImage
) -> None:
    url = f"{host.url}/v2/{image.repo}/manifests/{image.tag}"
    async with session.get(url, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == image.manifest


async def image_of(
    session: aiohttp.ClientSession, upstream: ServerProcess, repo: str, size: int
) -> PushedImage:
    return await push_image(session, upstream.url, repo, layer=os.urandom(size))
