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
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regmirror import uploads as uploads_module
from regmirror.api.keys import METRICS, REGISTRY, UPLOADS
from regmirror.config import CacheSettings, ConfigError, UploadSettings, load
from regmirror.eviction import _sessions_bytes
from regmirror.memory import HeapTrimmer
from tests.support.api import (  # noqa: F401  (fixtures)
    assert_error,
    blob_bytes,
    client,
    data_dir,
    get_blob_bytes,
    make_client,
    push_blob,
    sha256,
    start_upload,
)
from tests.support.auth import request_from
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.s3 import moto_s3  # noqa: F401
from tests.support.stalled import StalledPatch, rss_kib
from tests.support.uploads import finish_from, open_session, refusals
from tests.test_eviction import on_disk, s3_settings

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


def session_bytes(server: ServerProcess) -> int:
    return sum(p.stat().st_size for p in (server.data_dir / "uploads").glob("*/data"))


async def test_stalled_uploads_keep_server_memory_bounded(regmirror_server, http):
    server = regmirror_server()
    pids = server.serving_pids()  # every worker: the stalled sessions spread over them
    warm = blob_bytes(STALLED_BYTES, seed=1)  # every code path once before measuring
    location = await open_session(http, server)
    async with http.put(f"{server.url}{location}?digest={sha256(warm)}", data=warm) as put:
        assert put.status == 201
    locations = await asyncio.gather(*(open_session(http, server) for _ in range(STALLED)))
    await asyncio.sleep(0.5)
    before = sum(map(rss_kib, pids)) * KiB

    stalled = [StalledPatch(HOST, server.port, location) for location in locations]
    try:
        await asyncio.gather(*(patch.send(STALLED_BYTES) for patch in stalled))
        deadline = time.monotonic() + 15
        while session_bytes(server) < STALLED * STALLED_BYTES and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the server writes the chunks; nothing to await
        streamed = session_bytes(server)
        await asyncio.sleep(SETTLE)
        during = sum(map(rss_kib, pids)) * KiB
    finally:
        for patch in stalled:
            patch.close()
    await asyncio.sleep(SETTLE)
    after = sum(map(rss_kib, pids)) * KiB

    print(
        f"RSS before {before / MiB:.1f} MiB, stalled {during / MiB:.1f}, closed {after / MiB:.1f}"
    )
    assert during - before < RSS_GROWTH_BOUND, (before, during)
    assert after - before < RSS_GROWTH_BOUND, (before, after)
    assert streamed == STALLED * STALLED_BYTES, "stalled chunks were not written to disk"
    async with http.get(f"{server.url}{locations[0]}") as status:
        assert status.status == 204  # the cut PATCHes left their sessions usable


async def test_stalled_chunked_patch_is_cut_after_idle_timeout_and_session_stays_usable(
    regmirror_server, http
):
    server = regmirror_server(env={"REGMIRROR_UPLOADS__IDLE_TIMEOUT": "1"})
    data = blob_bytes(300 * KiB, seed=2)
    location = await open_session(http, server, holding=data[:1000])
    stalled = StalledPatch(HOST, server.port, location)
    try:
        started = time.monotonic()
        await stalled.send(1)  # one byte, then nothing

        status, raw = await stalled.response(timeout=10)
        elapsed = time.monotonic() - started
        closed = await stalled.closed(timeout=5)
    finally:
        stalled.close()

    assert status == 408, raw[:500]
    assert b'"BLOB_UPLOAD_INVALID"' in raw and b"uploads.idle_timeout" in raw
    assert b"\r\nRange: 0-999\r\n" in raw  # what the session holds: the cut byte is not in it
    assert 0.9 <= elapsed < 5, elapsed
    assert closed, "the server kept the stalled connection open"
    async with http.get(f"{server.url}{location}") as status_:
        assert status_.status == 204 and status_.headers["Range"] == "0-999"
    await finish_from(http, server, location, data, 1000)
    assert await refusals(http, server, "idle_timeout") == 1


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
        await stalled.send(1100 * KiB)  # past 1 MiB: the buffering code wrote a batch too
        deadline = time.monotonic() + 10
        while session_bytes(server) < 1 * MiB:
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
    assert await refusals(http, server, "busy") >= 2


# -- in process: size limit, session caps, disk budget ---------------------------------


def sample(client: TestClient, name: str, **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


async def pieces(data: bytes, size: int = 16 * KiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_blob_over_max_blob_bytes_is_413_and_leaves_nothing(make_client, data_dir):
    client = await make_client(uploads=UploadSettings(max_blob_bytes=100 * KiB))
    data = blob_bytes(150 * KiB, seed=4)
    location = await start_upload(client, NAME)
    session = data_dir / "uploads" / location.rsplit("/", 1)[1]
    assert (await client.patch(location, data=data[: 60 * KiB])).status == 202

    # Announced up front (Content-Length), then streamed past the limit (chunked).
    declared = await client.patch(location, data=data[60 * KiB :])
    streamed = await client.patch(location, data=pieces(data[60 * KiB :]))

    for response in (declared, streamed):
        await assert_error(response, 413, "BLOB_UPLOAD_INVALID")
        assert "uploads.max_blob_bytes" in (await response.json())["errors"][0]["message"]
        assert response.headers["Range"] == f"0-{60 * KiB - 1}"
    assert (session / "data").stat().st_size == 60 * KiB  # the refused bytes are gone
    assert sample(client, "regmirror_upload_refusals_total", reason="too_large") == 2
    whole = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={sha256(data)}", data=data)
    await assert_error(whole, 413, "BLOB_UPLOAD_INVALID")
    assert sorted(p.name for p in (data_dir / "uploads").iterdir()) == [session.name]
    fits = data[: 100 * KiB]
    put = await client.put(
        f"{location}?digest={sha256(fits)}",
        data=fits[60 * KiB :],
        headers={"Content-Range": f"{60 * KiB}-{100 * KiB - 1}"},
    )
    assert put.status == 201, await put.text()  # exactly the limit is allowed
    assert await get_blob_bytes(client, NAME, sha256(fits)) == fits


async def test_open_sessions_are_capped_per_client_and_in_all(make_client, data_dir):
    client = await make_client(uploads=UploadSettings(max_sessions=3, max_sessions_per_client=2))
    path = f"/v2/{NAME}/blobs/uploads/"
    first = [await request_from(client, "127.0.0.2", "POST", path) for _ in range(2)]
    refused = await request_from(client, "127.0.0.2", "POST", path)
    other = await request_from(client, "127.0.0.3", "POST", path)
    full = await request_from(client, "127.0.0.4", "POST", path)

    assert [status for status, _, _ in first] == [202, 202]
    assert refused[0] == 429 and b'"TOOMANYREQUESTS"' in refused[2]
    assert b"max_sessions_per_client" in refused[2] and b"127.0.0.2" in refused[2]
    assert other[0] == 202
    assert full[0] == 429 and b"uploads.max_sessions)" in full[2]
    assert len(list((data_dir / "uploads").iterdir())) == 3
    assert sample(client, "regmirror_upload_refusals_total", reason="max_sessions") == 1
    refusals_ = "regmirror_upload_refusals_total"
    assert sample(client, refusals_, reason="max_sessions_per_client") == 1

    # A session cancelled or committed frees its place; a restart still counts the rest.
    status, _, _ = await request_from(client, "127.0.0.2", "DELETE", first[0][1]["Location"])
    assert status == 204
    data = blob_bytes(1000, seed=5)
    status, _, _ = await request_from(
        client, "127.0.0.2", "PUT", f"{first[1][1]['Location']}?digest={sha256(data)}", data=data
    )
    assert status == 201
    assert (await request_from(client, "127.0.0.2", "POST", path))[0] == 202
    assert (await request_from(client, "127.0.0.2", "POST", path))[0] == 202
    assert (await request_from(client, "127.0.0.5", "POST", path))[0] == 429
    restarted = await make_client(uploads=UploadSettings(max_sessions=3, max_sessions_per_client=2))
    assert (await request_from(restarted, "127.0.0.2", "POST", path))[0] == 429
    assert (await request_from(restarted, "127.0.0.6", "POST", path))[0] == 429


async def test_expired_sessions_free_their_places(make_client, data_dir):
    client = await make_client(uploads=UploadSettings(max_sessions=1))
    location = await start_upload(client, NAME)
    response = await client.post(f"/v2/{NAME}/blobs/uploads/")
    await assert_error(response, 429, "TOOMANYREQUESTS")
    old = time.time() - client.app[UPLOADS].ttl - 60
    for path in (data_dir / "uploads" / location.rsplit("/", 1)[1]).iterdir():
        os.utime(path, (old, old))

    assert await client.app[UPLOADS].expire() == 1

    await start_upload(client, NAME)


async def test_upload_sessions_count_in_the_disk_budget(make_client, moto_s3, data_dir):
    budget = 200 * KiB
    client = await make_client(s3=s3_settings(moto_s3), cache=CacheSettings(max_bytes=budget))
    cache = client.app[REGISTRY].cache
    pushed = [await push_blob(client, NAME, blob_bytes(20 * KiB, seed=s)) for s in range(6)]
    await cache.settle()
    assert len(on_disk(data_dir)) == len(pushed)  # 120 KiB: within the budget

    location = await start_upload(client, NAME)
    response = await client.patch(location, data=pieces(blob_bytes(100 * KiB, seed=9)))
    assert response.status == 202
    await cache.settle()

    sessions = _sessions_bytes(data_dir / "uploads")
    assert sessions >= 100 * KiB
    assert sample(client, "regmirror_cache_staged_bytes") >= 100 * KiB
    stored = sum(on_disk(data_dir).values())
    assert len(on_disk(data_dir)) < len(pushed), "the session's bytes evicted nothing"
    assert stored + sessions <= budget * 0.85

    assert (await client.delete(location)).status == 204
    assert sample(client, "regmirror_cache_staged_bytes") < 100 * KiB


def test_upload_limit_settings_from_file_and_environment(tmp_path):
    path = tmp_path / "regmirror.yml"
    path.write_text("uploads:\n  max_blob_bytes: 2GiB\n  max_sessions: 10\n")
    settings = load(
        path,
        environ={
            "REGMIRROR_UPLOADS__IDLE_TIMEOUT": "2.5",
            "REGMIRROR_UPLOADS__MAX_SESSIONS_PER_CLIENT": "3",
        },
    )
    assert settings.uploads == UploadSettings(
        max_blob_bytes=2 * 1024**3, max_sessions=10, max_sessions_per_client=3, idle_timeout=2.5
    )
    assert UploadSettings().max_blob_bytes == 10 * 1024**3
    for key in ("idle_timeout", "max_blob_bytes", "max_sessions", "max_sessions_per_client"):
        with pytest.raises(ConfigError, match=f"uploads.{key}"):
            load(environ={f"REGMIRROR_UPLOADS__{key.upper()}": "0"})


async def test_heap_is_trimmed_once_uploads_go_quiet_after_a_burst():
    trimmer = HeapTrimmer(after_bytes=1 * MiB)
    trimmer.moved(2 * MiB)
    assert not await trimmer.tick()  # bytes moved in this interval: not quiet yet
    assert await trimmer.tick()  # quiet after the burst: trimmed
    assert not await trimmer.tick()  # once
    trimmer.moved(512 * KiB)
    await trimmer.tick()
    assert not await trimmer.tick()  # too little moved since to be worth it
    assert trimmer.trims == 1


async def test_a_rolled_back_chunk_resumes_the_running_hash_without_reading_the_file(
    client, monkeypatch
):
    data = blob_bytes(300 * KiB, seed=11)
    location = await start_upload(client, NAME)
    assert (await client.patch(location, data=pieces(data[: 200 * KiB]))).status == 202
    rehashed = []
    monkeypatch.setattr(uploads_module, "_hash_fd", lambda *args: rehashed.append(args))

    short = await client.patch(
        location,
        data=pieces(data[200 * KiB : 250 * KiB]),
        headers={"Content-Range": f"{200 * KiB}-{300 * KiB - 1}"},
    )
    await assert_error(short, 400, "SIZE_INVALID")
    rest = await client.patch(location, data=pieces(data[200 * KiB :]))
    put = await client.put(f"{location}?digest={sha256(data)}")

    assert rest.status == 202 and put.status == 201, await put.text()
    assert rehashed == []  # a cut at 9 GiB must not cost reading 9 GiB again
    assert await get_blob_bytes(client, NAME, sha256(data)) == data


async def raw_exchange(client: TestClient, head: str, body: bytes | None = None) -> bytes:
    """Send ``head``; read what the server answers before any body (then send ``body``
    and read the rest). Returns everything the server sent."""
    url = client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        received = await asyncio.wait_for(reader.read(65536), 5)
        if body is not None:
            writer.write(body)
            await writer.drain()
            while b"\r\n\r\n" not in received.partition(b"100 Continue\r\n\r\n")[2]:
                received += await asyncio.wait_for(reader.read(65536), 5)
        return received
    finally:
        writer.close()


async def test_expect_continue_refuses_a_too_large_body_before_it_is_sent(make_client):
    client = await make_client(uploads=UploadSettings(max_blob_bytes=100 * KiB))
    location = await start_upload(client, NAME)
    request = "PATCH {} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n"

    refused = await raw_exchange(client, request.format(location, 200 * KiB))
    accepted = await raw_exchange(client, request.format(location, 10), body=b"0123456789")

    assert refused.startswith(b"HTTP/1.1 413 "), refused[:200]
    assert b'"BLOB_UPLOAD_INVALID"' in refused and b"100 Continue" not in refused
    assert accepted.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 "), accepted[:200]
    assert sample(client, "regmirror_upload_refusals_total", reason="too_large") == 1
