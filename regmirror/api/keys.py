"""Typed application keys shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from regmirror.auth.clients import Network
from regmirror.fleet.coordinator import Fleet
from regmirror.health import LoopWatchdog, Shutdown
from regmirror.metrics import Metrics
from regmirror.registry import Registry
from regmirror.upload_pace import BodyPace
from regmirror.uploads import Uploads

REGISTRY = web.AppKey("registry", Registry)
UPLOADS = web.AppKey("uploads", Uploads)
METRICS = web.AppKey("metrics", Metrics)
FLEET = web.AppKey("fleet", Fleet)  # set only in fleet mode
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
SHUTDOWN = web.AppKey("shutdown", Shutdown)
# auth.trusted_proxies: whose X-Forwarded-For names the client (session caps per client).
TRUSTED_PROXIES = web.AppKey[tuple[Network, ...]]("trusted_proxies")
# uploads.idle_timeout and min_rate: how fast a request body must arrive.
UPLOAD_PACE = web.AppKey("upload_pace", BodyPace)
# server.accel_redirect, when set: the nginx location stored blobs are redirected to.
ACCEL_REDIRECT = web.AppKey("accel_redirect", str)
