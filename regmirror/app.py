"""``create_app(settings)``: builds the aiohttp application and owns its resources."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from regmirror import datalock, workers
from regmirror.api import fleet as fleet_api
from regmirror.api.envelope import envelope, stamp_api_version
from regmirror.api.keys import (
    ACCEL_REDIRECT,
    FLEET,
    METRICS,
    REGISTRY,
    SHUTDOWN,
    TRUSTED_PROXIES,
    UPLOAD_PACE,
    UPLOADS,
    WATCHDOG,
    WORKER_STATE,
)
from regmirror.api.routes import add_probe_routes, add_routes
from regmirror.auth import middleware as auth
from regmirror.auth.clients import networks
from regmirror.config import ConfigError, Settings
from regmirror.eviction import BlobCache
from regmirror.eviction_link import OwnerLink, OwnerMailbox
from regmirror.fill import Fills
from regmirror.fill_relay import FillRelay
from regmirror.fleet.coordinator import Fleet
from regmirror.health import LoopWatchdog, Shutdown
from regmirror.logs import access as access_log
from regmirror.memory import HeapTrimmer
from regmirror.metrics import Metrics
from regmirror.registry import Registry
from regmirror.storage import circuit, counted
from regmirror.storage.circuit import HostCircuit
from regmirror.storage.counted import CountedDriver
from regmirror.storage.filesystem import TEMP_PREFIX, FilesystemDriver
from regmirror.upload_caps import SessionCaps
from regmirror.upload_pace import BodyPace
from regmirror.uploads import Uploads
from regmirror.upstream import UpstreamRouter
from regmirror.worker_state import WorkerState

log = logging.getLogger(__name__)

# A temp file this old belongs to no live writer: a crash left it.
STALE_TEMP_SECONDS = 3600.0
# What aiohttp buffers of a request body before it stops reading the socket (it pauses
# at twice this): an upload holds about this much in memory, whatever the blob's size.
READ_BUFSIZE = 64 * 1024

Context = Callable[[web.Application], AsyncIterator[None]]


def create_app(
    settings: Settings, *, worker: int | None = None, host: workers.Worker | None = None
) -> web.Application:
    """The application; ``worker``: its index among several serving processes
    (:mod:`regmirror.workers`; worker 0 owns eviction), None when it serves alone;
    ``host``: who it is among them (the run directory they share their state in)."""
    if host is not None:
        worker = host.index
    metrics = Metrics()
    owner = worker is None or worker == 0
    link = OwnerLink(host.run_dir) if host is not None and not owner else None
    access = auth.build(settings.auth, on_failure=metrics.auth_failure)
    data_dir = Path(settings.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    trusted_proxies = networks(settings.auth.trusted_proxies, "auth.trusted_proxies")
    logged = access_log.middlewares(settings.log.access, trusted_proxies)
    # The access log's first: it sees every request, refused or failed ones too.
    app = web.Application(
        middlewares=[*logged, envelope, *([access.middleware] if access else [])],
        handler_args={"read_bufsize": READ_BUFSIZE},
    )
    app[access_log.ENABLED] = settings.log.access
    if access is not None:
        app[auth.ACCESS_POLICY] = access
    app[METRICS] = metrics
    local = FilesystemDriver(data_dir)
    shared = None
    fleet = None
    check_fleet(settings)
    if settings.s3.bucket:
        # Imported only when used: boto3 is a tenth of a second of every start.
        from regmirror.storage.s3 import S3Driver

        s3 = S3Driver(settings.s3, on_clock_skew=metrics.s3_clock_skew)
        shared = CountedDriver(s3, on_error=metrics.s3_error, circuit=_s3_circuit(host))
        if settings.fleet.advertise_url:
            fleet = app[FLEET] = Fleet(
                s3, settings.fleet, metrics, run_dir=host.run_dir if host is not None else None
            )
    cache = BlobCache(
        data_dir,
        max_bytes=settings.cache.max_bytes,
        min_free_bytes=settings.cache.min_free_bytes,
        shared=shared,
        observer=metrics if owner else None,
        unreferenced_grace=settings.cache.unreferenced_grace,
        evicts=owner,
        reindex=workers.REINDEX_SECONDS if worker == 0 else None,
        link=link,
    )
    metrics.cache_max.set(settings.cache.max_bytes or 0)
    fills = Fills(
        local,
        timeout=settings.cache.fill_timeout,
        idle_timeout=settings.cache.fill_idle_timeout,
        observer=metrics,
        # A fill's blob is evictable: the tier it came from (S3, an upstream) still has it.
        on_stored=lambda digest, size: cache.added(digest, size, evictable=True),
        cache=cache,  # admits fills into the budget, frees space on ENOSPC
        # A fill streamed through (not kept) reaches the other workers' waiters.
        relay=FillRelay(host.run_dir) if host is not None else None,
    )
    registry = app[REGISTRY] = Registry(
        local=local,
        fills=fills,
        shared=shared,
        link_ttl=settings.s3.tag_ttl,
        write_back=settings.s3.write_back,
        on_upstream_error=metrics.upstream_error,
        cache=cache,
        shared_dir=worker is not None,
        fleet=fleet,
    )
    if settings.server.accel_redirect is not None:
        app[ACCEL_REDIRECT] = settings.server.accel_redirect
    trimmer = HeapTrimmer()
    app[UPLOADS] = Uploads(
        data_dir / "uploads",
        ttl=settings.uploads.ttl,
        max_blob_bytes=settings.uploads.max_blob_bytes,
        caps=SessionCaps(
            total=settings.uploads.max_sessions,
            per_client=settings.uploads.max_sessions_per_client,
            ipv6_prefix=settings.uploads.client_ipv6_prefix,
        ),
        on_growth=_upload_growth(cache, trimmer),
        shared_dir=worker is not None,
    )
    app[UPLOAD_PACE] = BodyPace(
        idle_timeout=settings.uploads.idle_timeout,
        min_rate=settings.uploads.min_rate,
        window=settings.uploads.min_rate_window,
    )
    app[TRUSTED_PROXIES] = trusted_proxies
    app[WATCHDOG] = LoopWatchdog(threshold=settings.server.max_loop_lag)
    app[SHUTDOWN] = Shutdown()
    app[WORKER_STATE] = WorkerState(
        fills=fills,
        watchdog=app[WATCHDOG],
        shutdown=app[SHUTDOWN],
        metrics=metrics,
        index=worker,
        count=host.count if host is not None else 1,
        run_dir=host.run_dir if host is not None else None,
        cache=cache if host is not None and owner else None,
    )
    app.on_response_prepare.append(stamp_api_version)
    app.cleanup_ctx.append(_data_dir_lock(data_dir))  # first: nothing starts without it
    if host is not None:  # before the index loads: nothing another worker says is lost
        app.cleanup_ctx.append(_owner_link(host, cache, link))
        app.cleanup_ctx.append(_fill_relay(fills))
    app.cleanup_ctx.append(_sweep_leftovers(data_dir, fills))
    app.cleanup_ctx.append(_expire_uploads)
    app.cleanup_ctx.append(_trim_heap(trimmer))
    app.cleanup_ctx.append(_upstreams(settings, registry))
    app.cleanup_ctx.append(_close_stores(registry))
    app.cleanup_ctx.append(_blob_cache(cache))  # stopped first: it may be using S3
    app.cleanup_ctx.append(_watch_loop)
    app.cleanup_ctx.append(_publish_state)
    # With metrics_listen, /metrics is served there only; the probes stay here too, where
    # load balancers and kubelets already look for them.
    add_routes(app, metrics=settings.metrics_listen is None)
    if fleet is not None:
        app.cleanup_ctx.append(_fleet(fleet))
        fleet_api.add_routes(app)
        log.info(
            "fleet mode: one fetch per blob for the hosts on s3://%s, this one at %s",
            settings.s3.bucket,
            settings.fleet.advertise_url,
        )
    return app


def _s3_circuit(host: workers.Worker | None) -> HostCircuit | None:
    """The S3 outage circuit of every worker of the host (None: this process's own)."""
    if host is None:
        return None
    return HostCircuit(
        host.run_dir / circuit.FILE, backoff=counted.OUTAGE_BACKOFF, longest=counted.LIST_DEADLINE
    )


def check_fleet(settings: Settings) -> None:
    """``fleet.advertise_url`` turns fleet mode on; it needs the bucket, write-back (the
    owner's copy is how the others stop needing it) and the peer secret."""
    fleet = settings.fleet
    if not fleet.advertise_url:
        return
    if not settings.s3.bucket or not settings.s3.write_back:
        raise ConfigError("fleet.advertise_url needs s3.bucket and s3.write_back: true")
    if not fleet.secret:
        raise ConfigError("fleet.advertise_url needs fleet.secret (the same on every host)")
    if not fleet.advertise_url.startswith(("http://", "https://")):
        raise ConfigError(f"fleet.advertise_url: {fleet.advertise_url!r} is not an http(s) URL")
    if not 0 < fleet.peer_timeout < settings.cache.fill_idle_timeout:
        raise ConfigError("fleet.peer_timeout must be above 0 and below cache.fill_idle_timeout")
    if fleet.lease_ttl <= 0:
        raise ConfigError("fleet.lease_ttl must be above 0")


def _fleet(fleet: Fleet) -> Context:
    async def session(app: web.Application) -> AsyncIterator[None]:
        await fleet.start()
        yield
        await fleet.close()

    return session


def create_probe_app(app: web.Application) -> web.Application:
    """``/metrics``, ``/-/status``, ``/healthz`` and ``/readyz`` of ``app``, for ``metrics_listen``."""
    probes = web.Application(middlewares=[envelope])
    probes[METRICS] = app[METRICS]
    probes[REGISTRY] = app[REGISTRY]
    probes[WATCHDOG] = app[WATCHDOG]
    probes[SHUTDOWN] = app[SHUTDOWN]
    probes[WORKER_STATE] = app[WORKER_STATE]
    add_probe_routes(probes)
    return probes


def _data_dir_lock(data_dir: Path) -> Context:
    """Held while serving, so ``regmirror gc`` refuses to run under this server (and this
    server refuses to start under ``gc``): see :mod:`regmirror.datalock`."""

    async def lock(app: web.Application) -> AsyncIterator[None]:
        held = datalock.acquire(data_dir, exclusive=False)
        try:
            yield
        finally:
            held.release()

    return lock


def _sweep_leftovers(data_dir: Path, fills: Fills) -> Context:
    """Partial files a crash left are deleted in the background: walking a large store
    takes seconds, and nothing served needs them gone first (a fill claims its partial
    file with a lock, not by its absence)."""

    async def sweep(app: web.Application) -> AsyncIterator[None]:
        async def run() -> None:
            try:
                removed = await asyncio.to_thread(fills.remove_stale)
                removed += await asyncio.to_thread(
                    remove_stale_temp_files, data_dir, STALE_TEMP_SECONDS
                )
            except OSError:
                log.exception("removing partial files left by an earlier run failed")
                return
            if removed:
                log.info("removed %d partial files left by an earlier run", removed)

        task = asyncio.create_task(run(), name="sweep leftovers")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

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
    if found := await uploads.load():
        log.info("%d upload sessions open from an earlier run", found)
    task = asyncio.create_task(uploads.expire_forever(min(uploads.ttl / 4, 3600.0)))
    yield
    task.cancel()


def _upload_growth(cache: BlobCache, trimmer: HeapTrimmer) -> Callable[[int], None]:
    """Upload bytes count toward the disk budget, and are memory that passed through."""

    def grew(nbytes: int) -> None:
        cache.uploads_grew(nbytes)
        trimmer.moved(nbytes)

    return grew


def _trim_heap(trimmer: HeapTrimmer) -> Context:
    async def trim(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(trimmer.run_forever(), name="heap-trim")
        yield
        task.cancel()

    return trim


async def _watch_loop(app: web.Application) -> AsyncIterator[None]:
    """The watchdog ``/readyz`` asks whether the event loop stalls."""
    task = asyncio.create_task(app[WATCHDOG].run(), name="loop-watchdog")
    yield
    task.cancel()


async def _publish_state(app: web.Application) -> AsyncIterator[None]:
    """This process's state for the others, and the in-flight gauges."""
    task = asyncio.create_task(app[WORKER_STATE].run(), name="worker-state")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _owner_link(host: workers.Worker, cache: BlobCache, link: OwnerLink | None) -> Context:
    """Worker 0 listens for what the others store and ask (:mod:`regmirror.eviction_link`);
    the others talk to it."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        if link is not None:
            await link.start()
            yield
            link.close()
            return
        mailbox = OwnerMailbox(host.run_dir, cache)
        await mailbox.start()
        yield
        await mailbox.close()

    return run


def _fill_relay(fills: Fills) -> Context:
    """This worker's relay socket, for the fills it streams through
    (:mod:`regmirror.fill_relay`)."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        relay = fills.relay
        assert relay is not None
        try:
            await relay.start(fills.relayable)
        except OSError as exc:  # then as before: those waiters are cut, and retry
            log.warning("fills streamed through are not shared by the workers: %s", exc)
            fills.relay = None
        yield
        await relay.close()

    return run


def _upstreams(settings: Settings, registry: Registry) -> Context:
    """The upstream registries' HTTP client session lives as long as the app."""

    async def session(app: web.Application) -> AsyncIterator[None]:
        if not settings.upstreams:
            yield
            return
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            registry.router = UpstreamRouter.from_settings(settings.upstreams, client)
            for upstream in registry.router.upstreams:  # URLs without their userinfo
                log.info(
                    "pulling through from %s%s",
                    upstream.url,
                    f" for {upstream.settings.prefix}/…" if upstream.settings.prefix else "",
                )
            yield
            await registry.pullthrough.close()
            registry.router = None

    return session


def _blob_cache(cache: BlobCache) -> Context:
    """The index of local blobs is rebuilt in the background (then evicts if over
    budget, and deletes blobs no link references): requests are served meanwhile. What
    is in progress is stopped at shutdown."""

    async def index(app: web.Application) -> AsyncIterator[None]:
        cache.start_loading()
        yield
        await cache.close()

    return index


def _close_stores(registry: Registry) -> Context:
    async def close(app: web.Application) -> AsyncIterator[None]:
        yield
        await registry.fills.close()
        if registry.shared is not None:
            await registry.shared.close()

    return close
