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


def refusals(metrics_text: str, reason: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(f'regmirror_upload_refusals_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refusals metric for {reason}")


async def test_stalled_chunked_patch_is_cut_after_idle_timeout_and_session_stays_usable(
    regmirror_server, http
):
    server = regmirror_server(env={"REGMIRROR_UPLOADS__IDLE_TIMEOUT": "1"})
    data = blob_bytes(300 * KiB, seed=2)
    location = await open_session(http, server)
    async with http.patch(f"{server.url}{location}", data=data[:1000]) as first:
        assert first.status == 202
    stalled = StalledPatch(HOST, server.port, location)
    try:
        started = time.monotonic()
        await stalled.send(1)  # one byte, then nothing

        status, raw = await stalled.response(timeout=10)
        elapsed = time.monotonic() - started
        closed = await stalled.reader.read(1) == b""  # type: ignore[union-attr]
    finally:
        stalled.close()

    assert status == 408, raw[:500]
    assert b'"BLOB_UPLOAD_INVALID"' in raw and b"uploads.idle_timeout" in raw
    assert b"\r\nRange: 0-999\r\n" in raw  # what the session holds: the cut byte is not in it
    assert 0.9 <= elapsed < 5, elapsed
    assert closed, "the server kept the stalled connection open"
    async with http.get(f"{server.url}{location}") as status_:
        assert status_.status == 204 and status_.headers["Range"] == "0-999"
    async with http.patch(
        f"{server.url}{location}", data=data[1000:], headers={"Content-Range": f"1000-{len(data) - 1}"}
    ) as rest:
        assert rest.status == 202, await rest.text()
    async with http.put(f"{server.url}{location}?digest={sha256(data)}") as put:
        assert put.status == 201, await put.text()
    async with http.get(f"{server.url}/v2/{NAME}/blobs/{sha256(data)}") as blob:
        assert await blob.read() == data
    async with http.get(f"{server.url}/metrics") as metrics:
        assert refusals(await metrics.text(), "idle_timeout") == 1


async def test_a_trickling_body_is_not_idle(regmirror_server, http):
    server = regmirror_server(env={"REGMIRROR_UPLOADS__IDLE_TIMEOUT": "1"})
    location = await open_session(http, server)

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"t"
            await asyncio.sleep(0.4)

    async with http.patch(f"{server.url}{location}", data=trickle()) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == "0-5"


async def test_a_write_to_a_session_another_request_is_writing_is_refused_at_once(
    regmirror_server, http
):
    server = regmirror_server()  # the default idle timeout: the stalled PATCH stays in
    data = blob_bytes(100 * KiB, seed=3)
    location = await open_session(http, server)
    stalled = StalledPatch(HOST, server.port, location)
    try:
        await stalled.send(64 * KiB)
        deadline = time.monotonic() + 10
        while session_bytes(server) < 64 * KiB:
            assert time.monotonic() < deadline, "the stalled chunk never reached the session"
            await asyncio.sleep(0.02)  # the server writes it; nothing to await

        started = time.monotonic()
        patch = await asyncio.wait_for(http.patch(f"{server.url}{location}", data=data), 5)
        put = await asyncio.wait_for(
            http.put(f"{server.url}{location}?digest={sha256(data)}", data=data), 5
        )
        elapsed = time.monotonic() - started
        for response in (patch, put):
            assert response.status == 416, await response.text()
            body = await response.json()
            assert body["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
            assert "being written by another request" in body["errors"][0]["message"]
            assert response.headers["Range"] == "0-0"  # the stalled chunk is not committed
            response.release()
        assert elapsed < 3, elapsed
    finally:
        stalled.close()

    deadline = time.monotonic() + 10
    while True:  # the server rolls the broken-off chunk back once it sees the close
        async with http.patch(f"{server.url}{location}", data=data) as retry:
            if retry.status == 202 or time.monotonic() > deadline:
                break
        await asyncio.sleep(0.05)
    assert retry.status == 202
    async with http.put(f"{server.url}{location}?digest={sha256(data)}") as put:
        assert put.status == 201, await put.text()
    async with http.get(f"{server.url}/metrics") as metrics:
        assert refusals(await metrics.text(), "busy") >= 2
