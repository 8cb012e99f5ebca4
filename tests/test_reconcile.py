"""Blobs no link references (what a kill -9 between a blob's rename and its link leaves)
are never pinned: the index marks them unreferenced and deletes them once unused for
``cache.unreferenced_grace`` seconds, reading the links again first.

The app runs in-process on a data directory a "previous run" left (files written
straight into it); ``tests/test_crash.py`` produces the same states with real kills.
"""

# Fixtures imported from tests.support are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from regmirror import layout
from regmirror.api.keys import REGISTRY
from regmirror.config import CacheSettings
from regmirror.digest import Digest
from regmirror.eviction import State
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    data_dir,
    get_blob_bytes,
    make_client,
    push_blob,
    sha256,
)

NAME = "lib/app"
DEADLINE = 10.0


def orphan(data_dir: Path, data: bytes, *, age: float = 0.0) -> Digest:
    """A blob file no link names, last used ``age`` seconds ago."""
    digest = Digest.parse(sha256(data))
    path = data_dir / layout.blob_data(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return digest


def exists(data_dir: Path, digest: Digest) -> bool:
    return (data_dir / layout.blob_data(digest)).exists()


async def test_an_unreferenced_blob_is_deleted_once_its_grace_has_passed(make_client, data_dir):
    old = orphan(data_dir, blob_bytes(1000, 1), age=7200)
    recent = orphan(data_dir, blob_bytes(1000, 2), age=0)
    client = await make_client(cache=CacheSettings(unreferenced_grace=2.0))
    cache = client.app[REGISTRY].cache
    await cache.settle()

    assert not exists(data_dir, old)  # past its grace at startup: gone
    assert exists(data_dir, recent)  # a push in flight elsewhere may still link it
    assert cache.state(recent) is State.UNREFERENCED
    status = await (await client.get("/-/status")).json()
    assert status["cache"]["unreferenced_blobs"] == 1

    deadline = time.monotonic() + DEADLINE
    while exists(data_dir, recent) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not exists(data_dir, recent)  # its grace ended: deleted without a restart
    assert cache.state(recent) is None


async def test_within_its_grace_an_unreferenced_blob_is_not_evicted(make_client, data_dir):
    data = blob_bytes(20_000, 3)
    kept = orphan(data_dir, data, age=7200)  # the coldest blob of all
    client = await make_client(
        cache=CacheSettings(max_bytes=25_000, min_free_bytes=0, unreferenced_grace=1e9)
    )
    cache = client.app[REGISTRY].cache
    await push_blob(client, NAME, blob_bytes(8_000, 4))  # over the budget now
    await cache.settle()
    assert exists(data_dir, kept)
    assert cache.state(kept) is State.UNREFERENCED


async def test_a_link_written_since_the_scan_keeps_the_blob(make_client, data_dir):
    data = blob_bytes(1000, 5)
    digest = orphan(data_dir, data, age=7200)
    client = await make_client(cache=CacheSettings(unreferenced_grace=1e9))
    cache = client.app[REGISTRY].cache
    await cache.settle()
    assert cache.state(digest) is State.UNREFERENCED
    link = data_dir / layout.layer_link(NAME, digest)  # as a push in another process would
    link.parent.mkdir(parents=True)
    link.write_text(str(digest))

    deleted, _ = await cache.delete_unreferenced(0.0)

    assert deleted == []
    assert cache.state(digest) is State.PINNED  # pushed, no S3: the only copy
    assert await get_blob_bytes(client, NAME, str(digest)) == data


async def test_pushing_a_blob_the_scan_found_unreferenced_pins_it(make_client, data_dir):
    data = blob_bytes(1000, 6)
    digest = orphan(data_dir, data, age=7200)
    client = await make_client(cache=CacheSettings(unreferenced_grace=1e9))
    cache = client.app[REGISTRY].cache
    await cache.settle()

    await push_blob(client, NAME, data)  # the client retries the push the kill cut
    deleted, _ = await cache.delete_unreferenced(0.0)

    assert deleted == []
    assert cache.state(digest) is State.PINNED
    assert await get_blob_bytes(client, NAME, str(digest)) == data
