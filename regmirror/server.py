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
import math
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from regmirror import log_limits
from regmirror.api.keys import SHUTDOWN, WORKER_STATE
from regmirror.app import create_probe_app
from regmirror.config import ServerSettings
from regmirror.connections import (
    AIOHTTP_KEEPALIVE,
    CUT_GRACE,
    Limits,
    Listener,
    connection_bound,
    quiet_accept_errors,
    raise_fd_limit,
)
from regmirror.lean.path import FastPath
from regmirror.logs.access import runner_options
from regmirror.tls import ServerTLS
from regmirror.workers import Worker

log = logging.getLogger("regmirror")

PROBE_DRAIN = 5.0  # seconds the probe port's own requests get once the registry is done
# Connections each worker may hold at least, however many workers share
# server.max_connections (unless it is smaller): a worker the kernel hands a burst to
# must not refuse it while the others idle.
MIN_WORKER_CONNECTIONS = 64


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
    worker: Worker | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    asyncio.run(
        serve(
            app,
            registry,
            tls=tls,
            probes=probes,
            settings=settings,
            reuse_port=reuse_port,
            worker=worker,
        )
    )


async def serve(
    app: web.Application,
    registry: Listen,
    *,
    tls: ServerTLS | None = None,
    probes: Listen | None = None,
    settings: ServerSettings | None = None,
    reuse_port: bool = False,
    worker: Worker | None = None,
) -> None:
    """Serve ``app`` on ``registry`` (and its probes on ``probes``) until SIGTERM or
    SIGINT; ``worker``: as one of several worker processes (:mod:`regmirror.workers`),
    with ``SO_REUSEPORT`` (``reuse_port`` alone: that without the rest)."""
    settings = settings or ServerSettings()
    reuse_port = reuse_port or worker is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    log_limits.install(worker.run_dir if worker is not None else None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A worker starts with them blocked (regmirror.workers): one sent while it started
    # is handled now, and it drains once it listens.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    limits = _limits(settings, ports=2 if probes is not None else 1, worker=worker)
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
                fast=FastPath.of(app) if settings.fast_path else None,
            )
        )
        await listeners[0].start()
        app[WORKER_STATE].attach(listeners[0])
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
        app[WORKER_STATE].changed()  # the other workers' /readyz says so at once
        await _drain(listeners, settings.drain_timeout)
    finally:
        for listener in listeners:  # after a failed start; a no-op after the drain
            await listener.close()
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal changes nothing
            loop.remove_signal_handler(signum)


async def _runner(app: web.Application, limits: Limits) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        keepalive_timeout=AIOHTTP_KEEPALIVE,  # the listener closes idle connections
        shutdown_timeout=CUT_GRACE,  # the listener's drain does the waiting
        **runner_options(app),  # the access log, on the registry port only
    )
    await runner.setup()
    return runner


def worker_share(configured: int, count: int) -> int:
    """Each of ``count`` workers' part of ``server.max_connections`` (the host's bound):
    an even share, but at least :data:`MIN_WORKER_CONNECTIONS` (or all of it, if less)."""
    return max(math.ceil(configured / count), min(configured, MIN_WORKER_CONNECTIONS))


def _limits(settings: ServerSettings, *, ports: int, worker: Worker | None = None) -> Limits:
    fd_limit = raise_fd_limit()  # per process: each worker has a limit of its own
    share = settings.max_connections
    if worker is not None:
        share = worker_share(settings.max_connections, worker.count)
        log.info(
            "worker %d: up to %d connections per port (server.max_connections %d for the "
            "host, over %d workers)",
            worker.index,
            share,
            settings.max_connections,
            worker.count,
        )
    bound = connection_bound(share, fd_limit, ports)
    if bound < share:
        log.warning(
            "server.max_connections %d lowered to %d per port%s: the fd limit is %d "
            "(raise LimitNOFILE / ulimit -n)",
            settings.max_connections,
            bound,
            " in each worker" if worker is not None else "",
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
