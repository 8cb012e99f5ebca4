"""``create_app(settings)``: builds the aiohttp application and owns its resources."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from regmirror.api.envelope import envelope
from regmirror.api.keys import METRICS, REGISTRY, UPLOADS
from regmirror.api.routes import add_routes
from regmirror.config import Settings
from regmirror.metrics import Metrics
from regmirror.registry import Registry
from regmirror.storage.filesystem import TEMP_PREFIX, FilesystemDriver
from regmirror.uploads import Uploads

log = logging.getLogger(__name__)

# A temp file this old belongs to no live writer: a crash left it.
STALE_TEMP_SECONDS = 3600.0


def create_app(settings: Settings) -> web.Application:
    data_dir = Path(settings.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = web.Application(middlewares=[envelope])
    app[REGISTRY] = Registry(local=FilesystemDriver(data_dir))
    app[UPLOADS] = Uploads(data_dir / "uploads", ttl=settings.uploads.ttl)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_sweep_temp_files(data_dir))
    app.cleanup_ctx.append(_expire_uploads)
    add_routes(app)
    return app


def _sweep_temp_files(data_dir: Path):  # type: ignore[no-untyped-def]
    async def sweep(app: web.Application) -> AsyncIterator[None]:
        removed = await asyncio.to_thread(remove_stale_temp_files, data_dir, STALE_TEMP_SECONDS)
        if removed:
            log.info("removed %d temp files left by an earlier crash", removed)
        yield

    return sweep


def remove_stale_temp_files(root: Path, older_than: float) -> int:
    cutoff = time.time() - older_than
    removed = 0
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            try:
                if name.startswith(TEMP_PREFIX) and os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


async def _expire_uploads(app: web.Application) -> AsyncIterator[None]:
    uploads = app[UPLOADS]
    task = asyncio.create_task(uploads.expire_forever(min(uploads.ttl / 4, 3600.0)))
    yield
    task.cancel()
