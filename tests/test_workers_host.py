"""With ``server.workers``, what a request reads about the server describes the host,
whichever worker the kernel handed it to: ``/-/status`` and the in-flight gauges
(every worker's fills and connections), ``/readyz`` (any worker stalled, near its fd
limit or gone makes the host not ready, named), ``server.max_connections`` (the host's
bound), and ``cache.max_bytes`` (held within one blob at once, whichever worker stored;
room made by the eviction owner for any worker's fill).

Real ``regmirror serve`` processes with two workers. A request reaches a chosen worker
on a kept-alive connection that ``/-/status`` (it names the answering pid) showed to be
that worker's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from regmirror import layout
from tests.support.http import session
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import (
    DOCKER_MANIFEST,
    CountingProxy,
    push_blob,
    push_image,
    serve,
    upstream_registry,
)
from tests.test_workers import fresh_get, workers_of

__all__ = ["session", "upstream_registry"]

BOUND = 60.0
MiB = 1024 * 1024
Start = Callable[..., ServerProcess]


@contextlib.asynccontextmanager
async def pinned(server: ServerProcess, pid: int) -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose one kept-alive connection the worker ``pid`` serves (waiting for
    it to listen: the server is ready once any worker answers)."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=BOUND),
        )
        async with client.get(f"{server.url}/-/status") as response:
            answered = (await response.json())["pid"]
        if answered == pid:
            try:
                yield client
            finally:
                await client.close()
            return
        await client.close()
        await asyncio.sleep(0.02)
    raise AssertionError(f"no connection reached worker pid {pid}")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- /-/status and the gauges --------------------------------------------------------


async def test_status_and_gauges_from_one_worker_show_the_fill_another_runs(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """A fill held in worker 1: worker 0's /-/status lists it (and both workers, by
    pid), and /metrics from worker 0 counts it in flight."""
    layer = os.urandom(3 * MiB)
    image = await push_image(session, upstream_registry.url, "team/seen", layer=layer)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        first, second = workers_of(server)
        proxy.hold_after = MiB
        async with pinned(server, second) as one, pinned(server, first) as zero:
            manifest = f"{server.url}/v2/team/seen/manifests/latest"
            async with one.get(manifest, headers={"Accept": DOCKER_MANIFEST}) as response:
                assert response.status == 200
            blob = f"{server.url}/v2/team/seen/blobs/{image.layer_digest}"

            async def pull() -> bytes:
                async with one.get(blob) as response:
                    return await response.read()

            pulling = asyncio.create_task(pull())
            try:
                await asyncio.wait_for(proxy.held.wait(), BOUND)
                await asyncio.sleep(1.2)  # two heartbeats of worker 1
                async with zero.get(f"{server.url}/-/status") as response:
                    status = await response.json()
                async with zero.get(f"{server.url}/metrics") as response:
                    metrics = await response.text()
            finally:
                proxy.release.set()
            assert await asyncio.wait_for(pulling, BOUND) == layer

    assert status["pid"] == first and status["worker"] == 0
    assert [(w["index"], w["pid"]) for w in status["workers"]] == [(0, first), (1, second)]
    assert [(f["digest"], f["worker"]) for f in status["fills"]] == [(str(image.layer_digest), 1)]
    assert status["fills"][0]["size"] == len(layer)
    assert status["workers"][1]["fills"] == 1 and status["workers"][0]["fills"] == 0
    assert status["workers"][1]["requests_in_flight"] >= 1  # the held pull
    assert status["connections"] >= 2  # one on each worker
    assert all(w["problem"] is None for w in status["workers"])
    assert metric(metrics, "regmirror_fills_in_flight") == 1
    assert metric(metrics, "regmirror_http_requests_in_flight") >= 1


async def test_regmirror_status_lists_the_workers(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"workers": 2}})
    await asyncio.sleep(1.0)  # both workers have published
    result = await asyncio.to_thread(
        subprocess.run,
        ["python3", "-m", "regmirror", "status", "--url", server.url],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for index, pid in enumerate(workers_of(server)):
        assert f"worker {index}: pid {pid}" in result.stdout, result.stdout


# -- /readyz ------------------------------------------------------------------------


async def ready_answer(url: str) -> tuple[int, dict[str, Any]] | None:
    """``/readyz`` on a fresh connection; None if the worker it reached did not answer."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=1.0)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
            client.get(f"{url}/readyz") as response,
        ):
            return response.status, await response.json()
    except (TimeoutError, aiohttp.ClientError):
        return None


async def test_a_stopped_worker_makes_the_other_one_not_ready_naming_it(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """SIGSTOP one worker: /readyz from the other one says 503 within about
    server.max_loop_lag, naming it; SIGCONT, and it is ready again."""
    lag = 1.0
    server = regmirror_server(config={"server": {"workers": 2, "max_loop_lag": lag}})
    first, second = workers_of(server)
    await asyncio.sleep(1.0)

    async def ready(client: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with client.get(f"{server.url}/readyz") as response:
            return response.status, await response.json()

    async with pinned(server, first) as zero:
        status, body = await ready(zero)
        assert status == 200 and body["checks"]["workers"] == "ok", body
        os.kill(second, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while time.monotonic() - stopped < lag + 10:
                status, body = await ready(zero)
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            took = time.monotonic() - stopped
        finally:
            os.kill(second, signal.SIGCONT)
        assert status == 503, body
        problem = body["checks"]["workers"]
        assert f"worker 1 (pid {second})" in problem and "stalled" in problem, problem
        assert took < lag + 1.0, took  # silent since its last beat, up to 0.5 s before
        for _ in range(100):  # back: ready once its loop has run a heartbeat
            status, body = await ready(zero)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body
        assert (await ready_answer(server.url)) is not None  # and it answers itself


async def test_a_killed_worker_is_not_ready_until_its_successor_publishes(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(config={"server": {"workers": 2}})
    first, second = workers_of(server)
    await asyncio.sleep(1.0)
    async with pinned(server, first) as zero:
        os.kill(second, signal.SIGKILL)
        reports = []
        for _ in range(500):
            async with zero.get(f"{server.url}/readyz") as response:
                body = await response.json()
            reports.append((response.status, body["checks"]["workers"]))
            if reports[-1][0] == 200 and any(status == 503 for status, _ in reports):
                break
            await asyncio.sleep(0.01)
    not_ready = [problem for status, problem in reports if status == 503]
    assert not_ready, reports
    assert all(problem.startswith("worker 1") for problem in not_ready), not_ready
    assert reports[-1] == (200, "ok"), reports[-5:]
    assert second not in workers_of(server) and len(workers_of(server)) == 2


def test_host_problems_name_each_unhealthy_worker(tmp_path: Path) -> None:
    from regmirror import worker_state
    from regmirror.state_file import Reader, Writer

    now = time.time()
    dead = subprocess.Popen(["true"])
    dead.wait()
    peers = Reader(tmp_path)

    def publish(index: int, **changes: Any) -> None:
        state = {"index": index, "pid": os.getpid(), "written": now, "loop_lag": 0.0}
        state |= {"fds": 10, "fd_limit": 1000, "draining": False, **changes}
        writer = Writer(tmp_path / worker_state.name_of(index))
        writer.write(state)
        writer.close()

    def problems(count: int, **kwargs: Any) -> str:
        return worker_state.problems(peers, count, 5.0, **kwargs) or ""

    publish(0)
    publish(1)
    assert problems(2) == ""
    publish(1, fds=950)
    assert "worker 1" in (found := problems(2)) and "950" in found
    publish(1, written=now - 7)
    assert "no heartbeat for 7" in problems(2)
    publish(1, loop_lag=6.5)
    assert "stalled 6.5 s" in problems(2)
    publish(1, pid=dead.pid)
    assert "gone" in problems(2)
    publish(1, draining=True)
    assert "draining" in problems(2)
    assert problems(2, skip=1) == ""  # its own checks are its own
    worker_state.forget(tmp_path, 1, os.getpid())  # the supervisor reaped it
    assert "worker 1: not running" in problems(3)
    assert "worker 2: not running" in problems(3)
    publish(1)
    assert problems(3, starting={2}) == ""  # not started yet: fine


# -- server.max_connections ----------------------------------------------------------


def test_each_worker_gets_a_share_of_max_connections() -> None:
    from regmirror.server import MIN_WORKER_CONNECTIONS, worker_share

    assert worker_share(2048, 1) == 2048
    assert worker_share(2048, 2) == 1024
    assert worker_share(1000, 3) == 334
    assert worker_share(2048, 256) == MIN_WORKER_CONNECTIONS  # a floor...
    assert worker_share(10, 4) == 10  # ...never above the whole


async def test_max_connections_bounds_the_host_not_each_worker(
    regmirror_server: Start,  # noqa: F811
) -> None:
    bound = 128  # two workers' floors
    server = regmirror_server(
        config={"server": {"workers": 2, "max_connections": bound, "header_timeout": 60}}
    )
    opened = []
    try:
        for _ in range(3 * bound):  # idle clients: the oldest are displaced past the bound
            opened.append(await asyncio.open_connection("127.0.0.1", server.port))
        await asyncio.sleep(1.2)  # the displaced ones have seen their EOF; the gauges beat
        still_open = sum(1 for reader, _ in opened if not reader.at_eof())
        assert bound // 2 <= still_open <= bound, still_open  # not each worker's bound
        _, body = await fresh_get(f"{server.url}/metrics")
        gauge = metric(body.decode(), "regmirror_http_connections")
    finally:
        for _, writer in opened:
            writer.close()
    assert bound // 2 <= gauge <= bound, gauge
    logs = server.logs(None)
    for index in (0, 1):
        assert f"worker {index}: up to {bound // 2} connections per port" in logs, logs


# -- cache.max_bytes -----------------------------------------------------------------


class DiskWatch:
    """Polls the bytes of the blobs and partial fills under a data directory."""

    def __init__(self, data_dir: Path, every: float = 0.02):
        self.roots = [data_dir / layout.ROOT / "blobs", data_dir / "fills"]
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((time.monotonic(), self.usage()))

    def usage(self) -> int:
        total = 0
        for root in self.roots:
            for directory, _, files in os.walk(root):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(directory, name)).st_size
        return total

    def longest_above(self, limit: int) -> float:
        """The longest stretch of seconds the usage stayed above ``limit``."""
        longest, since = 0.0, None
        for at, used in self.samples:
            if used > limit:
                since = at if since is None else since
                longest = max(longest, at - since)
            else:
                since = None
        return longest


async def test_the_budget_holds_whichever_worker_stores(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Pulls and pushes spread over both workers never keep the store more than one
    blob over cache.max_bytes for more than a moment (the other worker's blobs waited
    for the owner's rescan, 10 s)."""
    size = MiB
    budget = 6 * size
    images = [
        await push_image(session, upstream_registry.url, f"team/b{i}", layer=os.urandom(size))
        for i in range(14)
    ]
    server = regmirror_server(
        config={
            "upstreams": [{"url": upstream_registry.url}],
            "server": {"workers": 2},
            "cache": {"max_bytes": budget, "min_free_bytes": 0},
        }
    )
    first, second = workers_of(server)
    with DiskWatch(server.data_dir) as watch:
        async with pinned(server, first) as zero, pinned(server, second) as one:
            for i, image in enumerate(images):
                client = one if i % 3 else zero  # mostly the worker that does not evict
                url = f"{server.url}/v2/{image.repo}"
                accept = {"Accept": DOCKER_MANIFEST}
                async with client.get(f"{url}/manifests/latest", headers=accept) as response:
                    assert response.status == 200
                async with client.get(f"{url}/blobs/{image.layer_digest}") as response:
                    assert response.status == 200 and await response.read() == image.layer
                if i % 5 == 4:  # a small push (pinned: no S3) through the same worker
                    await push_blob(client, server.url, "ci/app", os.urandom(64 * 1024))
            await asyncio.sleep(1.5)
    assert watch.samples and watch.usage() <= budget + size
    longest = watch.longest_above(budget + size)
    assert longest < 1.0, (longest, max(used for _, used in watch.samples))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(capacity)``: a tmpfs of that many bytes (root only)."""
    mounted: list[Path] = []

    def make(capacity: int) -> Path:
        path = tmp_path / "disk"
        path.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={capacity}", "tmpfs", str(path)]
        done = subprocess.run(mount, check=False, capture_output=True)
        if os.geteuid() != 0 or done.returncode != 0:
            pytest.skip("needs to mount a tmpfs (root)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


async def test_a_fill_in_another_worker_on_a_full_disk_gets_room_from_the_owner(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
    small_disk: Callable[[int], Path],
) -> None:
    """The disk is full of blobs worker 0 pulled (evictable); a pull through worker 1
    that does not fit is stored, the owner evicting for it (it streamed through,
    unstored: worker 1's index knew none of those blobs, and it may not evict)."""
    data_dir = small_disk(12 * MiB)
    older = [
        await push_image(session, upstream_registry.url, f"team/f{i}", layer=os.urandom(2 * MiB))
        for i in range(5)
    ]
    big = await push_image(session, upstream_registry.url, "team/big", layer=os.urandom(3 * MiB))
    server = regmirror_server(
        data_dir=data_dir,
        config={
            "upstreams": [{"url": upstream_registry.url}],
            "server": {"workers": 2},
            "cache": {"min_free_bytes": 0},
        },
    )
    first, second = workers_of(server)
    accept = {"Accept": DOCKER_MANIFEST}
    async with pinned(server, first) as zero:
        for image in older:
            url = f"{server.url}/v2/{image.repo}"
            async with zero.get(f"{url}/manifests/latest", headers=accept) as response:
                assert response.status == 200
            async with zero.get(f"{url}/blobs/{image.layer_digest}") as response:
                assert response.status == 200 and await response.read() == image.layer
    assert os.statvfs(data_dir).f_bavail * os.statvfs(data_dir).f_frsize < len(big.layer)
    async with pinned(server, second) as one:
        url = f"{server.url}/v2/{big.repo}"
        async with one.get(f"{url}/manifests/latest", headers=accept) as response:
            assert response.status == 200
        async with one.get(f"{url}/blobs/{big.layer_digest}") as response:
            assert response.status == 200 and await response.read() == big.layer

    assert (data_dir / layout.blob_data(big.layer_digest)).exists(), server.logs()
    assert not (data_dir / layout.blob_data(older[0].layer_digest)).exists()  # the coldest
    assert "streams through" not in server.logs(None)
