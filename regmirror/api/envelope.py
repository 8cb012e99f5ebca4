"""The spec's JSON error envelope, in one place, for every error any handler raises."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from regmirror.api.keys import METRICS
from regmirror.errors import RegistryError, RouteUnknown, Unavailable, Unsupported
from regmirror.storage.driver import StorageUnavailable

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    """On every response, including those a handler prepared itself."""
    response.headers.update(API_VERSION)


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to the envelope, stamp the API version, and count the request."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except RegistryError as exc:
        response = error_response(exc)
    except StorageUnavailable as exc:
        log.warning("storage unavailable serving %s %s: %s", request.method, request.path, exc)
        response = error_response(Unavailable(f"storage is unavailable, try again: {exc}"))
    except web.HTTPNotFound:
        response = error_response(RouteUnknown(f"no such endpoint: {request.path[:200]}"))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            Unsupported(
                f"{request.method} is not supported on {request.path[:200]}",
                headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
            )
        )
    except (web.HTTPException, ConnectionError):
        raise  # a client gone mid-body is not an error of ours
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path[:200])
        response = error_response(RegistryError("internal error; see the server log"))
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].observe_request(
        route, request.method, response.status, time.perf_counter() - started
    )
    return response
