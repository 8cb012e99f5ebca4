"""Instant startup: the server answers and serves stored blobs while its index is built.

The store holds 20,000 blobs, each linked into a repository, written straight into the
data directory as a previous run would have left them. The index's scan is held at a
gate (a wrapper around :func:`regmirror.eviction.scan`), so "served before the index
finished loading" is a fact the test arranges, not a race it hopes to win; then the
gate opens and the index must know every blob, and eviction, which waited, runs.
"""

# Fixtures imported from tests.support are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from regmirror import eviction, layout
from regmirror.api.keys import REGISTRY
from regmirror.config import CacheSettings
from regmirror.digest import Digest
from tests.support.api import data_dir, make_client  # noqa: F401  (fixtures)

BLOBS = 20_000
REPOSITORY = "lib/stored"
START_TIMEOUT = 20.0  # a startup that waits for the gated scan never gets past it


def fill_store(data_dir: Path, count: int, *, proxied: bool = False) -> list[tuple[str, bytes]]:
    """``count`` small blobs and their layer links, as a previous run leaves them: pushed,
    or (``proxied``) pulled through from an upstream, so evictable."""
    links = data_dir / "proxy" if proxied else data_dir
    stored = []
    for i in range(count):
        data = b"blob %d " % i + os.urandom(32)
        digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
        blob = data_dir / layout.blob_data(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = links / layout.layer_link(REPOSITORY, digest)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(str(digest))
        stored.append((str(digest), data))
    return stored


@pytest.fixture
def gated_scan(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The index's scan waits until the returned event is set."""
    gate = threading.Event()
    scan = eviction.scan

    def held(root: Path, *, s3: bool) -> Any:
        if not gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return scan(root, s3=s3)

    monkeypatch.setattr(eviction, "scan", held)
    return gate


async def test_stored_blobs_are_served_before_the_index_has_loaded(
    make_client, data_dir, gated_scan
):
    stored = fill_store(data_dir, BLOBS)
    try:
        client = await asyncio.wait_for(make_client(), START_TIMEOUT)
        cache = client.app[REGISTRY].cache
        assert (await client.get("/v2/")).status == 200
        for digest, data in (stored[0], stored[BLOBS // 2], stored[-1]):
            response = await client.get(f"/v2/{REPOSITORY}/blobs/{digest}")
            assert response.status == 200
            assert await response.read() == data
            head = await client.head(f"/v2/{REPOSITORY}/blobs/{digest}")
            assert head.status == 200
            assert int(head.headers["Content-Length"]) == len(data)
        status = await (await client.get("/-/status")).json()
        assert status["cache"]["index_loaded"] is False
        assert not cache.loaded  # all of the above was served with the scan still held
    finally:
        gated_scan.set()
    await asyncio.wait_for(cache.wait_loaded(), START_TIMEOUT)
    status = await (await client.get("/-/status")).json()
    assert status["cache"]["index_loaded"] is True
    assert status["cache"]["blobs"] == BLOBS
    assert status["cache"]["bytes"] == sum(len(data) for _, data in stored)


async def test_eviction_waits_for_the_index_then_evicts_by_it(make_client, data_dir, gated_scan):
    """An index still loading knows only new blobs: evicting by it would pick those (the
    hottest) instead of the coldest. Eviction waits; once loaded, it takes the coldest."""
    stored = fill_store(data_dir, 200, proxied=True)
    for age, (digest, _) in enumerate(reversed(stored)):  # stored[0] is the coldest
        when = 1_700_000_000 - age
        os.utime(data_dir / layout.blob_data(Digest.parse(digest)), (when, when))
    total = sum(len(data) for _, data in stored)
    budget = total + 4096  # a push of 4 KiB more goes over the high watermark
    try:
        client = await asyncio.wait_for(
            make_client(cache=CacheSettings(max_bytes=budget, min_free_bytes=0)), START_TIMEOUT
        )
        cache = client.app[REGISTRY].cache
        new = os.urandom(4096)
        digest = "sha256:" + hashlib.sha256(new).hexdigest()
        response = await client.post(f"/v2/{REPOSITORY}/blobs/uploads/?digest={digest}", data=new)
        assert response.status == 201
        await asyncio.sleep(0.2)  # time enough for an eviction that did not wait to act
        assert all((data_dir / layout.blob_data(Digest.parse(d))).exists() for d, _ in stored)
    finally:
        gated_scan.set()
    await asyncio.wait_for(cache.settle(), START_TIMEOUT)
    gone = [d for d, _ in stored if not (data_dir / layout.blob_data(Digest.parse(d))).exists()]
    assert gone, "over budget and nothing evicted"
    assert gone == [d for d, _ in stored[: len(gone)]]  # the coldest, in order
    assert cache.total + cache.uploads <= budget * eviction.LOW_WATERMARK
