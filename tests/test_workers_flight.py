"""``server.workers``: a herd's upstream requests other than blob bodies (a tag's
resolution, a manifest's GET, a blob's HEAD, a tag list) are made once for the host,
however the herd is spread over the workers (:mod:`regmirror.hostflight`).

The end-to-end tests run a real ``regmirror serve`` with two workers in front of
registry:2, through a counting proxy that can hold the upstream requests of interest
until the herd has reached both workers (so a per-worker single-flight is caught every
time, not by luck of timing); the others drive :class:`HostFlights` directly, two
instances on one directory standing for two processes (``flock`` locks belong to open
files, so two opens in one process exclude each other as two processes do).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.mmap_dict import MmapedDict

from regmirror import hostflight
from regmirror.errors import (
    ManifestUnknown,
    TooManyRequests,
    TooManyUploads,
    UpstreamUnavailable,
)
from regmirror.hostflight import HostFlights
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import (
    DOCKER_MANIFEST,
    HOLD_TIMEOUT,
    CountingProxy,
    push_image,
    serve,
    upstream_registry,
)
from tests.test_workers import BOUND, metrics_dir, session

__all__ = ["session", "upstream_registry"]

Start = Callable[..., ServerProcess]
HERD = 60
MANIFESTS = "/v2/{name}/manifests/{reference}"


@dataclass
class GatedProxy(CountingProxy):
    """A :class:`CountingProxy` that holds the requests ``gate`` picks until ``opened``
    is set (``gated`` tells that the first is held), then forwards them, or answers
    them ``fail_status`` without asking the registry."""

    gate: Callable[[str, str], bool] | None = None
    gated: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    fail_status: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._gated)
        return app

    async def _gated(self, request: web.Request) -> web.StreamResponse:
        if self.gate is not None and self.gate(request.method, request.path):
            self.gated.set()
            await asyncio.wait_for(self.opened.wait(), HOLD_TIMEOUT)
            if self.fail_status is not None:
                self.requests.append((request.method, request.path))
                return web.json_response(
                    {"errors": [{"code": "UNAVAILABLE", "message": "down"}]},
                    status=self.fail_status,
                )
        return await self._handle(request)

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, path in self.requests if m == method and path.endswith(suffix))


async def fresh(method: str, url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    """A request on a connection of its own, so that the kernel hands it to any worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=BOUND)) as s,
        s.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


async def herd(
    proxy: GatedProxy,
    count: int,
    request: Callable[[], Awaitable[tuple[int, bytes, dict[str, str]]]],
) -> list[tuple[int, bytes, dict[str, str]]]:
    """``count`` concurrent requests; the first upstream request the gate picks is held
    until every request has had time to reach a worker (and, were the single-flight per
    worker, the other worker's own upstream request to arrive too)."""
    tasks = [asyncio.ensure_future(request()) for _ in range(count)]
    try:
        await asyncio.wait_for(proxy.gated.wait(), BOUND)
        await asyncio.sleep(1.5)
    finally:
        proxy.opened.set()
    return await asyncio.wait_for(asyncio.gather(*tasks), BOUND)


def answered_by_worker(server: ServerProcess, route: str, status: str) -> dict[int, float]:
    """Requests on ``route`` answered ``status``, by worker pid, from each one's own file."""
    counts: dict[int, float] = {}
    for path in metrics_dir(server).glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if (
                name == "regmirror_http_requests_total"
                and labels.get("route") == route
                and labels.get("status") == status
            ):
                counts[pid] = counts.get(pid, 0.0) + value
    return counts


async def both_listening(server: ServerProcess) -> None:
    """Until each worker has answered a request: the harness's readiness probe may have
    reached one before the other listened, and a herd then lands in one process."""
    for _ in range(int(BOUND / 0.1)):
        answered = answered_by_worker(server, "/v2/", "200")
        if len([c for c in answered.values() if c > 0]) == 2:
            return
        await asyncio.gather(*(fresh("GET", f"{server.url}/v2/") for _ in range(8)))
        await asyncio.sleep(0.1)
    raise AssertionError(f"one worker never answered: {answered}")


def served_by_both(server: ServerProcess, route: str, status: str = "200") -> None:
    by_worker = answered_by_worker(server, route, status)
    assert len([c for c in by_worker.values() if c > 0]) == 2, by_worker


# -- end to end: two workers, one upstream request -----------------------------------


async def test_a_herd_pulling_a_tag_over_two_workers_makes_one_upstream_get(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """The tag's HEAD is held upstream until the herd is in both workers: one worker
    asks (one HEAD, one GET), the other answers from what it stored. Fails on a
    per-worker single-flight (two HEADs, two GETs)."""
    image = await push_image(session, upstream_registry.url, "team/flight")
    proxy = GatedProxy(upstream_registry.url, session)
    proxy.gate = lambda method, path: "/manifests/" in path
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/flight/manifests/latest"
        results = await herd(proxy, HERD, lambda: fresh("GET", url, Accept=DOCKER_MANIFEST))

    assert all(status == 200 and body == image.manifest for status, body, _ in results)
    assert (
        proxy.count("GET", "/manifests/latest") + proxy.count("GET", f"/manifests/{image.digest}")
        == 1
    ), proxy.requests
    assert proxy.count("HEAD", "/manifests/latest") <= 1, proxy.requests
    served_by_both(server, MANIFESTS)
    # Lock files stay inside the data directory, named by a hash.
    locks = list((server.data_dir / hostflight.DIRECTORY).iterdir())
    assert locks and all(len(p.name) == 64 + len(".lock") for p in locks), locks


async def test_a_herd_listing_tags_over_two_workers_makes_one_upstream_listing(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """One listing for the herd, and none for later requests within the TTL, whichever
    worker they reach (the list and its mtime on disk)."""
    await push_image(session, upstream_registry.url, "team/listed", "v1")
    await push_image(session, upstream_registry.url, "team/listed", "v2")
    proxy = GatedProxy(upstream_registry.url, session)
    proxy.gate = lambda method, path: path.endswith("/tags/list")
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url, "tag_ttl": 600}],
                "server": {"workers": 2},
            }
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/listed/tags/list"
        results = await herd(proxy, HERD, lambda: fresh("GET", url))
        for _ in range(20):  # one after the other, on fresh connections: both workers
            results.append(await fresh("GET", url))

    for status, body, _ in results:
        assert status == 200
        assert json.loads(body) == {"name": "team/listed", "tags": ["v1", "v2"]}
    assert proxy.count("GET", "/tags/list") == 1, proxy.requests
    served_by_both(server, "/v2/{name}/tags/list")


async def test_a_herd_of_blob_heads_over_two_workers_makes_one_upstream_head(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    image = await push_image(
        session, upstream_registry.url, "team/probed", layer=os.urandom(100_000)
    )
    proxy = GatedProxy(upstream_registry.url, session)
    proxy.gate = lambda method, path: "/blobs/" in path
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/probed/blobs/{image.layer_digest}"
        results = await herd(proxy, HERD, lambda: fresh("HEAD", url))

    for status, _, headers in results:
        assert status == 200
        assert headers["Content-Length"] == str(len(image.layer))
        assert headers["Docker-Content-Digest"] == str(image.layer_digest)
    assert proxy.count("HEAD", f"/blobs/{image.layer_digest}") == 1, proxy.requests
    assert proxy.blob_gets == 0  # a HEAD copies nothing
    served_by_both(server, "/v2/{name}/blobs/{digest}")


async def test_a_herd_asking_for_an_unknown_tag_gets_404_from_one_upstream_request(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """The leader's 404 is every waiter's answer (shared with the herd that waited, not
    cached: a request after the flight asks again)."""
    await push_image(session, upstream_registry.url, "team/partial")
    proxy = GatedProxy(upstream_registry.url, session)
    proxy.gate = lambda method, path: path.endswith("/manifests/missing")
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/partial/manifests/missing"
        results = await herd(proxy, HERD, lambda: fresh("GET", url, Accept=DOCKER_MANIFEST))
        asked = len(proxy.requests)
        status, _, _ = await fresh("GET", url, Accept=DOCKER_MANIFEST)  # after the flight
        assert status == 404
        assert len(proxy.requests) == asked + 1  # not cached

    for status, body, _ in results:
        assert status == 404
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert asked == 1, proxy.requests
    served_by_both(server, MANIFESTS, "404")


async def test_a_herd_facing_a_failing_upstream_gets_503_from_one_upstream_request(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    await push_image(session, upstream_registry.url, "team/down")
    proxy = GatedProxy(upstream_registry.url, session, fail_status=503)
    proxy.gate = lambda method, path: "/manifests/" in path
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"workers": 2}}
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/down/manifests/latest"
        results = await herd(proxy, HERD, lambda: fresh("GET", url, Accept=DOCKER_MANIFEST))

    for status, body, _ in results:
        assert status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert len(proxy.requests) == 1, proxy.requests
    served_by_both(server, MANIFESTS, "503")


async def test_a_herd_over_two_workers_is_served_stale_after_one_failed_revalidation(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """The tag's TTL has expired and the upstream fails: one revalidation for the host,
    and every worker serves the last known digest (the failure is shared, each worker
    falls back on its own)."""
    image = await push_image(session, upstream_registry.url, "team/stale")
    proxy = GatedProxy(upstream_registry.url, session)
    ttl = 1.0
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url, "tag_ttl": ttl}],
                "server": {"workers": 2},
            }
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/stale/manifests/latest"
        status, body, _ = await fresh("GET", url, Accept=DOCKER_MANIFEST)
        assert (status, body) == (200, image.manifest)
        await asyncio.sleep(ttl + 0.2)
        asked = len(proxy.requests)
        proxy.fail_status = 503
        proxy.gate = lambda method, path: "/manifests/" in path
        results = await herd(proxy, HERD, lambda: fresh("GET", url, Accept=DOCKER_MANIFEST))

    assert all(status == 200 and body == image.manifest for status, body, _ in results)
    assert len(proxy.requests) - asked == 1, proxy.requests[asked:]
    served_by_both(server, MANIFESTS)


async def test_one_process_takes_no_lock_files(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """Serving alone (server.workers: 1), the in-memory coalescing is the whole
    single-flight: no lock file, no extra work on the upstream path."""
    image = await push_image(session, upstream_registry.url, "team/alone")
    server = regmirror_server(
        config={"upstreams": [{"url": upstream_registry.url}], "server": {"workers": 1}}
    )
    url = f"{server.url}/v2/team/alone/manifests/latest"
    results = await asyncio.gather(*(fresh("GET", url, Accept=DOCKER_MANIFEST) for _ in range(8)))
    assert all(status == 200 and body == image.manifest for status, body, _ in results)
    status, _, _ = await fresh("GET", f"{server.url}/v2/team/alone/tags/list")
    assert status == 200
    assert not (server.data_dir / hostflight.DIRECTORY).exists()


# -- HostFlights: the mechanism ---------------------------------------------------


@dataclass
class Upstream:
    """Stands for the upstream and the data directory: counts asks, stores answers."""

    answer: Callable[[], Awaitable[str]] | None = None
    asks: int = 0
    stored: dict[str, str] = field(default_factory=dict)

    async def work(self, key: str = "k") -> str:
        self.asks += 1
        value = await self.answer() if self.answer else f"v{self.asks}"
        self.stored[key] = value
        return value

    async def read(self, _: object, key: str = "k") -> str | None:
        return self.stored.get(key)


async def _run(
    flights: HostFlights, upstream: Upstream, *, wait: float = 30.0, key: tuple[str, ...] = ("k",)
) -> str:
    return await flights.run(
        key, upstream.work, encode=lambda v: v, decode=upstream.read, wait=wait
    )


async def _slow(value: str, seconds: float = 0.2) -> str:
    await asyncio.sleep(seconds)
    return value


async def test_one_caller_asks_and_every_process_gets_its_answer(tmp_path: Path) -> None:
    a, b = HostFlights(tmp_path), HostFlights(tmp_path)
    upstream = Upstream(answer=lambda: _slow("answer"))
    results = await asyncio.gather(*(_run((a, b)[i % 2], upstream) for i in range(20)))
    assert results == ["answer"] * 20
    assert upstream.asks == 1
    assert len(list(tmp_path.iterdir())) == 1  # one lock file, reused by the next flight
    await _run(a, upstream)
    assert upstream.asks == 2  # a flight after it is a new one
    assert len(list(tmp_path.iterdir())) == 1


async def test_the_leaders_error_is_every_waiters_and_nobody_elses(tmp_path: Path) -> None:
    a, b = HostFlights(tmp_path), HostFlights(tmp_path)

    async def fail() -> str:
        await asyncio.sleep(0.2)
        raise TooManyRequests("slow down", {"why": "limit"}, headers={"Retry-After": "7"})

    upstream = Upstream(answer=fail)
    results = await asyncio.gather(
        *(_run((a, b)[i % 2], upstream) for i in range(10)), return_exceptions=True
    )
    assert upstream.asks == 1
    for error in results:
        assert isinstance(error, TooManyRequests)
        assert (error.message, error.detail, error.headers) == (
            "slow down",
            {"why": "limit"},
            {"Retry-After": "7"},
        )
    upstream.answer = None
    assert await _run(b, upstream) == "v2"  # not cached: the next caller asks


async def test_a_404_reaches_the_waiters_as_a_404(tmp_path: Path) -> None:
    a, b = HostFlights(tmp_path), HostFlights(tmp_path)

    async def unknown() -> str:
        await asyncio.sleep(0.2)
        raise ManifestUnknown("no such tag", {"tag": "x"})

    upstream = Upstream(answer=unknown)
    results = await asyncio.gather(_run(a, upstream), _run(b, upstream), return_exceptions=True)
    assert upstream.asks == 1
    assert all(isinstance(r, ManifestUnknown) and r.detail == {"tag": "x"} for r in results)


async def test_a_cancelled_leader_leaves_the_work_to_one_waiter(tmp_path: Path) -> None:
    a, b, c = HostFlights(tmp_path), HostFlights(tmp_path), HostFlights(tmp_path)
    started = asyncio.Event()

    async def answer() -> str:
        started.set()
        return await _slow("answer", 0.3)

    upstream = Upstream(answer=answer)
    leader = asyncio.ensure_future(_run(a, upstream))
    await started.wait()
    waiters = [asyncio.ensure_future(_run(x, upstream)) for x in (b, c)]
    await asyncio.sleep(0.05)
    leader.cancel()
    assert await asyncio.gather(*waiters) == ["answer", "answer"]
    assert upstream.asks == 2  # the cancelled one, then one waiter for both


async def test_a_waiter_asks_itself_past_its_bound(tmp_path: Path) -> None:
    a, b = HostFlights(tmp_path), HostFlights(tmp_path)
    stuck = asyncio.Event()

    async def hang() -> str:
        await stuck.wait()
        return "late"

    upstream = Upstream(answer=hang)
    leader = asyncio.ensure_future(_run(a, upstream))
    await asyncio.sleep(0.05)
    upstream.answer = None
    started = time.monotonic()
    assert await _run(b, upstream, wait=0.3) == "v2"
    assert 0.3 <= time.monotonic() - started < 2.0
    stuck.set()
    assert await leader == "late"


async def test_an_outcome_of_an_earlier_flight_or_another_key_is_not_taken(
    tmp_path: Path,
) -> None:
    a = HostFlights(tmp_path)
    upstream = Upstream()
    assert await _run(a, upstream, key=("one",)) == "v1"
    assert await _run(a, upstream, key=("one",)) == "v2"  # ended before this one began
    path = a.path(("one",))
    record = json.loads(path.read_bytes())
    record["key"] = "two"
    record["ended"] = time.monotonic() + 60
    path.write_text(json.dumps(record))  # as if two keys hashed alike
    assert await _run(a, upstream, key=("one",)) == "v3"


async def test_lock_files_are_named_by_hash_and_swept_when_idle(tmp_path: Path) -> None:
    flights = HostFlights(tmp_path / "flights")
    upstream = Upstream()
    keys = [("tags", "../../etc/passwd"), ("tag", "a/b", "x\0y", "docker-manifest")]
    for key in keys:
        await _run(flights, upstream, key=key)
    files = sorted((tmp_path / "flights").iterdir())
    assert [p.name for p in files] == sorted(f"{hostflight._hash(k)}.lock" for k in keys)
    assert list(tmp_path.iterdir()) == [tmp_path / "flights"]
    old = time.time() - 3600
    os.utime(files[0], (old, old))
    os.utime(files[1], (old, old))
    busy = os.open(files[1], os.O_RDONLY)
    try:
        fcntl.flock(busy, fcntl.LOCK_EX)  # a flight in progress elsewhere
        assert hostflight.sweep(tmp_path / "flights", 300) == 1
    finally:
        os.close(busy)
    assert sorted((tmp_path / "flights").iterdir()) == [files[1]]
    assert await _run(flights, upstream, key=keys[0]) == f"v{upstream.asks}"  # made anew


async def test_a_lock_file_swept_under_a_waiter_is_not_a_second_token(tmp_path: Path) -> None:
    """A waiter that gets the lock of a file removed meanwhile (with no outcome: its
    leader was cancelled) must not lead beside the process that locked the path's new
    file: it opens that one and waits for its flight."""
    a, b, c = HostFlights(tmp_path), HostFlights(tmp_path), HostFlights(tmp_path)
    gate = asyncio.Event()

    async def answer() -> str:
        await gate.wait()
        return "answer"

    upstream = Upstream(answer=answer)
    first = asyncio.ensure_future(_run(a, upstream))
    await asyncio.sleep(0.05)
    waiter = asyncio.ensure_future(_run(b, upstream))  # waits on the first file
    await asyncio.sleep(0.05)
    os.unlink(a.path(("k",)))  # as a sweep would have, had it been idle
    second = asyncio.ensure_future(_run(c, upstream))  # the path's new file: its own token
    await asyncio.sleep(0.05)
    assert upstream.asks == 2
    first.cancel()  # leaves no outcome: the waiter gets a removed file's lock
    await asyncio.sleep(0.2)
    assert upstream.asks == 2  # it did not lead: it waits on the new file
    gate.set()
    assert await asyncio.gather(waiter, second) == ["answer", "answer"]
    assert upstream.asks == 2


def test_only_errors_rebuilt_the_one_way_are_shared() -> None:
    assert hostflight._error_record("k", UpstreamUnavailable("down")) is not None
    assert hostflight._error_record("k", TooManyUploads("x", reason="r")) is None
    assert "TooManyUploads" not in hostflight._ERRORS


def test_a_record_from_elsewhere_is_checked() -> None:
    began = time.monotonic()
    later = began + 1.0
    good = json.dumps({"key": "k", "ended": later, "value": "x"}).encode()
    assert hostflight._parse(good, "k", began) == {"key": "k", "ended": later, "value": "x"}
    for bad in (
        b"",
        b"not json",
        b"[]",
        json.dumps({"key": "k", "ended": later}).encode(),
        json.dumps({"key": "k", "ended": began - 1, "value": "x"}).encode(),
        json.dumps({"key": "k", "ended": later, "error": {"class": "os.system"}}).encode(),
        json.dumps({"key": "k", "ended": "soon", "value": "x"}).encode(),
    ):
        assert hostflight._parse(bad, "k", began) is None, bad


async def test_a_directory_it_cannot_use_only_costs_the_host_wide_single_flight(
    tmp_path: Path,
) -> None:
    """No lock file can be made (here: the directory is a file; in life a full or
    read-only disk): the work is done, not failed."""
    (tmp_path / "flights").write_text("not a directory")
    flights = HostFlights(tmp_path / "flights")
    upstream = Upstream()
    assert await _run(flights, upstream) == "v1"
    assert await _run(flights, upstream) == "v2"
