"""``server.workers``: several serving processes on one port over one data directory.

Each test starts a real ``regmirror serve`` with two workers and tells the workers
apart by prometheus-client's per-process files (``counter_<pid>.db``) in the
supervisor's multiprocess directory."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.mmap_dict import MmapedDict

from regmirror import layout, workers
from regmirror.config import ConfigError, load
from regmirror.digest import Digest
from regmirror.eviction import BlobCache
from tests.support.http import session
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import (
    DOCKER_MANIFEST,
    CountingProxy,
    push_image,
    serve,
    upstream_registry,
)

__all__ = ["session", "upstream_registry"]

BOUND = 60.0
Start = Callable[..., ServerProcess]


def workers_of(server: ServerProcess) -> list[int]:
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def metrics_dir(server: ServerProcess) -> Path:
    """Where the supervisor keeps the workers' metrics (it logs it at startup)."""
    match = re.search(r"their metrics in (\S+)", server.logs(None))
    assert match, server.logs()
    return Path(match[1])


def requests_by_worker(server: ServerProcess, route: str) -> dict[int, float]:
    """GET requests answered 200 on ``route``, by worker pid, from each one's own file."""
    counts: dict[int, float] = {}
    for path in metrics_dir(server).glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if (
                name == "regmirror_http_requests_total"
                and labels.get("route") == route
                and labels.get("status") == "200"
            ):
                counts[pid] = counts.get(pid, 0.0) + value
    return counts


def counted(metrics_text: str, route: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if (
            line.startswith("regmirror_http_requests_total{")
            and f'route="{route}"' in line
            and 'status="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def fresh_get(url: str, **headers: str) -> tuple[int, bytes]:
    """A GET on a connection of its own, so that the kernel hands it to any worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=BOUND)) as s,
        s.get(url, headers=headers) as response,
    ):
        return response.status, await response.read()


async def test_two_workers_serve_one_port_and_metrics_count_each_request_once(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"workers": 2}})
    assert len(workers_of(server)) == 2
    n = 300
    for start in range(0, n, 50):
        results = await asyncio.gather(
            *(fresh_get(f"{server.url}/v2/") for _ in range(start, min(n, start + 50)))
        )
        assert all(status == 200 for status, _ in results)

    by_worker = requests_by_worker(server, "/v2/")
    assert len([c for c in by_worker.values() if c > 0]) == 2, by_worker  # both served
    status, body = await fresh_get(f"{server.url}/metrics")
    assert status == 200
    # Whichever worker answers /metrics counts every worker's requests, each once (the
    # readiness polls of the test harness included).
    assert counted(body.decode(), "/v2/") == sum(by_worker.values())
    assert sum(by_worker.values()) >= n


async def test_a_herd_spread_over_the_workers_makes_one_upstream_get(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    layer = os.urandom(4 * 1024 * 1024)
    image = await push_image(session, upstream_registry.url, "team/herd", layer=layer)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        manifest = f"{server.url}/v2/team/herd/manifests/latest"
        assert (await fresh_get(manifest, Accept=DOCKER_MANIFEST))[0] == 200
        proxy.hold_after = 1024 * 1024  # the fill stalls while the herd gathers
        blob = f"{server.url}/v2/team/herd/blobs/{image.layer_digest}"
        herd = [asyncio.create_task(fresh_get(blob)) for _ in range(24)]
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            await asyncio.sleep(1.0)  # every request reaches a worker
        finally:
            proxy.release.set()
        results = await asyncio.wait_for(asyncio.gather(*herd), BOUND)

    assert all(status == 200 and body == layer for status, body in results)
    assert proxy.blob_gets == 1
    route = "/v2/{name}/blobs/{digest}"
    by_worker = requests_by_worker(server, route)
    assert len([c for c in by_worker.values() if c > 0]) == 2, by_worker
    assert sum(by_worker.values()) == 24


async def test_one_worker_evicts_what_every_worker_stored(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Pulled-through blobs over the budget are evicted by the owner, whichever worker
    filled them (it rescans what the others stored)."""
    size = 1024 * 1024
    images = [
        await push_image(session, upstream_registry.url, f"team/e{i}", layer=os.urandom(size))
        for i in range(6)
    ]
    server = regmirror_server(
        config={
            "upstreams": [{"url": upstream_registry.url}],
            "server": {"workers": 2},
            "cache": {"max_bytes": 3 * size, "min_free_bytes": 0},
        }
    )
    for image in images:
        url = f"{server.url}/v2/{image.repo}/manifests/latest"
        assert (await fresh_get(url, Accept=DOCKER_MANIFEST))[0] == 200
        status, body = await fresh_get(f"{server.url}/v2/{image.repo}/blobs/{image.layer_digest}")
        assert status == 200 and body == image.layer

    def stored() -> list[Digest]:
        return [
            image.layer_digest
            for image in images
            if (server.data_dir / layout.blob_data(image.layer_digest)).exists()
        ]

    # The owner rescans what the other worker stored and evicts down to the budget.
    for _ in range(int(BOUND / 0.5)):
        if len(stored()) <= 3:
            break
        await asyncio.sleep(0.5)
    assert 1 <= len(stored()) <= 3, stored()
    # Every blob is still served: from disk, or filled again.
    for image in images:
        status, body = await fresh_get(f"{server.url}/v2/{image.repo}/blobs/{image.layer_digest}")
        assert status == 200 and body == image.layer


async def test_a_tag_moved_or_deleted_in_one_worker_is_seen_at_once_by_every_worker(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,
) -> None:
    """Each worker keeps the links it read in memory; a tag moved or deleted through one
    worker must be served as it now is by the next request, whichever worker it reaches
    (with a link trusted for a while, the other worker served the old digest)."""
    server = regmirror_server(config={"server": {"workers": 2}})
    one = await push_image(session, server.url, "team/moving", "v1")
    two = await push_image(session, server.url, "team/moving", "v2")
    tag = f"{server.url}/v2/team/moving/manifests/current"
    for round_ in range(8):
        image = (one, two)[round_ % 2]
        async with session.put(
            tag, data=image.manifest, headers={"Content-Type": DOCKER_MANIFEST}
        ) as response:
            assert response.status == 201
        # Fresh connections, so both workers answer (and cache) it.
        for _ in range(6):
            status, body = await fresh_get(tag, Accept=DOCKER_MANIFEST)
            assert (status, Digest.of(body)) == (200, image.digest), round_
    async with session.delete(tag) as response:
        assert response.status == 202, await response.text()
    for _ in range(12):
        status, _ = await fresh_get(tag, Accept=DOCKER_MANIFEST)
        assert status == 404
    by_worker = requests_by_worker(server, "/v2/{name}/manifests/{reference}")
    assert len(by_worker) == 2, by_worker  # both workers served the tag


async def test_a_tag_is_checked_upstream_once_per_tag_ttl_for_all_workers(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Once both workers have confirmed a tag themselves, the next expiry still costs one
    upstream HEAD, not one per worker: each sees the other's confirmation (the link's
    mtime) before asking."""
    await push_image(session, upstream_registry.url, "team/fresh")
    proxy = CountingProxy(upstream_registry.url, session)
    ttl = 2.0
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url, "tag_ttl": ttl}],
                "server": {"workers": 2},
            }
        )
        manifest = f"{server.url}/v2/team/fresh/manifests/latest"

        def heads() -> int:
            return sum(
                1
                for method, path in proxy.requests
                if method == "HEAD" and path.endswith("/latest")
            )

        for round_ in range(4):
            before = heads()
            for _ in range(10):  # one after the other: sequential, fresh connections
                assert (await fresh_get(manifest, Accept=DOCKER_MANIFEST))[0] == 200
            assert heads() - before == 1, (round_, proxy.requests)
            await asyncio.sleep(ttl + 0.2)
        by_worker = requests_by_worker(server, "/v2/{name}/manifests/{reference}")
        assert len(by_worker) == 2, by_worker


def test_a_link_changed_by_another_process_is_read_anew(tmp_path: Path) -> None:
    """Two link stores on one directory (two workers): a change by one is seen by the
    other's very next read, without waiting for any cache to expire."""
    from regmirror.links import LinkStore
    from regmirror.storage.driver import PathNotFound
    from regmirror.storage.filesystem import FilesystemDriver

    a = LinkStore(FilesystemDriver(tmp_path), shared_dir=True)
    b = LinkStore(FilesystemDriver(tmp_path), shared_dir=True)
    first, second = Digest.of(b"first"), Digest.of(b"second")

    async def scenario() -> None:
        await a.write("repo/_tags/t", first)
        assert await b.read("repo/_tags/t") == first
        await a.write("repo/_tags/t", second)
        assert await b.read("repo/_tags/t") == second
        await a.delete("repo/_tags/t")
        with pytest.raises(PathNotFound):
            await b.read("repo/_tags/t")
        await a.write("repo/_tags/t", first)
        assert await b.read("repo/_tags/t") == first

    asyncio.run(scenario())


async def test_sigterm_drains_every_worker(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    layer = os.urandom(3 * 1024 * 1024)
    image = await push_image(session, upstream_registry.url, "team/drain", layer=layer)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        workers = workers_of(server)
        manifest = f"{server.url}/v2/team/drain/manifests/latest"
        assert (await fresh_get(manifest, Accept=DOCKER_MANIFEST))[0] == 200
        proxy.hold_after = 1024 * 1024
        blob = f"{server.url}/v2/team/drain/blobs/{image.layer_digest}"
        pulls = [asyncio.create_task(fresh_get(blob)) for _ in range(8)]
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            await asyncio.sleep(1.0)
            server.stopped = True  # by this test, on purpose
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
        finally:
            proxy.release.set()
        results = await asyncio.wait_for(asyncio.gather(*pulls), BOUND)
        code = await asyncio.to_thread(server.process.wait, BOUND)

    assert all(status == 200 and body == layer for status, body in results)
    assert code == 0
    assert server.logs(None).count("stopping: draining") == 2  # one drain per worker
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fresh_get(f"{server.url}/v2/")


async def test_drain_of_every_worker_is_bounded_by_drain_timeout(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Pulls stuck upstream in both workers are cut at server.drain_timeout, not at the
    supervisor's kill margin: the workers drain side by side, each within the bound."""
    layer = os.urandom(3 * 1024 * 1024)
    image = await push_image(session, upstream_registry.url, "team/stuck", layer=layer)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url}],
                "server": {"workers": 2, "drain_timeout": 2},
            }
        )
        manifest = f"{server.url}/v2/team/stuck/manifests/latest"
        assert (await fresh_get(manifest, Accept=DOCKER_MANIFEST))[0] == 200
        proxy.hold_after = 1024 * 1024
        blob = f"{server.url}/v2/team/stuck/blobs/{image.layer_digest}"
        pulls = [asyncio.create_task(fresh_get(blob)) for _ in range(8)]
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            await asyncio.sleep(1.0)
            server.stopped = True  # by this test, on purpose
            loop = asyncio.get_running_loop()
            started = loop.time()
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, BOUND)
            elapsed = loop.time() - started
        finally:
            proxy.release.set()
        results = await asyncio.gather(*pulls, return_exceptions=True)

    assert code == 0
    assert 1.5 < elapsed < 2 + workers.STOP_MARGIN - 3, elapsed  # cut at 2 s, not killed
    assert not any(isinstance(r, tuple) and r[0] == 200 and r[1] == layer for r in results)
    logs = server.logs(None)
    assert logs.count("stopping: draining") == 2
    assert "did not drain" not in logs


async def test_workers_die_with_a_killed_supervisor(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """kill -9 of the supervisor leaves no worker serving (nor holding the data
    directory from gc)."""
    server = regmirror_server(config={"server": {"workers": 2}})
    pids = workers_of(server)
    assert len(pids) == 2
    server.stopped = True  # by this test, on purpose
    server.process.kill()
    await asyncio.to_thread(server.process.wait, BOUND)
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            break
        await asyncio.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    with pytest.raises(aiohttp.ClientConnectionError):
        await fresh_get(f"{server.url}/v2/")


def test_workers_setting_is_checked() -> None:
    assert load(environ={"REGMIRROR_SERVER__WORKERS": "3"}).server.workers == 3
    assert load(environ={}).server.workers == 0  # one per CPU (tests/test_workers_flip.py)
    assert load(environ={"REGMIRROR_SERVER__WORKERS": "0"}).server.workers == 0  # one per CPU
    for bad in ("-1", "1000", "two"):
        with pytest.raises(ConfigError, match="workers"):
            load(environ={"REGMIRROR_SERVER__WORKERS": bad})


async def test_eviction_skips_a_blob_another_process_is_serving(tmp_path: Path) -> None:
    """A worker serving a stored blob holds LOCK_SH on it (api.blobs); the owner's
    eviction deletes only a file it can lock exclusively, and takes it once it is free."""
    cache = BlobCache(tmp_path, max_bytes=1000, min_free_bytes=0)
    data = os.urandom(4000)
    digest = Digest.of(data)
    path = tmp_path / layout.blob_data(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    serving = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(serving, fcntl.LOCK_SH)  # another open file: as another process's
        cache.added(digest, len(data), evictable=True)
        await cache.settle()
        assert path.exists() and cache.total == len(data)
    finally:
        os.close(serving)
    cache.added(digest, len(data), evictable=True)  # the next write's pass
    await cache.settle()
    assert not path.exists() and cache.total == 0
    await cache.close()


async def test_a_worker_that_does_not_own_eviction_never_deletes(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=1000, min_free_bytes=0, evicts=False)
    data = os.urandom(4000)
    digest = Digest.of(data)
    path = tmp_path / layout.blob_data(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    cache.added(digest, len(data), evictable=True)
    await cache.settle()
    assert await cache.make_room(len(data)) == 0
    assert path.exists()
    await cache.close()


async def test_upload_caps_hold_for_every_worker_together(tmp_path: Path) -> None:
    """Two workers' session stores on one directory: the caps count the sessions on disk,
    whichever worker opened or closed them (counted in memory per worker, each worker
    allowed the cap on its own)."""
    from regmirror.errors import TooManyUploads
    from regmirror.upload_caps import SessionCaps
    from regmirror.uploads import Uploads

    def worker() -> Uploads:
        caps = SessionCaps(total=3, per_client=2)
        return Uploads(tmp_path / "uploads", ttl=3600, caps=caps, shared_dir=True)

    a, b = worker(), worker()
    first = await a.start("team/app", client="10.0.0.1")
    await a.start("team/app", client="10.0.0.1")
    with pytest.raises(TooManyUploads, match="max_sessions_per_client"):
        await b.start("team/app", client="10.0.0.1")  # a opened both
    third = await b.start("team/app", client="10.0.0.2")
    with pytest.raises(TooManyUploads, match="uploads.max_sessions\\)"):
        await a.start("team/app", client="10.0.0.3")  # three open, one of them b's
    await b.cancel(await b.get("team/app", first.id))  # closed by the other worker
    await a.start("team/app", client="10.0.0.1")  # a's own count knows it is gone
    await a.cancel(await a.get("team/app", third.id))
    await b.start("team/app", client="10.0.0.3")
    with pytest.raises(TooManyUploads, match="uploads.max_sessions\\)"):
        await a.start("team/app", client="10.0.0.4")  # b's new one counted here too
