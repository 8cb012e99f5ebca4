"""The version check and the operational endpoints."""

from __future__ import annotations

from aiohttp import web

from regmirror import health
from regmirror.api.keys import METRICS, REGISTRY, SHUTDOWN, WATCHDOG, WORKER_STATE
from regmirror.storage.driver import StorageUnavailable


async def version_check(request: web.Request) -> web.Response:
    return web.json_response({})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every store answers and this process can take clients: room on the
    data directory's disk (or something to evict), file descriptors to spare, an event
    loop that is not stalled, not shutting down. Upstreams are not asked (their outage is served stale, and
    must not take every host out of its load balancer at once). With ``server.workers``,
    every worker must be able to (``workers``: which one is not, and why), and the disk
    is judged by the eviction owner's index, the host's."""
    registry = request.app[REGISTRY]
    tiers: dict[str, str] = {}
    for driver in filter(None, (registry.local, registry.shared)):
        try:
            await driver.check()
            tiers[driver.name] = "ok"
        except StorageUnavailable as exc:
            tiers[driver.name] = str(exc)
    state = request.app[WORKER_STATE]
    checks = {
        "disk": await health.disk_problem(registry.cache),
        "fds": health.fd_problem(),
        "event_loop": request.app[WATCHDOG].problem(),
        "shutdown": request.app[SHUTDOWN].problem(),
    }
    if state.shared:
        checks["disk"] = state.owner_disk_problem(checks["disk"])
        checks["workers"] = state.problems(request.app[WATCHDOG].threshold)
    ready = all(state == "ok" for state in tiers.values()) and not any(checks.values())
    body = {
        "status": "ready" if ready else "unavailable",
        "tiers": tiers,
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
