"""Serving bodies from fills in progress, end to end: real regmirror processes in front of
registry:2 behind a proxy that can hold, cut and corrupt blob bodies.

The invariant under test: no response ever ends cleanly with bytes that were not
verified, whatever the request asked for; a fill bigger than the cache budget is
streamed through, not kept; a client that goes away is not a server error.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from regmirror import layout
from tests.support.processes import ServerProcess, regmirror_server
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    Countdown,
    UpstreamProxy,
    eventually,
    fetch_hashed,
    http,
    proxy,
    stored_files,
    upstream_env,
)
from tests.support.upstream import push_blob, upstream_registry

__all__ = ["http", "proxy", "regmirror_server", "upstream_registry"]

MiB = 1024 * 1024
Start = Callable[..., ServerProcess]


async def metrics_text(http: aiohttp.ClientSession, server: ServerProcess) -> str:
    async with http.get(f"{server.url}/metrics") as response:
        return await response.text()


def sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as exposed); 0 if absent."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def requests(text: str, status: str | None = None) -> float:
    """Blob GETs counted with ``status`` (None: with any)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "regmirror_http_requests_total"
        and s.labels.get("route") == "/v2/{name}/blobs/{digest}"
        and status in (None, s.labels.get("status"))
    )


def disk_bytes(*directories: Path) -> int:
    return sum(
        p.stat().st_size for d in directories if d.exists() for p in d.rglob("*") if p.is_file()
    )


# -- finding 10: unverified bytes never end a body cleanly ------------------------------


async def test_no_request_shape_gets_a_clean_body_of_wrong_bytes_from_a_fill(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    size = 4 * MiB + 5
    data = os.urandom(size)
    digest = await push_blob(http, upstream_registry.url, "lies/blob", data)
    server = regmirror_server(env=upstream_env(proxy.url))
    url = f"{server.url}/v2/lies/blob/blobs/{digest}"
    async with http.head(url) as response:  # HEAD-then-GET, as docker does
        assert response.status == 200
    proxy.corrupt = True  # byte 0 is wrong: only the digest check can tell
    proxy.hold_after = 2 * MiB  # the fill stays in progress while the requests are answered

    shapes = {
        "full": {},
        "first KiB": {"Range": "bytes=0-1023"},
        "middle": {"Range": "bytes=1000-99999"},
        "open-ended": {"Range": "bytes=1-"},
        "suffix": {"Range": "bytes=-10"},
    }
    answered = Countdown(len(shapes))
    tasks = {
        shape: asyncio.create_task(
            fetch_hashed(http, url, headers=headers, keep=True, on_headers=answered.arrive)
        )
        for shape, headers in shapes.items()
    }
    await asyncio.wait_for(proxy.held.wait(), BOUND)
    await answered.wait()  # every response has started while the fill is in progress
    proxy.release.set()
    results = {shape: await asyncio.wait_for(task, BOUND) for shape, task in tasks.items()}

    for shape, fetched in results.items():
        clean_2xx = fetched.error is None and fetched.status in (200, 206)
        assert not clean_2xx, f"{shape}: a clean {fetched.status} of unverified bytes"
    assert proxy.blob_gets == 1
    assert stored_files(server.data_dir, digest) == []
    text = await metrics_text(http, server)
    assert sample(text, 'regmirror_fills_total{result="digest_mismatch"}') == 1


async def test_a_range_during_a_good_fill_ends_after_verification_with_the_right_bytes(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    size = 4 * MiB + 5
    data = os.urandom(size)
    digest = await push_blob(http, upstream_registry.url, "range/good", data)
    server = regmirror_server(env=upstream_env(proxy.url))
    url = f"{server.url}/v2/range/good/blobs/{digest}"
    proxy.hold_after = 2 * MiB
    full = asyncio.create_task(fetch_hashed(http, url))
    await asyncio.wait_for(proxy.held.wait(), BOUND)

    first_kib = {"Range": "bytes=0-1023"}
    ranged = asyncio.create_task(fetch_hashed(http, url, headers=first_kib, keep=True))
    done, _ = await asyncio.wait({ranged}, timeout=0.5)
    assert not done, "a Range of bytes already filled ended before the digest was verified"
    proxy.release.set()

    fetched = await asyncio.wait_for(ranged, BOUND)
    assert (fetched.status, fetched.error, fetched.body) == (206, None, data[:1024])
    assert fetched.headers["Content-Range"] == f"bytes 0-1023/{size}"
    whole = await asyncio.wait_for(full, BOUND)
    assert (whole.status, whole.error, whole.digest) == (200, None, str(digest))
    assert stored_files(server.data_dir, digest) == [server.data_dir / layout.blob_data(digest)]


# -- finding 10: a fill is budgeted ------------------------------------------------------


async def test_a_fill_bigger_than_the_budget_streams_through_and_is_never_written(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    budget = 2 * MiB
    data = os.urandom(12 * MiB + 3)
    digest = await push_blob(http, upstream_registry.url, "big/blob", data)
    server = regmirror_server(
        env={
            **upstream_env(proxy.url),
            # Both waiters share one fill whichever worker each reaches: the one that
            # streams it through relays it to the other (regmirror.fill_relay).
            "REGMIRROR_CACHE__MAX_BYTES": str(budget),
        }
    )
    url = f"{server.url}/v2/big/blob/blobs/{digest}"
    proxy.hold_after = 6 * MiB
    received = [0, 0]
    hashers = [hashlib.sha256(), hashlib.sha256()]
    statuses: list[int] = []

    async def client(i: int) -> None:
        async with http.get(url) as response:
            statuses.append(response.status)
            async for chunk in response.content.iter_chunked(256 * 1024):
                hashers[i].update(chunk)
                received[i] += len(chunk)

    clients = [asyncio.create_task(client(i)) for i in range(2)]  # two waiters, one fill
    await asyncio.wait_for(proxy.held.wait(), BOUND)

    async def mid_fill() -> bool:
        return min(received) >= 4 * MiB

    await eventually(mid_fill)
    on_disk = disk_bytes(server.data_dir / "fills", server.data_dir / layout.ROOT / "blobs")
    assert on_disk <= budget, f"{on_disk} bytes on disk with a {budget}-byte budget"
    proxy.release.set()
    await asyncio.wait_for(asyncio.gather(*clients), BOUND)

    assert statuses == [200, 200]
    for hasher in hashers:
        assert f"sha256:{hasher.hexdigest()}" == str(digest)
    assert proxy.blob_gets == 1
    assert stored_files(server.data_dir, digest) == []
    text = await metrics_text(http, server)
    assert sample(text, 'regmirror_fills_total{result="stream_through"}') == 1
    assert sample(text, 'regmirror_fill_stream_through_total{reason="over_budget"}') == 1

    # A Range of it (nothing kept: a new fill, verified before the body ends).
    ranged = await fetch_hashed(http, url, headers={"Range": "bytes=100-199"}, keep=True)
    assert (ranged.status, ranged.error, ranged.body) == (206, None, data[100:200])


# -- finding 8: a client that goes away is not a server error ----------------------------


async def test_a_client_that_disconnects_during_a_fill_is_not_a_server_error(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(16 * MiB)
    digest = await push_blob(http, upstream_registry.url, "gone/blob", data)
    server = regmirror_server(env=upstream_env(proxy.url))
    url = f"{server.url}/v2/gone/blob/blobs/{digest}"
    proxy.hold_after = 2 * MiB

    async def leave_mid_body() -> None:
        async with aiohttp.ClientSession() as leaving:
            response = await leaving.get(url)
            assert response.status == 200
            await response.content.readexactly(64 * 1024)
            response.close()  # the client goes away mid-body

    for _ in range(3):
        await leave_mid_body()
    proxy.release.set()
    whole = await fetch_hashed(http, url)  # joins the fill, or reads the stored blob
    assert (whole.status, whole.error, whole.digest) == (200, None, str(digest))

    async def fill_done() -> float:
        return sample(await metrics_text(http, server), 'regmirror_fills_total{result="ok"}')

    await eventually(fill_done)

    async def counted() -> float:
        return requests(await metrics_text(http, server), "client_disconnect")

    assert await eventually(counted) == 3
    for _ in range(3):  # from the store (FileResponse, sendfile) as well
        await leave_mid_body()

    async def all_counted() -> bool:
        return requests(await metrics_text(http, server)) == 7  # 6 gone, 1 whole

    await eventually(all_counted)
    text = await metrics_text(http, server)
    assert not [line for line in text.splitlines() if 'status="5' in line]
    logs = server.logs(lines=None)
    assert "Traceback" not in logs
    assert "Error handling request" not in logs
    assert "unhandled error" not in logs
