"""Uploads under hostile clients: bounded memory, idle timeout, size and session caps.

Issue 9: upload bodies were buffered in memory (200 uploads each stalled after 1000 KiB
raised a server's RSS by ~280 MB, held after the connections closed), a PATCH that never
ends was never cut, and another PATCH on its session waited behind it. The memory and
idle tests run ``regmirror serve`` as a process, so RSS is the server's alone.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.api import blob_bytes, sha256
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.stalled import StalledPatch, rss_kib

NAME = "lib/app"
KiB, MiB = 1024, 1024 * 1024
STALLED = 200
STALLED_BYTES = 1000 * KiB
RSS_GROWTH_BOUND = 48 * MiB  # the buffering code grew ~250 MiB here; streaming ~11 MiB
SETTLE = 2.5  # seconds of quiet after a burst: the server then gives freed heap back


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        yield session


async def open_session(http: aiohttp.ClientSession, server: ServerProcess) -> str:
    async with http.post(f"{server.url}/v2/{NAME}/blobs/uploads/") as response:
        assert response.status == 202, await response.text()
        return response.headers["Location"]


def session_bytes(server: ServerProcess) -> int:
    return sum(p.stat().st_size for p in (server.data_dir / "uploads").glob("*/data"))


async def test_stalled_uploads_keep_server_memory_bounded(regmirror_server, http):
    server = regmirror_server()
    pid = server.process.pid
    warm = blob_bytes(STALLED_BYTES, seed=1)  # every code path once before measuring
    location = await open_session(http, server)
    async with http.put(f"{server.url}{location}?digest={sha256(warm)}", data=warm) as put:
        assert put.status == 201
    locations = await asyncio.gather(*(open_session(http, server) for _ in range(STALLED)))
    await asyncio.sleep(0.5)
    before = rss_kib(pid) * KiB

    stalled = [StalledPatch(HOST, server.port, location) for location in locations]
    try:
        await asyncio.gather(*(patch.send(STALLED_BYTES) for patch in stalled))
        deadline = time.monotonic() + 15
        while session_bytes(server) < STALLED * STALLED_BYTES and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the server writes the chunks; nothing to await
        streamed = session_bytes(server)
        await asyncio.sleep(SETTLE)
        during = rss_kib(pid) * KiB
    finally:
        for patch in stalled:
            patch.close()
    await asyncio.sleep(SETTLE)
    after = rss_kib(pid) * KiB

    print(f"RSS before {before / MiB:.1f} MiB, stalled {during / MiB:.1f}, closed {after / MiB:.1f}")
    assert streamed == STALLED * STALLED_BYTES, "stalled chunks were not written to disk"
    assert during - before < RSS_GROWTH_BOUND, (before, during)
    assert after - before < RSS_GROWTH_BOUND, (before, after)
    async with http.get(f"{server.url}{locations[0]}") as status:
        assert status.status == 204  # the cut PATCHes left their sessions usable
