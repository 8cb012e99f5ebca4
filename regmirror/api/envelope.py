"""The spec's JSON error envelope, in one place, for every error any handler raises.

Once a response has been prepared (its status line is on the wire) no error can become
another response: aiohttp would write a second status line into the body. An error
raised after that cuts the connection instead, so the client sees a short body, never
a clean end. A client that went away is not a server error: it is counted with status
``client_disconnect`` and logged without a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web

from regmirror.api.keys import METRICS
from regmirror.errors import RegistryError, RouteUnknown, Unavailable, Unsupported
from regmirror.storage.driver import StorageUnavailable

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The response a handler prepared (set by on_response_prepare), if any.
PREPARED = web.RequestKey("prepared", web.StreamResponse)
# How a handler that returned a prepared response ended it, when not cleanly: it cut a
# body it had started ("aborted"), or the client had gone ("client_disconnect").
ENDED = web.RequestKey("ended", str)
Ending = Literal["aborted", "client_disconnect"]


def cut(request: web.Request, why: Ending) -> None:
    """End the response by closing the connection: the client sees the body is short."""
    request[ENDED] = why
    if request.transport is not None:
        request.transport.close()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def error_response(error: RegistryError) -> web.Response:
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    return web.Response(
        status=error.status,
        body=json.dumps({"errors": [entry]}).encode(),
        content_type="application/json",
        headers=error.headers,
    )


async def stamp_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, including those a handler prepared itself; and remember that
    the request's response has started."""
    response.headers.update(API_VERSION)
    request[PREPARED] = response


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to the envelope, stamp the API version, and count the request."""
    started = time.perf_counter()
    status: int | str
    try:
        response = await handler(request)
        status = request.get(ENDED) or response.status
    except Exception as exc:  # noqa: BLE001 -- every error ends here, one way or another
        prepared = request.get(PREPARED)
        if _disconnect(request, exc):
            log.debug("client went away: %s %s: %r", request.method, request.path[:200], exc)
            cut(request, "client_disconnect")
            response, status = prepared or web.Response(status=499), "client_disconnect"
        elif prepared is not None:
            response, status = prepared, _cut_after_start(request, exc)
        else:
            response = _error_response(request, exc)
            status = response.status
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].observe_request(
        route, request.method, status, time.perf_counter() - started
    )
    return response


def _disconnect(request: web.Request, exc: Exception) -> bool:
    """Whether ``exc`` says the client went away (the peer closed the connection)."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        # Sending the body, os.sendfile finds out before the transport does.
        return PREPARED in request or client_gone(request)
    # asyncio's sendfile and writes raise RuntimeError("Transport is closing").
    return isinstance(exc, (ConnectionError, RuntimeError)) and client_gone(request)


def _cut_after_start(request: web.Request, exc: Exception) -> int | str:
    """An error after the response started: cut the connection; the status to count."""
    where = f"{request.method} {request.path[:200]}"
    if isinstance(exc, (RegistryError, StorageUnavailable, web.HTTPException)):
        log.warning("%s: body cut after it started: %s", where, exc)
        cut(request, "aborted")
        return "aborted"
    log.error("unhandled error serving %s after its response started", where, exc_info=exc)
    cut(request, "aborted")
    return 500  # a bug is a server error, whenever it happens


def _error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The envelope for an error raised before any response started."""
    if isinstance(exc, RegistryError):
        return error_response(exc)
    if isinstance(exc, StorageUnavailable):
        log.warning("storage unavailable serving %s %s: %s", request.method, request.path, exc)
        return error_response(Unavailable(f"storage is unavailable, try again: {exc}"))
    if isinstance(exc, web.HTTPNotFound):
        return error_response(RouteUnknown(f"no such endpoint: {request.path[:200]}"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(
            Unsupported(
                f"{request.method} is not supported on {request.path[:200]}",
                headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
            )
        )
    if isinstance(exc, web.HTTPException):
        raise exc  # aiohttp's own answers (redirects and the like)
    log.error("unhandled error serving %s %s", request.method, request.path[:200], exc_info=exc)
    return error_response(RegistryError("internal error; see the server log"))
