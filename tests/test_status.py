"""``regmirror status`` and ``GET /-/status`` against a running regmirror with traffic:
the numbers reported are the ones the test caused (hits, misses, a fill held in flight,
evictions, upstream failures), not just the keys."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from regmirror import __version__
from tests.support.processes import REPO_ROOT, ServerProcess, free_port, regmirror_server
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    UpstreamProxy,
    eventually,
    fetch_hashed,
    http,
    proxy,
    upstream_env,
)
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_registry import regmirror_env
from tests.support.upstream import push_blob, upstream_registry

__all__ = ["http", "moto_s3", "proxy", "regmirror_server", "upstream_registry"]

MiB = 1024 * 1024
Start = Callable[..., ServerProcess]


async def status(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m regmirror status ARGS`` (this checkout), not blocking the test's loop."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    environ.update(PYTHONPATH=str(REPO_ROOT), COLUMNS="200", **(env or {}))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "regmirror",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), BOUND)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def status_json(server: ServerProcess) -> dict[str, Any]:
    code, stdout, stderr = await status("--url", server.url, "--json")
    assert code == 0, stderr
    report: dict[str, Any] = json.loads(stdout)
    return report


async def test_status_reports_what_the_traffic_did(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    small = [os.urandom(MiB), os.urandom(MiB)]
    big = os.urandom(8 * MiB)
    digests = [await push_blob(http, upstream_registry.url, "st/app", data) for data in small]
    big_digest = await push_blob(http, upstream_registry.url, "st/app", big)
    env = {**upstream_env(proxy.url), "REGMIRROR_CACHE__MAX_BYTES": str(10 * MiB)}
    server = regmirror_server(env=env)
    blob_url = f"{server.url}/v2/st/app/blobs"

    # Two misses (fills), then two hits.
    for _ in range(2):
        for digest in digests:
            fetched = await fetch_hashed(http, f"{blob_url}/{digest}")
            assert (fetched.status, fetched.digest) == (200, str(digest))

    # A fill held after 1 MiB: in flight, with its progress.
    proxy.hold_after = MiB
    client = asyncio.create_task(fetch_hashed(http, f"{blob_url}/{big_digest}"))
    await asyncio.wait_for(proxy.held.wait(), BOUND)

    async def held_fill() -> dict[str, Any] | None:
        async with http.get(f"{server.url}/-/status") as response:
            fills = (await response.json())["fills"]
        return fills[0] if fills and fills[0]["bytes"] == MiB else None

    held = {"digest": str(big_digest), "bytes": MiB, "size": 8 * MiB}
    workers = range(len(server.serving_pids()))
    fill = await eventually(held_fill)
    assert fill.pop("worker", 0) in workers  # with workers: the one filling it
    assert fill == held
    report = await status_json(server)
    [fill] = report["fills"]["in_flight"]
    assert fill.pop("worker", 0) in workers
    assert fill == held
    assert report["fills"]["started"] == 3 and report["fills"]["ok"] == 2

    proxy.release.set()
    fetched = await client
    assert (fetched.status, fetched.digest) == (200, str(big_digest))

    # 10 MiB stored with a 10 MiB budget: eviction (LRU) takes the two small blobs.
    async def evicted() -> dict[str, Any] | None:
        report = await status_json(server)
        return report if report["evictions"]["blobs"] == 2 else None

    report = await eventually(evicted)
    # And an upstream that is down: counted against it.
    await proxy.stop()
    async with http.get(f"{blob_url}/sha256:{'0' * 64}") as response:
        assert response.status in (502, 503)
    report = await status_json(server)

    assert report["version"] == __version__
    assert report["pid"] in server.serving_pids()  # the worker that answered
    assert 0 < report["uptime_seconds"] < 300
    assert report["data_dir"] == str(server.data_dir.resolve())
    assert report["ready"] is True and report["tiers"] == {"local": "ok"}
    cache = report["cache"]
    assert (cache["bytes"], cache["blobs"], cache["max_bytes"]) == (8 * MiB, 1, 10 * MiB)
    assert cache["min_free_bytes"] == 1024**3
    assert 0 < cache["disk_free_bytes"] <= cache["disk_total_bytes"]
    assert report["requests"]["hits"] == 2 and report["requests"]["misses"] == 3
    assert report["requests"]["hit_ratio"] == 0.4
    assert report["requests"]["bytes_served"] == {"local": 2 * MiB, "fill": 10 * MiB}
    assert report["fills"] == {
        "in_flight": [],
        "started": 3,
        "coalesced": 0,
        "ok": 3,
        "failed": 0,
        "bytes": 10 * MiB,
    }
    assert report["evictions"] == {"blobs": 2, "bytes": 2 * MiB}
    [upstream] = report["upstreams"]
    assert upstream["url"] == proxy.url and upstream["registry"] == proxy.host_port
    assert upstream["errors"] == {"unavailable": 1}
    assert report["s3"]["configured"] is False
    assert report["requests"]["server_errors"] == 1

    code, text, _ = await status("--url", server.url)
    assert code == 0
    lines = [line.rstrip() for line in text.splitlines()]
    assert f"regmirror  {__version__} at {server.url}: ready, up " in lines[0]
    assert "cache      8.0 MiB used of 10.0 MiB budget (80%), 1 blobs" in lines
    assert "hit ratio  40.0% (2 hits, 3 misses)" in lines
    assert "fills      0 in flight; 3 started, 0 joined, 0 failed, 10.0 MiB filled" in lines
    assert f"upstream   {proxy.url}: errors: unavailable 1" in lines
    assert "evictions  2 blobs, 2.0 MiB" in lines


async def test_status_shows_s3_health(
    regmirror_server: Start, moto_s3: MotoS3, http: aiohttp.ClientSession
) -> None:
    bucket = moto_s3.new_bucket("status")
    server = regmirror_server(env=regmirror_env(moto_s3, bucket))

    report = await status_json(server)
    assert report["s3"]["configured"] is True
    assert report["s3"]["state"] == "ok"
    assert report["tiers"] == {"local": "ok", "s3": "ok"}

    moto_s3.stop()  # down: connections refused
    try:
        code, stdout, _ = await status("--url", server.url, "--json")
        report = json.loads(stdout)
        assert code == 1  # not ready
        assert report["ready"] is False
        assert report["s3"]["state"] != "ok" and report["s3"]["state"]
        code, text, _ = await status("--url", server.url)
        assert code == 1 and "NOT READY" in text
    finally:
        moto_s3.start()


async def test_status_of_nothing_listening_is_exit_2() -> None:
    code, _, stderr = await status("--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "regmirror status:" in stderr


async def test_the_status_endpoint_never_shows_credentials(
    regmirror_server: Start, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    env = upstream_env(f"http://urluser:url-secret@127.0.0.1:{port}", password="env-secret")
    server = regmirror_server(env={**env, "REGMIRROR_UPSTREAMS__0__USERNAME": "ci"})

    async with http.get(f"{server.url}/-/status") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        text = await response.text()
        body = await response.json()
    assert "secret" not in text
    assert body["upstreams"] == [
        {
            "url": f"http://127.0.0.1:{port}",
            "prefix": None,
            "ns": None,
            "registry": f"127.0.0.1:{port}",
        }
    ]
