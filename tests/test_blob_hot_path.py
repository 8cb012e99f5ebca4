"""The lean path for stored blobs: sizes and headers remembered per digest, the file opened
on the event loop, and what must still hold (a file gone behind the process's back, an
evicted blob, conditional requests, the served-bytes metric)."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path

from regmirror import layout
from regmirror.api.keys import REGISTRY
from regmirror.config import CacheSettings
from regmirror.digest import Digest
from tests.support.api import (
    assert_error,
    blob_bytes,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    make_client,  # noqa: F401
    push_blob,
)

DATA = blob_bytes(200_000, seed=11)


def blob_file(data_dir: Path, digest: str) -> Path:
    return data_dir / layout.blob_data(Digest.parse(digest))


async def test_stored_blob_etag_is_its_digest_and_if_none_match_is_304(client):
    digest = await push_blob(client, "lib/app", DATA)
    url = f"/v2/lib/app/blobs/{digest}"

    response = await client.get(url)
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "Last-Modified" not in response.headers  # the mtime records use, not content

    for header in (f'"{digest}"', f'W/"{digest}", "other"', "*"):
        cached = await client.get(url, headers={"If-None-Match": header})
        assert cached.status == 304, header
        assert cached.headers["ETag"] == f'"{digest}"'
        assert await cached.read() == b""
    other = await client.get(url, headers={"If-None-Match": '"sha256:00"'})
    assert other.status == 200 and await other.read() == DATA


async def test_if_range_other_than_the_etag_gets_the_whole_blob(client):
    digest = await push_blob(client, "lib/app", DATA)
    url = f"/v2/lib/app/blobs/{digest}"

    ranged = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": f'"{digest}"'})
    assert ranged.status == 206 and await ranged.read() == DATA[10:20]
    for validator in ('"sha256:00"', "Tue, 01 Dec 2026 10:00:00 GMT"):
        whole = await client.get(url, headers={"Range": "bytes=10-19", "If-Range": validator})
        assert whole.status == 200, validator
        assert await whole.read() == DATA


async def test_a_file_removed_behind_the_process_is_not_served_from_what_it_remembered(
    client, data_dir
):
    digest = await push_blob(client, "lib/app", DATA)
    url = f"/v2/lib/app/blobs/{digest}"
    assert (await client.get(url)).status == 200  # size and headers remembered now
    assert (await client.head(url)).status == 200

    blob_file(data_dir, digest).unlink()  # another process (fsck, an operator) removed it

    await assert_error(await client.get(url), 404, "BLOB_UNKNOWN")
    head = await client.head(url)
    assert head.status == 404


async def test_a_file_back_after_removal_is_served_again(client, data_dir):
    digest = await push_blob(client, "lib/app", DATA)
    url = f"/v2/lib/app/blobs/{digest}"
    assert (await client.get(url)).status == 200
    path = blob_file(data_dir, digest)
    kept = path.read_bytes()
    path.unlink()
    assert (await client.get(url)).status == 404
    path.write_bytes(kept)

    response = await client.get(url)
    assert response.status == 200 and await response.read() == DATA


async def test_eviction_forgets_what_was_remembered_of_a_blob(make_client, data_dir):
    client = await make_client(cache=CacheSettings(max_bytes=len(DATA) // 2, min_free_bytes=0))
    registry = client.app[REGISTRY]
    digest = Digest.of(DATA)
    path = blob_file(data_dir, str(digest))  # as a fill leaves it: evictable
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    found = await registry.stored.find(digest)
    assert (await registry.stored.find(digest)) is found  # remembered: no second stat

    registry.cache.added(digest, len(DATA), evictable=True)  # over max_bytes: evicted
    await registry.cache.settle()

    assert not path.exists()
    assert registry.stored._known.get(digest) is None


async def test_stored_blob_bytes_are_counted_once_per_body_sent(client):
    digest = await push_blob(client, "lib/app", DATA)
    url = f"/v2/lib/app/blobs/{digest}"

    before = await _served_local(client)
    await (await client.get(url)).read()
    await (await client.get(url, headers={"Range": "bytes=0-99"})).read()
    await (await client.head(url)).read()
    await (await client.get(url, headers={"If-None-Match": f'"{digest}"'})).read()
    await asyncio.sleep(0)
    assert await _served_local(client) - before == len(DATA) + 100


async def _served_local(client) -> float:
    body = await (await client.get("/metrics")).text()
    for line in body.splitlines():
        if line.startswith('regmirror_bytes_served_total{tier="local"}'):
            return float(line.split()[-1])
    return 0.0
