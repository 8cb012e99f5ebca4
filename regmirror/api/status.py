"""``GET /-/status``: what ``regmirror status`` needs that ``/metrics`` does not say.

Version, start time and uptime, the local cache's index (bytes, blob count, budget,
free-space floor, free disk), the fills in flight with their progress, and where this
server pulls from. Read-only and cheap (no tier is asked anything: ``/readyz`` does
that). It tells no more than ``/metrics`` and ``/readyz`` do about the host (no
credentials, no repository names; fills are named by digest only), so it is served
wherever ``/metrics`` is, with the same access.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web

from regmirror import __version__
from regmirror.api.keys import REGISTRY
from regmirror.eviction import HIGH_WATERMARK, LOW_WATERMARK
from regmirror.fill import Fill

PATH = "/-/status"
STARTED = web.AppKey("started", float)  # time.time() when the app was built


def setup(app: web.Application) -> None:
    """Register the endpoint and remember when this server started."""
    app[STARTED] = time.time()
    app.router.add_get(PATH, status)


async def status(request: web.Request) -> web.Response:
    app = request.app
    registry = app[REGISTRY]
    cache = registry.cache
    started = app[STARTED]
    disk = await asyncio.to_thread(os.statvfs, cache.root)
    body: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "started": started,
        "uptime_seconds": round(time.time() - started, 3),
        "data_dir": str(cache.root),
        "cache": {
            "bytes": cache.total,
            "blobs": cache.blob_count,
            "index_loaded": cache.loaded,  # built in the background after start
            "unreferenced_blobs": len(cache.unreferenced()),
            "max_bytes": cache.max_bytes,
            "high_watermark_bytes": _mark(cache.max_bytes, HIGH_WATERMARK),
            "low_watermark_bytes": _mark(cache.max_bytes, LOW_WATERMARK),
            "min_free_bytes": cache.min_free_bytes,
            "disk_free_bytes": disk.f_bavail * disk.f_frsize,
            "disk_total_bytes": disk.f_blocks * disk.f_frsize,
        },
        "fills": [_fill(fill) for fill in registry.fills.running()],
        "upstreams": [
            {
                "url": str(upstream.url.with_user(None)),  # never credentials in a URL
                "prefix": upstream.settings.prefix,
                "ns": upstream.settings.ns,
                "registry": upstream.registry_host,
            }
            for upstream in (registry.router.upstreams if registry.router else [])
        ],
        "s3": registry.shared is not None,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _fill(fill: Fill) -> dict[str, Any]:
    return {"digest": str(fill.digest), "bytes": fill.written, "size": fill.size}


def _mark(budget: int | None, fraction: float) -> int | None:
    return int(budget * fraction) if budget is not None else None
