"""``server.workers``: the rate limit on logged protocol errors (10 lines per 10 s) is
the host's, not each worker's (:class:`regmirror.log_limits.SharedRateLimit`).

A real ``regmirror serve`` with two workers, flooded with malformed requests on
connections of their own (so the kernel spreads them over both workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from regmirror import log_limits
from regmirror.log_limits import SharedRateLimit
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    ServerProcess,
    regmirror_server,
)
from tests.test_workers_flight import both_listening

Start = Callable[..., ServerProcess]
ROUNDS = 6
CONCURRENT = 25
COMPLETE = b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n"
GARBAGE = b"\x01ZQXJ" * 1000  # not a request: a protocol error
LINE = " aiohttp.server: "  # every record of that logger shares the budget
SUPPRESSED = re.compile(r"\((\d+) similar lines suppressed\)")


async def send_garbage(port: int) -> None:
    """A request, then garbage on the kept-alive connection (what aiohttp logs as an
    error), on a connection of its own; until the server closes it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(COMPLETE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?i)content-length: (\d+)", head)
        assert length, head
        await asyncio.wait_for(reader.readexactly(int(length[1])), 10)
        writer.write(GARBAGE)
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def logged(server: ServerProcess, before: int) -> list[str]:
    return [line for line in server.logs(None)[before:].splitlines() if LINE in line]


async def test_two_workers_log_protocol_errors_within_one_budget(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"workers": 2}})
    await both_listening(server)
    before = len(server.logs(None))
    started = time.monotonic()
    for _ in range(ROUNDS):
        await asyncio.gather(*(send_garbage(server.port) for _ in range(CONCURRENT)))
    ended = time.monotonic()
    elapsed = ended - started
    sent = ROUNDS * CONCURRENT
    await asyncio.sleep(0.5)  # the last lines are written
    lines = logged(server, before)
    # 10 lines per 10 s for the host: one window, or one more per 10 s the flood took.
    windows = int(elapsed // 10) + 1
    assert 0 < len(lines) <= 10 * windows, (elapsed, lines)
    assert all("malformed HTTP request from 127.0.0.1" in line for line in lines), lines

    # Once the last window has passed (it began before the flood ended), the next line
    # counts what both workers suppressed since the last line.
    await asyncio.sleep(max(0.0, ended + 10.5 - time.monotonic()))
    await send_garbage(server.port)
    for _ in range(50):
        lines = logged(server, before)
        if len(lines) > 10 * windows or SUPPRESSED.search(lines[-1]):
            break
        await asyncio.sleep(0.1)
    counted = len(lines) + sum(int(n) for line in lines for n in SUPPRESSED.findall(line))
    assert counted == sent + 1, lines


# -- the shared budget itself, two mappings standing for two processes --------------------


def test_the_budget_is_shared_and_counts_what_every_process_suppressed(tmp_path: Path) -> None:
    a = SharedRateLimit(tmp_path / log_limits.SHARED_FILE, burst=3, period=0.5)
    b = SharedRateLimit(tmp_path / log_limits.SHARED_FILE, burst=3, period=0.5)
    try:
        assert [a.admit(), b.admit(), a.admit()] == [0, 0, 0]
        assert [b.admit(), a.admit(), b.admit()] == [None, None, None]
        time.sleep(0.6)
        assert b.admit() == 3  # refused in both
        assert a.admit() == 0
    finally:
        a.close()
        b.close()


def test_threads_of_one_process_share_the_budget_exactly(tmp_path: Path) -> None:
    limit = SharedRateLimit(tmp_path / log_limits.SHARED_FILE, burst=10, period=60.0)
    results: list[int | None] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(200):
            verdict = limit.admit()
            with lock:
                results.append(verdict)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    limit.close()
    assert len(results) == 800
    assert sum(r is not None for r in results) == 10
