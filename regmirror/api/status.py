"""``GET /-/status``: what ``regmirror status`` needs that ``/metrics`` does not say.

Version, start time and uptime, the local cache's index (bytes, blob count, budget,
free-space floor, free disk), the fills in flight with their progress, and where this
server pulls from. Read-only and cheap (no tier is asked anything: ``/readyz`` does
that). It tells no more than ``/metrics`` and ``/readyz`` do about the host (no
credentials, no repository names; fills are named by digest only), so it is served
wherever ``/metrics`` is, with the same access.

With ``server.workers`` it describes the host, whichever worker answers: the cache as
the eviction owner's index has it, every worker's fills in flight (each named once, by
the worker fetching it), and a line per worker (pid, uptime, heartbeat, connections,
requests, fills, and what is wrong with it), from the snapshots they publish
(:mod:`regmirror.worker_state`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web

from regmirror import __version__
from regmirror.api.keys import REGISTRY, WATCHDOG, WORKER_STATE
from regmirror.eviction import HIGH_WATERMARK, LOW_WATERMARK
from regmirror.worker_state import fill_entry, worker_problem

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
    state = app[WORKER_STATE]
    fills = [_shown(fill_entry(fill)) for fill in registry.fills.running()]
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
        "fills": fills,
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
    if state.shared:
        snapshots = await state.host()
        owner = next((s for s in snapshots if s["index"] == 0), None)
        if state.index != 0 and owner is not None and "cache" in owner:
            body["cache"].update(owner["cache"])  # the owner's index is the host's
        body["worker"] = state.index
        body["fills"] = _host_fills(snapshots)
        body["connections"] = sum(s["connections"] for s in snapshots)
        body["requests_in_flight"] = sum(s["requests"] for s in snapshots)
        body["workers"] = _workers(snapshots, state.count, app[WATCHDOG].threshold)
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _host_fills(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each blob being filled once: by the worker fetching it (the others tail its
    partial file), or by one that follows it if the fetching one is not listed."""
    fills: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for fill in snapshot["fills"]:
            known = fills.get(fill["digest"])
            if known is None or (known["following"] and not fill["following"]):
                fills[fill["digest"]] = {**fill, "worker": snapshot["index"]}
    return [_shown(fill) for fill in fills.values()]


def _shown(fill: dict[str, Any]) -> dict[str, Any]:
    """Whether a worker follows a fill (tails another's file) is not news to anyone."""
    return {k: v for k, v in fill.items() if k != "following"}


def _workers(snapshots: list[dict[str, Any]], count: int, threshold: float) -> list[dict[str, Any]]:
    now = time.time()
    found = {s["index"]: s for s in snapshots}
    listed = []
    for index in range(count):
        snapshot = found.get(index)
        if snapshot is None:
            listed.append({"index": index, "pid": None, "problem": "not running"})
            continue
        listed.append(
            {
                "index": index,
                "pid": snapshot["pid"],
                "uptime_seconds": round(now - snapshot["started"], 3),
                "heartbeat_age_seconds": round(max(0.0, now - snapshot["written"]), 3),
                "loop_lag_seconds": snapshot["loop_lag"],
                "fds": snapshot["fds"],
                "fd_limit": snapshot["fd_limit"],
                "connections": snapshot["connections"],
                "requests_in_flight": snapshot["requests"],
                "fills": sum(1 for f in snapshot["fills"] if not f["following"]),
                "problem": worker_problem(snapshot, now, threshold),
            }
        )
    return listed


def _mark(budget: int | None, fraction: float) -> int | None:
    return int(budget * fraction) if budget is not None else None
