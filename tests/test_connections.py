"""The registry port's bounds on clients (issue 9): a header timeout, a keep-alive
timeout, a bound on connections that keeps a fresh client served under a slow-header
flood at a low fd limit, and logs a client cannot inflate. Real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable

import aiohttp

from regmirror.connections import connection_bound
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    ServerProcess,
    regmirror_server,
    which_or_skip,
)
from tests.support.upstream import CountingProxy, push_image, serve, upstream_registry

__all__ = ["upstream_registry"]

Start = Callable[..., ServerProcess]
PARTIAL = b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nUser-Agent: slow"
COMPLETE = b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n"


async def _closed_after(reader: asyncio.StreamReader, bound: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), within ``bound``."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), bound):
            pass
    return time.monotonic() - started


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"])), 10)
    return head


async def test_a_client_that_never_completes_its_headers_is_closed_after_header_timeout(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"header_timeout": 1.5}})
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(PARTIAL)
    elapsed = await _closed_after(reader, 10.0)  # before: held 75 s
    writer.close()
    assert 1.2 <= elapsed < 5.0


async def test_an_idle_keepalive_connection_waits_for_keepalive_timeout_not_header_timeout(
    regmirror_server: Start,  # noqa: F811
) -> None:
    config = {"server": {"header_timeout": 1.0, "keepalive_timeout": 3.0}}
    server = regmirror_server(config=config)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(COMPLETE)
    assert b" 200 " in await _response(reader)
    await asyncio.sleep(1.5)  # idle past header_timeout: still open
    writer.write(COMPLETE)
    assert b" 200 " in await _response(reader)
    elapsed = await _closed_after(reader, 10.0)  # idle: closed after keepalive_timeout
    writer.close()
    assert 2.5 <= elapsed < 6.0
    # The first byte of a next request starts the header clock.
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(COMPLETE)
    await _response(reader)
    writer.write(PARTIAL)
    elapsed = await _closed_after(reader, 10.0)
    writer.close()
    assert 0.7 <= elapsed < 2.9


async def test_a_fresh_client_is_served_while_1100_slow_header_clients_are_connected(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """Under a 1024-fd limit, 1,100 clients that never finish their headers used to lock
    a fresh client out and fill the log with "accept() out of system resource"."""
    prlimit = which_or_skip("prlimit", "util-linux")
    server = regmirror_server(
        config={
            "server": {
                "max_connections": 800,
                "header_timeout": 120,
            }
        },
        command_prefix=[prlimit, "--nofile=1024:1024", "--"],
    )
    slow: list[asyncio.StreamWriter] = []

    async def open_slow() -> None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, server.port), 10)
            writer.write(PARTIAL)
            slow.append(writer)

    try:
        for _ in range(11):
            await asyncio.gather(*(open_slow() for _ in range(100)))
        assert len(slow) >= 1000  # they got in (the oldest then made room)
        await asyncio.sleep(0.5)
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{server.url}/v2/") as response,
        ):
            assert response.status == 200
    finally:
        for writer in slow:
            writer.close()
    logs = server.logs(None)
    assert "out of system resource" not in logs
    assert "Traceback" not in logs
    limit_lines = [line for line in logs.splitlines() if "server.max_connections 800" in line]
    # One line per 10 s and worker, not one per client.
    assert 1 <= len(limit_lines) <= 3 * len(server.serving_pids())


async def test_garbage_after_a_request_is_logged_in_a_few_short_lines(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """200 × 64 KiB of garbage after a complete request on keep-alive made 12.6 MiB of
    ERROR tracebacks quoting the garbage."""
    server = regmirror_server()
    before = len(server.logs(None))
    garbage = b"\x01ZQXJ" * (64 * 1024 // 5)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(COMPLETE)
        await _response(reader)
        writer.write(garbage)  # on the kept-alive connection
        with contextlib.suppress(ConnectionError):
            await _closed_after(reader, 10.0)
        writer.close()

    started = time.monotonic()
    for _ in range(10):
        await asyncio.gather(*(one() for _ in range(20)))
    windows = int((time.monotonic() - started) // 10) + 1  # of the rate limit's 10 s
    logs = server.logs(None)[before:]
    assert "ZQXJ" not in logs  # no request bytes echoed
    # The access log has its one short line per request, garbage or not; the rest is bounded.
    lines = logs.splitlines()
    assert sum(" regmirror.access: " in line for line in lines) <= 400 + 1  # + readiness poll
    assert len("\n".join(line for line in lines if " regmirror.access: " not in line)) < 16 * 1024
    assert "malformed HTTP request from 127.0.0.1" in logs
    # The rate limit is the host's, whatever the number of workers: 10 lines per 10 s.
    assert logs.count("malformed HTTP request") <= 10 * windows


async def test_readyz_fails_after_the_event_loop_stalls_then_recovers(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"max_loop_lag": 1.0}})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(f"{server.url}/readyz") as response:
            assert response.status == 200
        stalled = server.serving_pids()  # every worker: whichever the probe reaches
        for pid in stalled:
            os.kill(pid, signal.SIGSTOP)  # the whole process stalls, loop too
        try:
            probe = asyncio.create_task(session.get(f"{server.url}/readyz"))
            await asyncio.sleep(2.5)
        finally:
            for pid in stalled:
                os.kill(pid, signal.SIGCONT)
        async with await probe as response:
            body = await response.json()
            assert response.status == 503, body
            assert "stalled" in body["checks"]["event_loop"]
            assert set(body["tiers"].values()) == {"ok"}
        await asyncio.sleep(1.5)  # the watchdog measured a normal wake-up since
        async with session.get(f"{server.url}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"]["event_loop"] == "ok"
        async with session.get(f"{server.url}/healthz") as response:
            assert response.status == 200


async def test_readyz_fails_when_file_descriptors_are_nearly_exhausted(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """Every worker held to 200 descriptors (after startup: its connection bound is
    sized to the limit it starts with), idle connections until one is past 90 % of
    them: /readyz says so, whichever worker answers (its own count, or the other's
    from its published state); ready again once they close."""
    prlimit = which_or_skip("prlimit", "util-linux")
    server = regmirror_server()
    url = f"{server.url}/readyz"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as response:
            assert response.status == 200
        serving = server.serving_pids()
        for pid in serving:
            proc = await asyncio.create_subprocess_exec(prlimit, f"--pid={pid}", "--nofile=200:200")
            assert await proc.wait() == 0
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            while max(len(os.listdir(f"/proc/{pid}/fd")) for pid in serving) <= 185:
                assert len(idle) < 200 * len(serving), len(idle)
                idle += [await asyncio.open_connection(HOST, server.port) for _ in range(5)]
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 2.0  # a worker publishes its count every 0.5 s
            while True:
                async with session.get(url) as response:
                    body = await response.json()
                checks = body["checks"]
                if response.status == 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert response.status == 503, body
            assert "file descriptors" in checks["fds"] + checks.get("workers", ""), body
        finally:
            for _, writer in idle:
                writer.close()
        for _ in range(40):  # every worker has published its count since
            await asyncio.sleep(0.1)
            async with session.get(url) as response:
                if response.status == 200:
                    break
        assert response.status == 200, await response.json()


def test_the_connection_bound_leaves_an_eighth_of_the_fd_limit() -> None:
    assert connection_bound(2048, 1_048_576) == 2048
    assert connection_bound(2048, 1024) == 1024 - 128
    assert connection_bound(2048, 1024, ports=2) == (1024 - 128) // 2
    assert connection_bound(800, 1024) == 800
    assert connection_bound(2048, 100) == 100 - 64


async def test_at_the_bound_with_every_connection_busy_a_new_one_is_refused(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        image = await push_image(
            session, upstream_registry.url, "team/busy", layer=b"\x05" * (2 * 1024 * 1024)
        )
        proxy = CountingProxy(upstream_registry.url, session)
        async with serve(proxy.app()) as upstream_url:
            server = regmirror_server(
                config={
                    "upstreams": [{"url": upstream_url}],
                    # workers: 1 because the bound under test is one listener's: a
                    # worker's share of max_connections is at least min(max_connections,
                    # 64), so 2 workers would hold 2 connections each (server.worker_share).
                    "server": {"max_connections": 2, "workers": 1},
                }
            )
            proxy.hold_after = 1024 * 1024
            blob = f"{server.url}/v2/team/busy/blobs/{image.layer_digest}"
            pulls = []
            for _ in range(2):  # two connections, each with a pull in progress
                fresh = aiohttp.ClientSession()
                pulls.append((fresh, asyncio.create_task(_read(fresh, blob))))
            try:
                await asyncio.wait_for(proxy.held.wait(), 30)
                await asyncio.sleep(0.3)
                reader, writer = await asyncio.open_connection(HOST, server.port)
                writer.write(COMPLETE)
                assert await _closed_after(reader, 5.0) < 2.0  # refused: nothing to displace
                writer.close()
            finally:
                proxy.release.set()
            for fresh, pull in pulls:  # the pulls in progress were not touched
                assert await asyncio.wait_for(pull, 30) == image.layer
                await fresh.close()
    assert "refused 1 new ones so far" in server.logs()


async def _read(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.read()
