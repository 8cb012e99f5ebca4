"""A minimum upload rate (``uploads.min_rate`` over ``uploads.min_rate_window``).

``uploads.idle_timeout`` alone never cut a trickle: a body that sends a byte every few
seconds is never idle, so it held its session, its connection and the session's one
writer's place forever. Against ``regmirror serve`` as a process.
"""

# Fixtures imported from tests.support are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from regmirror.config import ConfigError, load
from tests.support.api import blob_bytes, sha256
from tests.support.http import session  # noqa: F401  (fixture)
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.stalled import StalledPatch
from tests.support.uploads import NAME, finish_from, open_session, refusals

RATE = 1000  # bytes a second
WINDOW = 1.5  # seconds
PACE = {"REGMIRROR_UPLOADS__MIN_RATE": str(RATE), "REGMIRROR_UPLOADS__MIN_RATE_WINDOW": "1.5"}


async def test_a_trickle_below_the_minimum_rate_is_cut_and_the_session_stays_usable(
    regmirror_server, session
):
    server = regmirror_server(env=PACE)  # idle_timeout stays 60 s: a trickle is never idle
    data = blob_bytes(4000, seed=7)
    location = await open_session(session, server, holding=data[:1000])
    stalled = StalledPatch(HOST, server.port, location)
    try:
        started = time.monotonic()
        await stalled.send(1)
        trickle = asyncio.create_task(stalled.trickle(40, every=0.25))  # 4 bytes/s, 10 s
        status, raw = await stalled.response(timeout=10)
        elapsed = time.monotonic() - started
        closed = await stalled.closed(timeout=5)
        await trickle
    finally:
        stalled.close()

    assert status == 408, raw[:500]
    assert b'"BLOB_UPLOAD_INVALID"' in raw and b"uploads.min_rate" in raw
    assert b"\r\nRange: 0-999\r\n" in raw  # the trickled bytes are not in the session
    assert WINDOW * 0.9 <= elapsed < WINDOW + 3, elapsed
    assert closed, "the server kept the trickling connection open"
    await finish_from(session, server, location, data, 1000)
    assert await refusals(session, server, "too_slow") == 1
    assert await refusals(session, server, "idle_timeout") == 0


async def test_a_slow_but_steady_upload_above_the_rate_goes_through(regmirror_server, session):
    server = regmirror_server(env=PACE)
    pieces = [blob_bytes(500, seed=i) for i in range(16)]  # 2,000 bytes/s over ~4 s
    data = b"".join(pieces)
    location = await open_session(session, server)

    async def steady() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.25)

    started = time.monotonic()
    async with session.put(f"{server.url}{location}?digest={sha256(data)}", data=steady()) as put:
        assert put.status == 201, await put.text()
    assert time.monotonic() - started > 2 * WINDOW  # it spanned several windows
    async with session.get(f"{server.url}/v2/{NAME}/blobs/{sha256(data)}") as blob:
        assert await blob.read() == data


async def test_a_minimum_rate_of_zero_lets_a_trickle_run(regmirror_server, session):
    server = regmirror_server(
        env={**PACE, "REGMIRROR_UPLOADS__MIN_RATE": "0", "REGMIRROR_UPLOADS__IDLE_TIMEOUT": "1"}
    )
    location = await open_session(session, server)

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(10):  # 2 bytes/s for 5 s: past three windows
            yield b"t"
            await asyncio.sleep(0.5)

    async with session.patch(f"{server.url}{location}", data=trickle()) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == "0-9"


def test_min_rate_settings_are_sizes_and_checked():
    uploads = load(environ={}).uploads
    assert (uploads.min_rate, uploads.min_rate_window) == (1024, 60.0)
    env = {"REGMIRROR_UPLOADS__MIN_RATE": "2KiB", "REGMIRROR_UPLOADS__MIN_RATE_WINDOW": "30"}
    assert load(environ=env).uploads.min_rate == 2048
    for key, value in (("MIN_RATE", "-1"), ("MIN_RATE_WINDOW", "0")):
        with pytest.raises(ConfigError, match=f"uploads.{key.lower()}"):
            load(environ={f"REGMIRROR_UPLOADS__{key}": value})
