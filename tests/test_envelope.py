"""The error middleware once a response has started: no second response, the
connection is cut; a client that goes away is counted, not logged as an error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from regmirror.api.envelope import envelope, stamp_api_version
from regmirror.api.keys import METRICS
from regmirror.errors import FillFailed
from regmirror.metrics import Metrics
from tests.support.processes import HOST
from tests.support.upstream import serve

IDLE = 2.0  # seconds of silence after which a connection left open is reported


async def _fails_mid_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1000
    await response.prepare(request)
    await response.write(b"x" * 10)
    kind = request.query["raise"]
    if kind == "bug":
        raise ValueError("a bug after the headers went out")
    raise FillFailed("the fill failed after the headers went out")


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[web.Application, str]]:
    app = web.Application(middlewares=[envelope])
    app[METRICS] = Metrics()
    app.on_response_prepare.append(stamp_api_version)
    app.router.add_get("/v2/fails", _fails_mid_body)
    async with serve(app) as url:
        yield app, url


async def raw_get(url: str, path: str) -> tuple[bytes, bool]:
    """What the server sends for one GET, and whether it then closed the connection
    (False: it went quiet for IDLE seconds with the connection still open)."""
    port = int(url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = b""
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), IDLE)
            except TimeoutError:
                return raw, False
            if not chunk:
                return raw, True
            raw += chunk
    finally:
        writer.close()


def count(app: web.Application, status: str) -> float:
    value = app[METRICS].registry.get_sample_value(
        "regmirror_http_requests_total",
        {"route": "/v2/fails", "method": "GET", "status": status},
    )
    return value or 0.0


@pytest.mark.parametrize(("kind", "counted"), [("fill", "aborted"), ("bug", "500")])
async def test_an_error_after_the_response_started_cuts_the_body_and_writes_nothing_else(
    app_url: tuple[web.Application, str], kind: str, counted: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, url = app_url
    caplog.set_level(logging.WARNING)
    raw, closed = await raw_get(url, f"/v2/fails?raise={kind}")

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert raw.count(b"HTTP/1.1 ") == 1, raw  # no second status line in the body
    assert body == b"x" * 10  # short of its Content-Length...
    assert closed  # ...and the connection closed: the client sees the cut
    assert count(app, counted) == 1
    assert not any("Error handling request" in r.getMessage() for r in caplog.records)
