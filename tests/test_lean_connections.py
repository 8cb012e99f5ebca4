"""The listener's per-connection timers move a deadline per request instead of arming
and cancelling an asyncio timer (regmirror.connections._Connection): a busy keep-alive
connection must never be cut by a deadline an earlier request left behind, and a stall
after many quick requests must still be cut on time. Real server processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.test_connections import COMPLETE, PARTIAL, _closed_after, _response

Start = Callable[..., ServerProcess]


async def test_requests_for_longer_than_header_timeout_keep_one_connection_open(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"header_timeout": 1.0}})
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 3.0:  # three header timeouts' worth
            writer.write(COMPLETE)
            assert b" 200 " in await _response(reader)
            answered += 1
            await asyncio.sleep(0.2)
        assert answered >= 10
        # Then a stall in the headers of the next one: cut one header_timeout later.
        writer.write(PARTIAL)
        elapsed = await _closed_after(reader, 10.0)
    finally:
        writer.close()
    assert 0.7 <= elapsed < 2.9
