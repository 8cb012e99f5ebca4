"""The version check and the operational endpoints."""

from __future__ import annotations

from aiohttp import web

from regmirror.api.keys import METRICS


async def version_check(request: web.Request) -> web.Response:
    return web.json_response({})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
