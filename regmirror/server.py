"""Serving: the registry port (HTTP, or HTTPS with ``tls``), the ``metrics_listen`` port,
and a drain on SIGTERM.

Both ports are :class:`~regmirror.connections.Listener`\\ s: bounded connections, a
header timeout, a keep-alive timeout (``server.*`` settings). On SIGTERM or SIGINT the
registry port stops accepting connections and its requests in flight get up to
``server.drain_timeout`` seconds in total to finish (a pull streaming a layer, a push
writing through to S3); what is still running then is cut, and the application's
resources are closed. The probe port is closed last, so ``/metrics`` and ``/readyz``
answer while the registry drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from regmirror import log_limits
from regmirror.api.keys import SHUTDOWN
from regmirror.app import create_probe_app
from regmirror.config import ServerSettings
from regmirror.connections import (
    CUT_GRACE,
    Limits,
    Listener,
    connection_bound,
    quiet_accept_errors,
    raise_fd_limit,
)
from regmirror.logs.access import runner_options
from regmirror.tls import ServerTLS

log = logging.getLogger("regmirror")

PROBE_DRAIN = 5.0  # seconds the probe port's own requests get once the registry is done


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def run(
    app: web.Application,
    registry: Listen,
    *,
    tls: ServerTLS | None = None,
    probes: Listen | None = None,
    settings: ServerSettings | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    asyncio.run(
        serve(app, registry, tls=tls, probes=probes, settings=settings, reuse_port=reuse_port)
    )


async def serve(
    app: web.Application,
    registry: Listen,
    *,
    tls: ServerTLS | None = None,
    probes: Listen | None = None,
    settings: ServerSettings | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` on ``registry`` (and its probes on ``probes``) until SIGTERM or
    SIGINT; ``reuse_port``: as one of several worker processes (:mod:`regmirror.workers`)."""
    settings = settings or ServerSettings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    log_limits.install()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A worker starts with them blocked (regmirror.workers): one sent while it started
    # is handled now, and it drains once it listens.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    limits = _limits(settings, ports=2 if probes is not None else 1)
    listeners: list[Listener] = []
    try:
        main = await _runner(app, limits)
        ssl_context = tls.context if tls is not None else None
        listeners.append(
            Listener(
                main,
                registry.host,
                registry.port,
                limits=limits,
                ssl_context=ssl_context,
                reuse_port=reuse_port,
            )
        )
        await listeners[0].start()
        scheme = "https" if tls is not None else "http"
        log.info("serving %s://%s:%d/v2/", scheme, registry.host, registry.port)
        if probes is not None:
            side = await _runner(create_probe_app(app), limits)
            listeners.append(
                Listener(
                    side,
                    probes.host,
                    probes.port,
                    limits=limits,
                    name="probe",
                    reuse_port=reuse_port,
                )
            )
            await listeners[1].start()
            log.info(
                "serving /metrics, /healthz and /readyz on http://%s:%d", probes.host, probes.port
            )
        await stop.wait()
        app[SHUTDOWN].draining = True
        await _drain(listeners, settings.drain_timeout)
    finally:
        for listener in listeners:  # after a failed start; a no-op after the drain
            await listener.close()
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal changes nothing
            loop.remove_signal_handler(signum)


async def _runner(app: web.Application, limits: Limits) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        keepalive_timeout=limits.keepalive_timeout,
        shutdown_timeout=CUT_GRACE,  # the listener's drain does the waiting
        **runner_options(app),  # the access log, on the registry port only
    )
    await runner.setup()
    return runner


def _limits(settings: ServerSettings, *, ports: int) -> Limits:
    fd_limit = raise_fd_limit()
    bound = connection_bound(settings.max_connections, fd_limit, ports)
    if bound < settings.max_connections:
        log.warning(
            "server.max_connections %d lowered to %d per port: the fd limit is %d "
            "(raise LimitNOFILE / ulimit -n)",
            settings.max_connections,
            bound,
            fd_limit,
        )
    return Limits(
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=bound,
        send_timeout=settings.send_timeout,
    )


async def _drain(listeners: list[Listener], timeout: float) -> None:
    """The registry first (the probes answer while it drains), within ``timeout`` s."""
    registry = listeners[0]
    started = time.monotonic()
    log.info(
        "stopping: draining %d request(s) in flight on %d connection(s) (up to %.0f s, "
        "server.drain_timeout)",
        registry.requests,
        registry.connections,
        timeout,
    )
    cut = await registry.drain(timeout)
    for probe in listeners[1:]:
        await probe.drain(PROBE_DRAIN)
    log.info(
        "stopped: drained in %.1f s, %d request(s) cut at server.drain_timeout",
        time.monotonic() - started,
        cut,
    )
