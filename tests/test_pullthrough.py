"""Pull-through, end to end: real regmirror processes in front of a real registry:2 upstream.

The upstream is registry:2 behind a counting proxy (:class:`UpstreamProxy`) that can hold
bodies, cut connections, go down and come back; clients are aiohttp and skopeo. Every
test asserts what the upstream saw, not only what the client got.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cachetools import LRUCache

from regmirror import layout
from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.fill import Fills
from regmirror.links import LinkStore
from regmirror.pullthrough import PullThrough, cache_name
from regmirror.storage.driver import StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.stored import StoredBlob
from regmirror.upstream import Route, Upstream, UpstreamRouter
from tests.support.oci_layout import build_image, build_index, read_layout
from tests.support.processes import ServerProcess, regmirror_server, run_regmirror
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    Countdown,
    UpstreamProxy,
    error_code,
    eventually,
    fetch_hashed,
    http,
    proxy,
    push_image_to,
    push_index_to,
    put_manifest,
    stored_files,
    upstream_env,
    upstream_proxy,
)
from tests.support.s3 import MotoS3, moto_s3
from tests.support.skopeo import ACCEPT, Skopeo, skopeo
from tests.support.upstream import (
    BASIC_PASSWORD,
    BASIC_USER,
    TokenProxy,
    push_blob,
    serve,
    upstream_registry,
)

__all__ = ["http", "moto_s3", "proxy", "regmirror_server", "skopeo", "upstream_registry"]

MiB = 1024 * 1024
HERD = 100

Start = Callable[..., ServerProcess]


def mirror_of(start: Start, proxy: UpstreamProxy, **settings: object) -> ServerProcess:
    """regmirror pulling through from ``proxy`` (its upstream 0)."""
    return start(env=upstream_env(proxy.url, **settings))


async def get_manifest(
    session: aiohttp.ClientSession,
    server: ServerProcess,
    repo: str,
    reference: str,
    query: str = "",
) -> tuple[int, bytes, str]:
    async with session.get(
        f"{server.url}/v2/{repo}/manifests/{reference}{query}", headers={"Accept": ACCEPT}
    ) as response:
        return (
            response.status,
            await response.read(),
            response.headers.get("Docker-Content-Digest", ""),
        )


async def metric(session: aiohttp.ClientSession, server: ServerProcess, name: str) -> float:
    async with session.get(f"{server.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


# -- 1. herds --------------------------------------------------------------------------


async def test_a_herd_of_blob_gets_makes_one_upstream_get(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(32 * MiB)
    digest = await push_blob(http, upstream_registry.url, "herd/blob", data)
    server = mirror_of(regmirror_server, proxy)
    proxy.hold_after = MiB  # the fill stays in flight until every client has joined it
    headers = Countdown(HERD)
    url = f"{server.url}/v2/herd/blob/blobs/{digest}"

    clients = [
        asyncio.create_task(fetch_hashed(http, url, on_headers=headers.arrive)) for _ in range(HERD)
    ]
    await headers.wait()
    proxy.release.set()
    results = await asyncio.wait_for(asyncio.gather(*clients), BOUND * 2)

    assert proxy.blob_gets == 1
    assert proxy.count("HEAD", "blobs") == 1
    for fetched in results:
        assert fetched.error is None
        assert fetched.status == 200
        assert (fetched.size, fetched.digest) == (len(data), str(digest))
    assert await metric(http, server, "regmirror_fills_started_total") == 1
    assert await metric(http, server, "regmirror_fill_waiters_total") == HERD - 1
    assert stored_files(server.data_dir, digest) == [server.data_dir / layout.blob_data(digest)]


async def test_a_herd_of_manifest_gets_makes_one_upstream_get(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=101, layers=({"a": 10},))
    await push_image_to(http, upstream_registry.url, "herd/manifest", image, "v1")
    server = regmirror_server(env=upstream_env(proxy.url))
    proxy.manifest_gate = asyncio.Event()  # the first upstream request waits for the herd
    sent = Countdown(HERD)
    trace = aiohttp.TraceConfig()

    async def on_sent(*_: Any) -> None:
        sent.arrive()

    trace.on_request_headers_sent.append(on_sent)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace]
    ) as herd:
        url = f"{server.url}/v2/herd/manifest/manifests/v1"
        clients = [
            asyncio.create_task(fetch_hashed(herd, url, headers={"Accept": ACCEPT}))
            for _ in range(HERD)
        ]
        await sent.wait()
        await asyncio.wait_for(proxy.manifest_held.wait(), BOUND)
        proxy.manifest_gate.set()
        results = await asyncio.wait_for(asyncio.gather(*clients), BOUND)

    assert proxy.count("GET", "manifests") == 1
    assert proxy.count("HEAD", "manifests") == 1
    for fetched in results:
        assert fetched.error is None and fetched.status == 200
        assert fetched.digest == image.manifest.digest
        assert fetched.headers["Docker-Content-Digest"] == image.manifest.digest


# -- 2. an upstream that fails mid-stream ------------------------------------------------


async def test_an_upstream_cut_mid_stream_fails_every_waiter_and_stores_nothing(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(16 * MiB)
    digest = await push_blob(http, upstream_registry.url, "cut/blob", data)
    server = mirror_of(regmirror_server, proxy)
    proxy.hold_after, proxy.cut_after = MiB, 4 * MiB
    headers = Countdown(HERD)
    url = f"{server.url}/v2/cut/blob/blobs/{digest}"

    clients = [
        asyncio.create_task(fetch_hashed(http, url, on_headers=headers.arrive)) for _ in range(HERD)
    ]
    await headers.wait()
    proxy.release.set()  # ...and the proxy cuts the connection 3 MiB later
    results = await asyncio.wait_for(asyncio.gather(*clients), BOUND)

    assert proxy.blob_gets == 1
    for fetched in results:
        assert fetched.status == 200  # the headers went out before the upstream failed
        assert isinstance(fetched.error, aiohttp.ClientPayloadError), fetched
        assert fetched.size < len(data)
    assert stored_files(server.data_dir, digest) == []
    assert list((server.data_dir / "fills").glob("*")) == []
    assert await metric(http, server, 'regmirror_fills_total{result="source_error"}') == 1

    # The upstream recovers: the next request starts a new fill, and it succeeds.
    proxy.hold_after = proxy.cut_after = None
    retry = await fetch_hashed(http, url)
    assert retry.error is None and retry.status == 200
    assert (retry.size, retry.digest) == (len(data), str(digest))
    assert proxy.blob_gets == 2
    assert stored_files(server.data_dir, digest) == [server.data_dir / layout.blob_data(digest)]


async def test_an_upstream_down_before_the_body_is_a_503_and_a_later_retry_succeeds(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(MiB + 3)
    digest = await push_blob(http, upstream_registry.url, "down/blob", data)
    server = mirror_of(regmirror_server, proxy)
    await proxy.stop()
    async with http.get(f"{server.url}/v2/down/blob/blobs/{digest}") as response:
        assert response.status == 503
        assert await error_code(response) == "UNAVAILABLE"
    assert stored_files(server.data_dir, digest) == []
    async with http.get(f"{server.url}/metrics") as response:
        counted = [
            line
            for line in (await response.text()).splitlines()
            if line.startswith("regmirror_upstream_errors_total{") and 'kind="unavailable"' in line
        ]
    assert len(counted) == 1 and float(counted[0].split()[-1]) >= 1, counted

    await proxy.start()
    retry = await fetch_hashed(http, f"{server.url}/v2/down/blob/blobs/{digest}")
    assert retry.error is None and retry.status == 200 and retry.digest == str(digest)
    assert proxy.blob_gets == 1


# -- 3. a real client through a token-authenticated upstream ----------------------------


@pytest.fixture
async def token_upstream(
    upstream_registry: ServerProcess, http: aiohttp.ClientSession
) -> AsyncIterator[TokenProxy]:
    """registry:2 behind a Bearer token flow whose token service wants Basic credentials."""
    token = TokenProxy(
        target=upstream_registry.url, session=http, require_basic=(BASIC_USER, BASIC_PASSWORD)
    )
    async with serve(token.app()) as url:
        token.url = url
        yield token


def token_mirror(start: Start, token: TokenProxy) -> ServerProcess:
    return start(env=upstream_env(token.url, username=BASIC_USER, password=BASIC_PASSWORD))


async def test_skopeo_pulls_an_image_through_a_token_authenticated_upstream(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    token_upstream: TokenProxy,
    http: aiohttp.ClientSession,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    image = build_image(seed=31)
    await push_image_to(http, upstream_registry.url, "sk/app", image, "v1")
    server = token_mirror(regmirror_server, token_upstream)

    out = tmp_path / "out"
    source = f"docker://{server.host_port}/sk/app:v1"
    await asyncio.to_thread(skopeo.copy, source, f"oci:{out}:v1", "--preserve-digests")

    pulled = read_layout(out)
    assert pulled.ref("v1")["digest"] == image.manifest.digest
    assert pulled.blobs == {image.manifest.digest: image.manifest.data, **image.blobs}
    assert token_upstream.unauthorized >= 1  # it was challenged...
    assert token_upstream.token_requests >= 1  # ...and fetched a token with our credentials


async def test_skopeo_pulls_a_multi_platform_index_with_all(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    token_upstream: TokenProxy,
    http: aiohttp.ClientSession,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    index = build_index(("linux/amd64", "linux/arm64", "linux/arm/v7"), seed=40)
    await push_index_to(http, upstream_registry.url, "sk/multi", index, "v1")
    server = token_mirror(regmirror_server, token_upstream)

    out = tmp_path / "out"
    source = f"docker://{server.host_port}/sk/multi:v1"
    await asyncio.to_thread(skopeo.copy, source, f"oci:{out}:v1", "--all", "--preserve-digests")

    pulled = read_layout(out)
    assert pulled.ref("v1")["digest"] == index.index.digest
    assert pulled.blobs == {index.index.digest: index.index.data, **index.blobs}


# -- 4. tags: TTL, revalidation, stale-if-error -----------------------------------------


async def test_a_moved_tag_is_served_old_until_its_ttl_then_new(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    ttl = 3.0
    old, new = build_image(seed=51, layers=({"a": 1},)), build_image(seed=52, layers=({"b": 2},))
    await push_image_to(http, upstream_registry.url, "tags/moved", old, "t")
    server = mirror_of(regmirror_server, proxy, tag_ttl=ttl)

    resolved = time.monotonic()  # the tag is resolved no earlier than this
    assert (await get_manifest(http, server, "tags/moved", "t"))[2] == old.manifest.digest
    await push_image_to(http, upstream_registry.url, "tags/moved", new, "t")
    served = await get_manifest(http, server, "tags/moved", "t")
    assert time.monotonic() - resolved < ttl, "pushing took longer than the TTL"
    assert served[2] == old.manifest.digest

    async def moved() -> bool:
        status, body, digest = await get_manifest(http, server, "tags/moved", "t")
        assert status == 200
        return digest == new.manifest.digest and body == new.manifest.data

    await eventually(moved, timeout=ttl + BOUND / 2)
    assert time.monotonic() - resolved >= ttl
    assert proxy.count("HEAD", "manifests") == 2  # first resolution, then the one that moved
    assert proxy.count("GET", "manifests") == 2  # each digest fetched once


async def test_revalidating_an_unchanged_tag_is_a_head_and_no_get(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=53, layers=({"c": 3},))
    await push_image_to(http, upstream_registry.url, "tags/same", image, "t")
    server = mirror_of(regmirror_server, proxy, tag_ttl=1)
    assert (await get_manifest(http, server, "tags/same", "t"))[2] == image.manifest.digest
    assert (proxy.count("HEAD", "manifests"), proxy.count("GET", "manifests")) == (1, 1)

    async def revalidated() -> bool:
        status, body, _ = await get_manifest(http, server, "tags/same", "t")
        assert status == 200 and body == image.manifest.data
        return proxy.count("HEAD", "manifests") >= 2

    await eventually(revalidated)
    assert proxy.count("GET", "manifests") == 1


async def test_with_the_upstream_down_the_last_known_tag_and_cached_digests_are_served(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = build_image(seed=54, layers=({"d": 4000},))
    repo = "tags/stale"
    await push_image_to(http, upstream_registry.url, repo, image, "t")
    server = mirror_of(regmirror_server, proxy, tag_ttl=1)
    assert (await get_manifest(http, server, repo, "t"))[2] == image.manifest.digest
    blob_urls = {d: f"{server.url}/v2/{repo}/blobs/{d}" for d in image.blobs}
    for url in blob_urls.values():
        assert (await fetch_hashed(http, url)).status == 200

    await proxy.stop()

    async def served_stale() -> bool:
        status, body, _ = await get_manifest(http, server, repo, "t")
        assert status == 200 and body == image.manifest.data
        return f"{repo}:t stale" in server.logs(None)

    await eventually(served_stale)  # the TTL passed, the HEAD failed, the old digest served
    status, body, _ = await get_manifest(http, server, repo, image.manifest.digest)
    assert (status, body) == (200, image.manifest.data)
    for digest, url in blob_urls.items():
        fetched = await fetch_hashed(http, url)
        assert (fetched.status, fetched.digest) == (200, digest)

    async with http.get(f"{server.url}/v2/{repo}/manifests/unknown-tag") as response:
        assert response.status == 503
        assert await error_code(response) == "UNAVAILABLE"

    # A restarted host (nothing in memory) serves the tag it recorded on disk.
    with run_regmirror(
        tmp_path / "restarted", env=upstream_env(proxy.url, tag_ttl=1), data_dir=server.data_dir
    ) as restarted:
        status, body, _ = await get_manifest(http, restarted, repo, "t")
        assert (status, body) == (200, image.manifest.data)


# -- 5. no upstream ------------------------------------------------------------------


async def test_without_upstreams_a_miss_is_404_and_nothing_goes_out(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=61, layers=({"e": 5},))
    await push_image_to(http, upstream_registry.url, "none/app", image, "v1")
    server = regmirror_server()
    ns = f"?ns={proxy.host_port}"  # containerd naming the upstream changes nothing

    for query in ("", ns):
        status, body, _ = await get_manifest(http, server, "none/app", "v1", query)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        url = f"{server.url}/v2/none/app/blobs/{image.layers[0].digest}{query}"
        async with http.get(url) as response:
            assert response.status == 404
            assert await error_code(response) == "BLOB_UNKNOWN"
    assert proxy.requests == []


# -- 6. routing ----------------------------------------------------------------------


async def test_a_prefix_routes_to_its_upstream_with_the_prefix_stripped(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=62, layers=({"f": 6},))
    await push_image_to(http, upstream_registry.url, "route/app", image, "v1")
    server = mirror_of(regmirror_server, proxy, prefix="up")

    status, body, _ = await get_manifest(http, server, "up/route/app", "v1")
    assert (status, body) == (200, image.manifest.data)
    layer = image.layers[0]
    fetched = await fetch_hashed(http, f"{server.url}/v2/up/route/app/blobs/{layer.digest}")
    assert (fetched.status, fetched.digest) == (200, layer.digest)
    assert {path for _, path in proxy.requests} >= {
        "/v2/route/app/manifests/v1",
        f"/v2/route/app/blobs/{layer.digest}",
    }
    assert all(path.startswith("/v2/route/app/") for _, path in proxy.requests)

    # Without the prefix the name is nobody's: no default upstream, nothing goes out.
    seen = len(proxy.requests)
    status, _, _ = await get_manifest(http, server, "route/app", "v1")
    assert status == 404
    assert len(proxy.requests) == seen


async def test_containerds_ns_picks_the_upstream_by_ns_or_host(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=63, layers=({"g": 7},))
    await push_image_to(http, upstream_registry.url, "ns/app", image, "v1")
    async with upstream_proxy(upstream_registry.url) as named:
        env = {
            **upstream_env(proxy.url, 0, prefix="up"),
            **upstream_env(named.url, 1, ns="mirror.test"),
        }
        server = regmirror_server(env=env)

        # By the ns setting: the name is used as is.
        status, body, _ = await get_manifest(http, server, "ns/app", "v1", "?ns=mirror.test")
        assert (status, body) == (200, image.manifest.data)
        assert named.count("GET", "manifests") == 1 and proxy.requests == []

        # By the upstream's own host (no prefix is stripped or needed).
        query = f"?ns={proxy.host_port}"
        status, body, _ = await get_manifest(http, server, "ns/app", "v1", query)
        assert (status, body) == (200, image.manifest.data)
        assert proxy.count("HEAD", "manifests") == 1
        layer = image.layers[0].digest
        fetched = await fetch_hashed(http, f"{server.url}/v2/ns/app/blobs/{layer}{query}")
        assert (fetched.status, fetched.digest) == (200, layer)
        assert proxy.blob_gets == 1

        # An ns nobody answers is a miss, never another registry's answer.
        before = len(proxy.requests), len(named.requests)
        status, _, _ = await get_manifest(http, server, "ns/app", "v1", "?ns=elsewhere.test")
        assert status == 404
        async with http.get(f"{server.url}/v2/ns/app/blobs/{layer}?ns=elsewhere.test") as r:
            assert r.status == 404
        assert (len(proxy.requests), len(named.requests)) == before


async def test_pushed_content_wins_over_the_upstream(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    upstreams, ours = build_image(seed=64, layers=({"h": 8},)), build_image(seed=65)
    await push_image_to(http, upstream_registry.url, "win/app", upstreams, "v1")
    server = mirror_of(regmirror_server, proxy)
    await push_image_to(http, server.url, "win/app", ours, "v1")

    status, body, digest = await get_manifest(http, server, "win/app", "v1")
    assert (status, body, digest) == (200, ours.manifest.data, ours.manifest.digest)
    for blob_digest, data in ours.blobs.items():
        fetched = await fetch_hashed(http, f"{server.url}/v2/win/app/blobs/{blob_digest}")
        assert (fetched.status, fetched.digest, fetched.size) == (200, blob_digest, len(data))
    assert proxy.count("HEAD", "manifests") + proxy.count("GET", "manifests") == 0
    assert proxy.count("HEAD", "blobs") + proxy.blob_gets == 0


async def test_a_push_may_rely_on_layers_the_upstream_has(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    """Like docker push: the client HEADs each layer, skips those that exist (here: the
    upstream's base layers), and the manifest PUT must still find them in the repository."""
    image = build_image(seed=66)
    for layer in image.layers:
        await push_blob(http, upstream_registry.url, "base/app", layer.data)
    server = mirror_of(regmirror_server, proxy)
    for layer in image.layers:
        async with http.head(f"{server.url}/v2/base/app/blobs/{layer.digest}") as response:
            assert response.status == 200
    await push_blob(http, server.url, "base/app", image.config.data)
    await put_manifest(http, server.url, "base/app", "v1", image.manifest)

    pushed = server.data_dir / "docker/registry/v2/repositories/base/app/_layers/sha256"
    assert {p.name for p in pushed.iterdir()} == {
        b.digest.removeprefix("sha256:") for b in (image.config, *image.layers)
    }
    status, body, _ = await get_manifest(http, server, "base/app", "v1")
    assert (status, body) == (200, image.manifest.data)
    for layer in image.layers:
        fetched = await fetch_hashed(http, f"{server.url}/v2/base/app/blobs/{layer.digest}")
        assert (fetched.status, fetched.digest) == (200, layer.digest)


async def test_docker_hub_names_and_their_library_form_share_one_cache() -> None:
    """Unit level (no internet): ``nginx`` and ``library/nginx`` are one Docker Hub repository."""
    async with aiohttp.ClientSession() as session:  # never used: nothing is requested
        hub = Upstream(UpstreamSettings(url="docker.io"), session)
        router = UpstreamRouter([hub])
        short, long = router.route("nginx"), router.route("library/nginx")
        by_ns = router.route("nginx", ns="docker.io")
        assert short is not None and long is not None and by_ns is not None
        assert hub.remote_name(short.name) == hub.remote_name(long.name) == "library/nginx"
        assert cache_name(short) == cache_name(long) == cache_name(by_ns)
        assert cache_name(short) == "docker.io/library/nginx"


# -- 7. repository links and ranges -------------------------------------------------


async def test_a_pulled_blob_is_not_served_through_an_unrelated_repository(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=71, layers=({"i": 9},))
    await push_image_to(http, upstream_registry.url, "leak/app", image, "v1")
    server = mirror_of(regmirror_server, proxy, prefix="up")
    mine = build_image(seed=72, layers=({"j": 10},))
    await push_image_to(http, server.url, "mine/app", mine, "v1")  # a pushed, non-upstream repo

    layer = image.layers[0].digest
    fetched = await fetch_hashed(http, f"{server.url}/v2/up/leak/app/blobs/{layer}")
    assert (fetched.status, fetched.digest) == (200, layer)
    seen = len(proxy.requests)
    for repo in ("mine/app", "other/app"):
        async with http.get(f"{server.url}/v2/{repo}/blobs/{layer}") as response:
            assert response.status == 404
            assert await error_code(response) == "BLOB_UNKNOWN"
    assert len(proxy.requests) == seen
    # An upstream repository that does not hold it: the upstream says no, so do we.
    async with http.get(f"{server.url}/v2/up/other/app/blobs/{layer}") as response:
        assert response.status == 404
        assert await error_code(response) == "BLOB_UNKNOWN"


async def test_range_requests_are_served_during_a_fill_and_after(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    size = 8 * MiB + 17
    data = os.urandom(size)
    digest = await push_blob(http, upstream_registry.url, "range/blob", data)
    server = mirror_of(regmirror_server, proxy)
    url = f"{server.url}/v2/range/blob/blobs/{digest}"
    proxy.hold_after = MiB

    async def ranged(spec: str) -> tuple[int, str, bytes]:
        async with http.get(url, headers={"Range": spec}) as response:
            return response.status, response.headers.get("Content-Range", ""), await response.read()

    # Bytes already filled start at once, but no body ends before the digest is verified.
    filled = asyncio.create_task(ranged("bytes=100-1099"))
    beyond = asyncio.create_task(ranged(f"bytes={4 * MiB}-{4 * MiB + 9}"))
    suffix = asyncio.create_task(ranged("bytes=-10"))
    await asyncio.wait_for(proxy.held.wait(), BOUND)
    await asyncio.sleep(0)  # let them start: they must wait for the fill's end
    assert not filled.done() and not beyond.done() and not suffix.done()
    proxy.release.set()
    assert await asyncio.wait_for(filled, BOUND) == (206, f"bytes 100-1099/{size}", data[100:1100])
    assert await asyncio.wait_for(beyond, BOUND) == (
        206,
        f"bytes {4 * MiB}-{4 * MiB + 9}/{size}",
        data[4 * MiB : 4 * MiB + 10],
    )
    assert await asyncio.wait_for(suffix, BOUND) == (
        206,
        f"bytes {size - 10}-{size - 1}/{size}",
        data[-10:],
    )
    # From the store (sendfile), once filled.
    assert await ranged("bytes=5-9") == (206, f"bytes 5-9/{size}", data[5:10])
    assert proxy.blob_gets == 1


# -- 8. write-back to S3 -----------------------------------------------------------


def s3_env(moto: MotoS3, bucket: str) -> dict[str, str]:
    return {
        "REGMIRROR_S3__BUCKET": bucket,
        "REGMIRROR_S3__ENDPOINT_URL": moto.endpoint_url,
        "REGMIRROR_S3__PATH_STYLE": "true",
        "REGMIRROR_S3__REGION": "us-east-1",
        "REGMIRROR_S3__WRITE_BACK": "true",
    }


async def test_write_back_stores_pulls_in_s3_where_another_host_reads_them(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    moto_s3: MotoS3,
) -> None:
    image = build_image(seed=81, layers=({"k": 2 * MiB}, {"l": 11}))
    await push_image_to(http, upstream_registry.url, "wb/app", image, "v1")
    bucket = moto_s3.new_bucket()
    first = regmirror_server(env={**upstream_env(proxy.url), **s3_env(moto_s3, bucket)})

    assert (await get_manifest(http, first, "wb/app", "v1"))[2] == image.manifest.digest
    for digest in image.blobs:
        fetched = await fetch_hashed(http, f"{first.url}/v2/wb/app/blobs/{digest}")
        assert (fetched.status, fetched.digest) == (200, digest)
    assert proxy.blob_gets == len(image.blobs)

    wanted = {layout.blob_data(Digest.parse(d)) for d in [image.manifest.digest, *image.blobs]}

    async def written_back() -> bool:
        return wanted <= set(await asyncio.to_thread(moto_s3.keys, bucket))

    await eventually(written_back)
    s3 = moto_s3.client()
    for digest, data in {image.manifest.digest: image.manifest.data, **image.blobs}.items():
        key = layout.blob_data(Digest.parse(digest))
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data

    # Another host on the same bucket, with an upstream of its own that counts.
    async with upstream_proxy(upstream_registry.url) as other_proxy:
        second = regmirror_server(env={**upstream_env(other_proxy.url), **s3_env(moto_s3, bucket)})
        status, body, _ = await get_manifest(http, second, "wb/app", "v1")
        assert (status, body) == (200, image.manifest.data)
        for digest in image.blobs:
            fetched = await fetch_hashed(http, f"{second.url}/v2/wb/app/blobs/{digest}")
            assert (fetched.status, fetched.digest) == (200, digest)
        assert other_proxy.blob_gets == 0
        assert other_proxy.count("GET", "manifests") == 0  # the manifest came from S3 too


async def test_a_tag_served_within_its_ttl_writes_nothing(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    """A pull by tag inside the TTL is memory only: no upstream request, no link rewritten."""
    image = build_image(seed=55, layers=({"m": 12},))
    await push_image_to(http, upstream_registry.url, "tags/quiet", image, "t")
    server = mirror_of(regmirror_server, proxy)
    assert (await get_manifest(http, server, "tags/quiet", "t"))[2] == image.manifest.digest
    link = (
        server.data_dir
        / "proxy"
        / layout.tag_current_link(f"{proxy.host_port.replace(':', '-')}/tags/quiet", "t")
    )
    recorded = link.stat()
    for _ in range(20):
        assert (await get_manifest(http, server, "tags/quiet", "t"))[1] == image.manifest.data
    assert (link.stat().st_ino, link.stat().st_mtime_ns) == (
        recorded.st_ino,
        recorded.st_mtime_ns,
    )
    assert len(proxy.requests) == 2  # the HEAD that resolved the tag, the GET by digest


class UnreachableS3:
    """A shared store that is down: every call fails as an S3 outage does."""

    async def _down(self, *_: object, **__: object) -> Any:
        raise StorageUnavailable("S3 is down (test)")

    get = put = stat = put_file = _down

    def reader(self, *_: object) -> Any:
        raise StorageUnavailable("S3 is down (test)")


async def test_an_unreachable_s3_does_not_stop_a_pull_through(
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Unit level: S3 is a shortcut and a copy for other hosts; the upstream still serves."""
    image = build_image(seed=91, layers=({"n": 300_000},))
    await push_image_to(http, upstream_registry.url, "s3down/app", image, "v1")
    local = FilesystemDriver(tmp_path)
    fills = Fills(local, timeout=BOUND)
    pull = PullThrough(
        local=local,
        links=LinkStore(FilesystemDriver(tmp_path / "proxy")),
        fills=fills,
        manifests=LRUCache(64),
        shared=UnreachableS3(),  # type: ignore[arg-type]
        write_back=True,
    )
    route = Route(Upstream(UpstreamSettings(url=proxy.url), http), "s3down/app")
    try:
        assert (await pull.manifest(route, "v1", ())).raw == image.manifest.data
        for digest, data in image.blobs.items():
            found = await pull.blob(route, Digest.parse(digest))
            path = found.path if isinstance(found, StoredBlob) else await found.wait()
            assert path.read_bytes() == data
    finally:
        await pull.close()
        await fills.close()
    assert proxy.blob_gets == len(image.blobs)


async def test_a_head_of_an_uncached_blob_asks_its_size_and_copies_nothing(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(3 * MiB + 5)
    digest = await push_blob(http, upstream_registry.url, "head/blob", data)
    server = mirror_of(regmirror_server, proxy)
    for _ in range(2):
        async with http.head(f"{server.url}/v2/head/blob/blobs/{digest}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == str(digest)
    assert proxy.blob_gets == 0
    assert stored_files(server.data_dir, digest) == []

    fetched = await fetch_hashed(http, f"{server.url}/v2/head/blob/blobs/{digest}")
    assert (fetched.status, fetched.digest, fetched.size) == (200, str(digest), len(data))
    assert proxy.blob_gets == 1
