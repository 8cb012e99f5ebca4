"""``/readyz``'s own checks (regmirror/health.py): the data directory's free-space floor
with nothing to evict, and the pieces the probe is built from."""

# ruff: noqa: F811

from __future__ import annotations

import hashlib
from pathlib import Path

from regmirror.config import CacheSettings
from regmirror.digest import Digest
from regmirror.eviction import BlobCache, disk_free
from regmirror.health import disk_problem
from tests.support.api import (
    blob_bytes,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    make_client,  # noqa: F401
    sha256,
)

NEVER = 2**60  # bytes free no disk has: the floor is always missed


async def test_readyz_is_503_below_the_free_space_floor_with_nothing_to_evict(make_client):
    client = await make_client(cache=CacheSettings(min_free_bytes=NEVER))
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["status"] == "unavailable"
    assert "below cache.min_free_bytes" in body["checks"]["disk"]
    assert "only 0 bytes can be evicted" in body["checks"]["disk"]
    assert body["checks"]["fds"] == body["checks"]["event_loop"] == "ok"
    healthz = await client.get("/healthz")  # liveness: a restart would not free the disk
    assert healthz.status == 200


async def test_readyz_is_503_with_a_pushed_blob_that_cannot_be_evicted(make_client):
    client = await make_client(cache=CacheSettings(min_free_bytes=NEVER))
    blob = blob_bytes(4096)
    response = await client.post(f"/v2/app/blobs/uploads/?digest={sha256(blob)}", data=blob)
    assert response.status == 201  # without S3 a push is the only copy: pinned
    response = await client.get("/readyz")
    assert response.status == 503
    assert "only 0 bytes can be evicted" in (await response.json())["checks"]["disk"]


async def test_readyz_is_ready_with_plenty_free(client):
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {
        "disk": "ok",
        "fds": "ok",
        "event_loop": "ok",
        "shutdown": "ok",
    }


async def test_below_the_floor_is_fine_while_eviction_can_make_room(tmp_path: Path) -> None:
    free = disk_free(tmp_path)
    cache = BlobCache(tmp_path, min_free_bytes=free * 2)
    digest = Digest.parse("sha256:" + hashlib.sha256(b"x").hexdigest())
    cache.added(digest, free * 2, evictable=True)  # as a fill from an upstream is
    assert cache.evictable_bytes() == free * 2
    assert await disk_problem(cache) is None
    async with cache.holding(digest):  # being read: not evictable now
        assert cache.evictable_bytes() == 0
        assert "below cache.min_free_bytes" in (await disk_problem(cache) or "")
