"""The version check and the operational endpoints."""

from __future__ import annotations

from aiohttp import web

from regmirror.api.keys import METRICS, REGISTRY
from regmirror.storage.driver import StorageUnavailable


async def version_check(request: web.Request) -> web.Response:
    return web.json_response({})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every store answers; upstreams are not asked (their outage is served
    stale, and must not take every host out of its load balancer at once)."""
    registry = request.app[REGISTRY]
    tiers: dict[str, str] = {}
    for driver in filter(None, (registry.local, registry.shared)):
        try:
            await driver.check()
            tiers[driver.name] = "ok"
        except StorageUnavailable as exc:
            tiers[driver.name] = str(exc)
    ready = all(state == "ok" for state in tiers.values())
    body = {"status": "ready" if ready else "unavailable", "tiers": tiers}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
