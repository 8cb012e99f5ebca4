"""A blob's size remembered by one process (regmirror.stored.StoredFiles) must never serve
a file another process replaced: with ``server.workers`` a push in one worker that
repairs a damaged blob renames the verified bytes over the file while every other
worker still remembers the damaged file's size. Two real ``regmirror serve`` processes on
one data directory stand for two workers (deterministically: each test picks the process
that answers)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from regmirror import layout
from regmirror.digest import Digest
from tests.support.api import blob_bytes, sha256
from tests.support.http import session  # noqa: F401
from tests.support.processes import ServerProcess, regmirror_server  # noqa: F401

NAME = "workers/stored"
Start = Callable[..., ServerProcess]


async def push(client: aiohttp.ClientSession, server: ServerProcess, data: bytes) -> str:
    digest = sha256(data)
    url = f"{server.url}/v2/{NAME}/blobs/uploads/?digest={digest}"
    async with client.post(url, data=data) as response:
        assert response.status == 201, await response.text()
    return digest


async def fetch_damaged(client: aiohttp.ClientSession, url: str) -> None:
    """A GET of the damaged file: its size is remembered from now on."""
    try:
        async with client.get(url) as response:
            assert response.status == 200
            await response.read()
    except aiohttp.ClientPayloadError:
        pass  # longer than the file: cut


@pytest.mark.parametrize("damage", ["truncated", "extended"])
async def test_a_blob_another_process_repaired_is_served_whole_by_this_one(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    tmp_path: Path,
    damage: str,
) -> None:
    data_dir = tmp_path / "shared-data"
    one = regmirror_server(data_dir=data_dir, log_level="WARNING")
    other = regmirror_server(data_dir=data_dir, log_level="WARNING")
    data = blob_bytes(256 * 1024, seed=11)
    digest = await push(session, one, data)
    path = data_dir / layout.blob_data(Digest.parse(digest))
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data + b"x" * 4096)
    url = f"{one.url}/v2/{NAME}/blobs/{digest}"
    await fetch_damaged(session, url)

    assert await push(session, other, data) == digest  # the other process repairs it
    assert path.read_bytes() == data

    async with session.head(url) as head:
        assert head.status == 200
        assert head.headers["Content-Length"] == str(len(data))
    async with session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        body = await asyncio.wait_for(response.read(), 30)
    assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    tail = {"Range": f"bytes={len(data) - 1000}-"}  # past the damaged file's end
    async with session.get(url, headers=tail) as ranged:
        assert ranged.status == 206
        assert ranged.headers["Content-Range"] == (
            f"bytes {len(data) - 1000}-{len(data) - 1}/{len(data)}"
        )
        assert await ranged.read() == data[-1000:]
