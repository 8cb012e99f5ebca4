"""The bounded local cache: budget, free-space floor, LRU order, and the never-evict rule.

Real components: the app on a tmp data dir through aiohttp's test client, a moto S3
server, and a registry:2 upstream. Eviction runs after writes in the background;
tests await it (``cache.settle()``), they never sleep.
"""

# Fixtures imported from tests.support are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regmirror import eviction, layout
from regmirror.api.keys import METRICS, REGISTRY
from regmirror.config import CacheSettings, S3Settings, UpstreamSettings
from regmirror.digest import Digest
from regmirror.eviction import BlobCache, State
from tests.support.api import (
    blob_bytes,
    data_dir,  # noqa: F401  (fixtures)
    get_blob_bytes,
    make_client,  # noqa: F401
    push_blob,
    push_image,
    sha256,
)
from tests.support.processes import ServerProcess
from tests.support.s3 import MotoS3, moto_s3  # noqa: F401
from tests.support.upstream import push_blob as push_upstream
from tests.support.upstream import push_image as push_upstream_image
from tests.support.upstream import upstream_registry  # noqa: F401

KiB = 1024
MiB = 1024 * KiB
BLOB = 10 * KiB

# -- helpers -------------------------------------------------------------------------


def on_disk(data_dir: Path) -> dict[str, int]:
    """The blobs in the local store: digest -> size."""
    blobs = data_dir / layout.ROOT / "blobs"
    return {
        f"{p.parent.parent.parent.name}:{p.parent.name}": p.stat().st_size
        for p in blobs.glob("*/*/*/data")
    }


def cache_of(client: TestClient) -> BlobCache:
    return client.app[REGISTRY].cache


def metric(client: TestClient, name: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name)
    assert value is not None, name
    return value


def s3_settings(moto: MotoS3) -> S3Settings:
    return S3Settings(bucket=moto.new_bucket(), endpoint_url=moto.endpoint_url, path_style=True)


async def push_settled(client: TestClient, data: bytes, name: str = "lib/app") -> str:
    digest = await push_blob(client, name, data)
    await cache_of(client).settle()
    return digest


@pytest.fixture
async def s3_client(make_client: Any, moto_s3: MotoS3) -> Any:
    """``await s3_client(max_bytes=...)``: the app on S3, with that budget."""

    async def make(**cache: Any) -> TestClient:
        client: TestClient = await make_client(
            s3=s3_settings(moto_s3), cache=CacheSettings(**cache)
        )
        return client

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# -- the budget ----------------------------------------------------------------------


async def test_blobs_durable_in_s3_stay_under_the_budget_after_every_write(s3_client, data_dir):
    client = await s3_client(max_bytes=50 * KiB)

    for seed in range(15):
        await push_settled(client, blob_bytes(BLOB, seed))
        total = sum(on_disk(data_dir).values())
        assert total <= 50 * KiB * eviction.HIGH_WATERMARK
        assert metric(client, "regmirror_cache_bytes") == total

    assert metric(client, "regmirror_cache_max_bytes") == 50 * KiB
    assert metric(client, "regmirror_evictions_total") >= 10
    assert metric(client, "regmirror_evicted_bytes_total") >= 10 * BLOB


async def test_the_least_recently_read_blob_goes_first(s3_client, data_dir):
    client = await s3_client(max_bytes=50 * KiB)
    a, b, c, d = [await push_settled(client, blob_bytes(BLOB, seed)) for seed in range(4)]
    await get_blob_bytes(client, "lib/app", a)  # a is now the most recently used

    e = await push_settled(client, blob_bytes(BLOB, 4))  # 50 KiB: over the high watermark

    assert set(on_disk(data_dir)) == {a, c, d, e}
    assert b not in on_disk(data_dir)


async def test_an_evicted_blob_is_filled_again_from_s3_byte_identical(s3_client, data_dir):
    client = await s3_client(max_bytes=30 * KiB)
    first = blob_bytes(BLOB, 0)
    digest = await push_settled(client, first)
    for seed in range(1, 4):
        await push_settled(client, blob_bytes(BLOB, seed))
    assert digest not in on_disk(data_dir)

    assert await get_blob_bytes(client, "lib/app", digest) == first
    assert on_disk(data_dir)[digest] == len(first)


async def test_an_evicted_manifest_is_read_again_from_s3(s3_client, data_dir):
    client = await s3_client(max_bytes=20 * KiB)
    image = await push_image(client, "lib/app", "v1")
    for seed in range(3):
        await push_settled(client, blob_bytes(8 * KiB, 100 + seed))
    assert image.digest not in on_disk(data_dir)
    client.app[REGISTRY]._manifests.clear()  # only the bytes on disk and in S3 remain

    response = await client.get("/v2/lib/app/manifests/v1")

    assert response.status == 200
    assert await response.read() == image.raw
    assert image.digest in on_disk(data_dir)


async def test_free_space_below_the_floor_evicts_until_the_floor_plus_a_margin(
    s3_client, data_dir, monkeypatch
):
    disk = 100 * KiB  # a small filesystem holding nothing but the cache
    probed: list[int] = []

    def free(root: Path) -> int:
        probed.append(disk - sum(on_disk(data_dir).values()))
        return probed[-1]

    monkeypatch.setattr(eviction, "disk_free", free)
    client = await s3_client(max_bytes=None, min_free_bytes=40 * KiB)

    for seed in range(10):
        await push_settled(client, blob_bytes(BLOB, seed))
        assert disk - sum(on_disk(data_dir).values()) >= 40 * KiB

    assert metric(client, "regmirror_evictions_total") >= 4
    assert probed  # the injected probe was used, not the real filesystem


# -- the never-evict rule ------------------------------------------------------------


async def test_pushed_blobs_without_s3_are_never_evicted_and_that_is_logged_once(
    make_client, data_dir, caplog
):
    client = await make_client(cache=CacheSettings(max_bytes=20 * KiB))
    caplog.set_level(logging.WARNING, logger="regmirror.eviction")

    digests = [await push_settled(client, blob_bytes(BLOB, seed)) for seed in range(5)]

    assert set(on_disk(data_dir)) == set(digests)
    assert metric(client, "regmirror_cache_bytes") == 5 * BLOB
    assert metric(client, "regmirror_evictions_total") == 0
    stuck = [r for r in caplog.records if "nothing more can be evicted" in r.getMessage()]
    assert len(stuck) == 1
    assert "only copy" in stuck[0].getMessage()


async def test_pushed_manifests_without_s3_are_never_evicted(make_client, data_dir):
    client = await make_client(cache=CacheSettings(max_bytes=5 * KiB))
    image = await push_image(client, "lib/app", "v1")
    await cache_of(client).settle()

    assert image.digest in on_disk(data_dir)
    assert cache_of(client).state(Digest.parse(image.digest)) is State.PINNED


async def test_a_blob_being_served_is_not_evicted_and_its_get_completes(s3_client, data_dir):
    client = await s3_client(max_bytes=36 * MiB)
    big = os.urandom(32 * MiB)  # more than the socket buffers hold: the send stays open
    digest = await push_settled(client, big)

    response = await client.get(f"/v2/lib/app/blobs/{digest}")
    head = await response.content.readexactly(64 * KiB)
    assert cache_of(client).held(Digest.parse(digest))
    await push_settled(client, os.urandom(4 * MiB), "lib/other")  # over budget; big is LRU
    assert digest in on_disk(data_dir)

    rest = await response.read()
    assert hashlib.sha256(head + rest).hexdigest() == digest.removeprefix("sha256:")
    await push_settled(client, os.urandom(3 * MiB), "lib/other")  # no longer held: it goes
    assert digest not in on_disk(data_dir)
    assert await get_blob_bytes(client, "lib/app", digest) == big


# -- the startup scan ----------------------------------------------------------------


async def test_a_restart_rebuilds_the_index_and_evicts_what_is_over_budget(
    make_client, moto_s3, data_dir
):
    s3 = s3_settings(moto_s3)
    first = await make_client(s3=s3)
    digests = [await push_settled(first, blob_bytes(BLOB, seed)) for seed in range(5)]

    restarted = await make_client(s3=s3, cache=CacheSettings(max_bytes=30 * KiB))
    await cache_of(restarted).settle()

    left = on_disk(data_dir)
    assert sum(left.values()) <= 30 * KiB * eviction.HIGH_WATERMARK
    assert metric(restarted, "regmirror_cache_bytes") == sum(left.values())
    for digest in set(digests) - set(left):  # evicted, and still served from S3
        assert await get_blob_bytes(restarted, "lib/app", digest) == blob_bytes(
            BLOB, digests.index(digest)
        )


async def test_a_restart_without_s3_keeps_every_pushed_blob(make_client, data_dir):
    first = await make_client()
    digests = [await push_settled(first, blob_bytes(BLOB, seed)) for seed in range(5)]

    restarted = await make_client(cache=CacheSettings(max_bytes=20 * KiB))
    await cache_of(restarted).settle()

    assert set(on_disk(data_dir)) == set(digests)
    assert metric(restarted, "regmirror_cache_bytes") == 5 * BLOB


async def test_a_blob_pushed_before_s3_was_configured_is_kept(make_client, moto_s3, data_dir):
    first = await make_client()  # local disk only: these blobs are nowhere else
    digests = [await push_settled(first, blob_bytes(BLOB, seed)) for seed in range(3)]

    restarted = await make_client(s3=s3_settings(moto_s3), cache=CacheSettings(max_bytes=KiB))
    await cache_of(restarted).settle()

    assert set(on_disk(data_dir)) == set(digests)
    for digest in digests:
        assert cache_of(restarted).state(Digest.parse(digest)) is State.PINNED


# -- pull-through --------------------------------------------------------------------


@pytest.fixture
async def mirror(make_client: Any, upstream_registry: ServerProcess) -> Any:
    async def make(**cache: Any) -> TestClient:
        client: TestClient = await make_client(
            upstreams=[UpstreamSettings(url=upstream_registry.url)],
            cache=CacheSettings(**cache),
        )
        return client

    return make


async def test_pulled_blobs_stay_under_the_budget_and_pushed_ones_stay(
    mirror, upstream_registry, http, data_dir
):
    client = await mirror(max_bytes=50 * KiB)
    pushed = await push_settled(client, blob_bytes(BLOB, 999), "local/app")
    repo = f"evict/{uuid.uuid4().hex[:8]}"
    for seed in range(10):
        digest = await push_upstream(http, upstream_registry.url, repo, blob_bytes(BLOB, seed))
        assert await get_blob_bytes(client, repo, str(digest)) == blob_bytes(BLOB, seed)
        await cache_of(client).settle()
        assert sum(on_disk(data_dir).values()) <= 50 * KiB * eviction.HIGH_WATERMARK
        assert pushed in on_disk(data_dir)


async def test_an_evicted_pulled_blob_is_fetched_again_from_the_upstream(
    mirror, upstream_registry, http, data_dir
):
    client = await mirror(max_bytes=30 * KiB)
    repo = f"evict/{uuid.uuid4().hex[:8]}"
    digests = [
        str(await push_upstream(http, upstream_registry.url, repo, blob_bytes(BLOB, seed)))
        for seed in range(4)
    ]
    for digest in digests:
        await get_blob_bytes(client, repo, digest)
        await cache_of(client).settle()
    assert digests[0] not in on_disk(data_dir)
    fills = metric(client, "regmirror_fills_started_total")

    assert await get_blob_bytes(client, repo, digests[0]) == blob_bytes(BLOB, 0)
    assert metric(client, "regmirror_fills_started_total") == fills + 1
    assert digests[0] in on_disk(data_dir)


async def test_an_evicted_pulled_manifest_is_fetched_again_from_the_upstream(
    mirror, upstream_registry, http, data_dir
):
    client = await mirror(max_bytes=30 * KiB)
    repo = f"evict/{uuid.uuid4().hex[:8]}"
    image = await push_upstream_image(http, upstream_registry.url, repo, "v1")
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    response = await client.get(f"/v2/{repo}/manifests/v1", headers=accept)
    assert await response.read() == image.manifest
    for seed in range(4):  # the manifest is the coldest: it goes first
        digest = await push_upstream(http, upstream_registry.url, repo, blob_bytes(BLOB, seed))
        await get_blob_bytes(client, repo, str(digest))
        await cache_of(client).settle()
    assert str(image.digest) not in on_disk(data_dir)
    client.app[REGISTRY]._manifests.clear()

    response = await client.get(f"/v2/{repo}/manifests/{image.digest}", headers=accept)

    assert response.status == 200
    assert await response.read() == image.manifest
    assert str(image.digest) in on_disk(data_dir)
    assert sha256(image.manifest) == str(image.digest)


async def test_a_restart_without_s3_evicts_pulled_blobs_and_keeps_pushed_ones(
    mirror, upstream_registry, http, data_dir
):
    first = await mirror()
    pushed = await push_settled(first, blob_bytes(BLOB, 999), "local/app")
    repo = f"evict/{uuid.uuid4().hex[:8]}"
    for seed in range(4):
        digest = await push_upstream(http, upstream_registry.url, repo, blob_bytes(BLOB, seed))
        await get_blob_bytes(first, repo, str(digest))

    restarted = await mirror(max_bytes=25 * KiB)
    await cache_of(restarted).settle()

    left = on_disk(data_dir)
    assert pushed in left
    assert sum(left.values()) <= 25 * KiB * eviction.HIGH_WATERMARK


async def test_lru_order_survives_a_restart(mirror, upstream_registry, http, data_dir):
    first = await mirror()
    repo = f"evict/{uuid.uuid4().hex[:8]}"
    a, b, c, d = [
        str(await push_upstream(http, upstream_registry.url, repo, blob_bytes(BLOB, seed)))
        for seed in range(4)
    ]
    for digest in (a, b, c, d, a):  # a, pulled first, is read again last: the hottest
        await get_blob_bytes(first, repo, digest)
    await cache_of(first).settle()

    restarted = await mirror(max_bytes=30 * KiB)  # 40 KiB on disk: two must go
    await cache_of(restarted).settle()

    assert set(on_disk(data_dir)) == {d, a}  # b and c, the coldest, went first
