"""Serving: the registry port (HTTP, or HTTPS with ``tls``), the ``metrics_listen`` port,
and a drain on SIGTERM.

On SIGTERM or SIGINT both ports stop accepting connections, requests in flight on the
registry port get up to ``drain_timeout`` seconds to finish (a pull streaming a layer, a
push writing through to S3), then the application's resources are closed. The probe
port is closed last, so ``/metrics`` and ``/readyz`` answer while the registry drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web

from regmirror.app import create_probe_app
from regmirror.tls import ServerTLS

log = logging.getLogger("regmirror")

DRAIN_TIMEOUT = 30.0  # the systemd unit's TimeoutStopSec leaves room for it


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def run(
    app: web.Application,
    registry: Listen | socket.socket,
    *,
    tls: ServerTLS | None = None,
    probes: Listen | socket.socket | None = None,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    asyncio.run(serve(app, registry, tls=tls, probes=probes, drain_timeout=drain_timeout))


async def serve(
    app: web.Application,
    registry: Listen | socket.socket,
    *,
    tls: ServerTLS | None = None,
    probes: Listen | socket.socket | None = None,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> None:
    """Serve ``app`` on ``registry`` (and its probes on ``probes``) until SIGTERM or
    SIGINT; either an address, or a socket already listening (:mod:`regmirror.workers`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    try:
        main = web.AppRunner(app, access_log=None, shutdown_timeout=drain_timeout)
        await main.setup()
        runners.append(main)
        ssl_context = tls.context if tls is not None else None
        await _site(main, registry, ssl_context).start()
        if isinstance(registry, Listen):
            scheme = "https" if tls is not None else "http"
            log.info("serving %s://%s:%d/v2/", scheme, registry.host, registry.port)
        if probes is not None:
            side = web.AppRunner(create_probe_app(app), access_log=None, shutdown_timeout=5.0)
            await side.setup()
            runners.append(side)
            await _site(side, probes, None).start()
            if isinstance(probes, Listen):
                log.info(
                    "serving /metrics, /healthz and /readyz on http://%s:%d",
                    probes.host,
                    probes.port,
                )
        await stop.wait()
        log.info("stopping: draining requests in flight (up to %.0f s)", drain_timeout)
    finally:
        for runner in runners:  # the registry first: the probes answer while it drains
            await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal changes nothing
            loop.remove_signal_handler(signum)


def _site(
    runner: web.AppRunner, where: Listen | socket.socket, ssl_context: ssl.SSLContext | None
) -> web.BaseSite:
    if isinstance(where, socket.socket):
        return web.SockSite(runner, where, ssl_context=ssl_context)
    return web.TCPSite(runner, where.host, where.port, ssl_context=ssl_context)
