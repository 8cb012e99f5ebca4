"""moto behind a small HTTP proxy on 127.0.0.1 that a test makes misbehave.

A test writes one handler: it passes the request on with :func:`forward` (moto has then
done what it asked, whatever the client hears after), does what it is there for
(waits, records, drops the answer), and answers with :func:`answer`. :func:`front`
makes it an application for :func:`tests.support.upstream.serve`, whose URL is then the
S3 endpoint a driver or a ``regmirror serve`` is given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tests.support.s3 import MotoS3

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HOP = ("transfer-encoding", "connection", "content-length")


@dataclass(frozen=True)
class Forwarded:
    """moto's answer to a forwarded request, read whole."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    content_length: int | None


async def forward(
    session: aiohttp.ClientSession,
    moto: MotoS3,
    request: web.Request,
    *,
    dropped: Iterable[str] = (),
) -> Forwarded:
    """``request`` sent on to ``moto`` (without the headers named in ``dropped``)."""
    leave = {"host", *(name.lower() for name in dropped)}
    async with session.request(
        request.method,
        f"{moto.endpoint_url}{request.path_qs}",
        headers={k: v for k, v in request.headers.items() if k.lower() not in leave},
        data=await request.read(),
        allow_redirects=False,
    ) as response:
        body = await response.read()
        return Forwarded(response.status, response.headers.copy(), body, response.content_length)


async def answer(
    request: web.Request, forwarded: Forwarded, *, cut_after: int | None = None
) -> web.StreamResponse:
    """``forwarded`` sent to the client; ``cut_after``: the connection is closed after that
    many bytes of a GET's body (a broken stream from S3)."""
    response = web.StreamResponse(
        status=forwarded.status,
        headers={k: v for k, v in forwarded.headers.items() if k.lower() not in HOP},
    )
    if request.method == "HEAD":
        if forwarded.content_length is not None:
            response.headers["Content-Length"] = str(forwarded.content_length)
        await response.prepare(request)
        return response
    response.content_length = len(forwarded.body)
    await response.prepare(request)
    if cut_after is not None and request.method == "GET" and forwarded.body:
        await response.write(forwarded.body[:cut_after])
        assert request.transport is not None
        request.transport.close()  # mid-body
        return response
    await response.write(forwarded.body)
    await response.write_eof()
    return response


def drop_answer(request: web.Request) -> NoReturn:
    """Cut the client's connection with no answer: what moto did stands, the client
    never hears of it (and an SDK sends the request again)."""
    assert request.transport is not None
    request.transport.abort()
    raise ConnectionResetError("the answer is dropped")


def front(handler: Handler) -> web.Application:
    """An application that hands every request to ``handler``."""
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{path:.*}", handler)
    return app
