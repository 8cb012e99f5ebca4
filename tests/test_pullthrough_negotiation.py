"""Pull-through manifests honour ``Accept``: a tag resolves per negotiated representation.

registry:2 (2.8, Debian's docker-registry) is the upstream, behind a counting proxy. What
it answers for one tag depends on the client's ``Accept``:

- a Docker manifest list asked for without the list type is rewritten to its
  linux/amd64 image (by tag only; by digest the list is served whatever the Accept);
- an OCI index (or OCI manifest) asked for without its type is 404 MANIFEST_UNKNOWN,
  by tag and by digest.

Each test asks the upstream itself first and expects regmirror to give every client what
the upstream gives that client, whatever other clients asked before, within the TTL,
under a herd, from the stale cache and after a restart. Two choices of regmirror's own:
a digest is served as stored whatever the Accept (a digest has one representation;
registry:2's 404 for OCI types by digest is not copied, and the answer must not depend
on whether it was cached), and an upstream that ignores Accept does not make an old
client get an index (:class:`AcceptIgnoringProxy`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from regmirror.manifest import DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, OCI_INDEX, OCI_MANIFEST
from tests.support.oci_layout import Blob, Image, build_image
from tests.support.processes import ServerProcess, regmirror_server, run_regmirror
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    Countdown,
    UpstreamProxy,
    eventually,
    fetch_hashed,
    http,
    proxy,
    put_manifest,
    upstream_env,
)
from tests.support.upstream import push_blob, upstream_registry

__all__ = ["http", "proxy", "regmirror_server", "upstream_registry"]

Start = Callable[..., ServerProcess]
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What docker sends (image types and lists), and what a client that predates
# multi-platform images sends (no list or index type).
EVERYTHING = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
SINGLE = (DOCKER_MANIFEST, OCI_MANIFEST)
HERD = 40


@dataclass
class AcceptIgnoringProxy(UpstreamProxy):
    """An upstream that ignores ``Accept``: every manifest request reaches registry:2
    as if the client accepted every type, so a tag is always its list or index."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if "/manifests/" in request.path:
            headers = CIMultiDict(request.headers)
            headers["Accept"] = ", ".join(EVERYTHING)
            request = request.clone(headers=headers)
        return await super()._handle(request)


# -- content --------------------------------------------------------------------------


def docker_manifest(image: Image) -> Blob:
    """``image`` as a Docker schema2 manifest: the same config and layer bytes."""
    body = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {**image.config.descriptor(), "mediaType": DOCKER_CONFIG},
        "layers": [{**layer.descriptor(), "mediaType": DOCKER_LAYER} for layer in image.layers],
    }
    return Blob(DOCKER_MANIFEST, json.dumps(body, indent=3).encode())


@dataclass
class MultiPlatform:
    """A tag that is a list (or index) of per-platform manifests."""

    top: Blob
    children: dict[str, Blob]  # platform -> manifest


async def push_multi_platform(
    http: aiohttp.ClientSession, url: str, repo: str, tag: str, *, kind: str, seed: int
) -> MultiPlatform:
    """A Docker manifest list (``kind="docker"``) or an OCI index (``"oci"``) over two
    platforms, pushed as ``repo:tag`` with its images by digest."""
    children: dict[str, Blob] = {}
    entries = []
    for offset, arch in enumerate(("amd64", "arm64")):
        image = build_image(seed=seed + offset, layers=({f"bin/{arch}": 100},), architecture=arch)
        for blob in (image.config, *image.layers):
            await push_blob(http, url, repo, blob.data)
        manifest = docker_manifest(image) if kind == "docker" else image.manifest
        await put_manifest(http, url, repo, manifest.digest, manifest)
        children[f"linux/{arch}"] = manifest
        entries.append(manifest.descriptor(platform={"architecture": arch, "os": "linux"}))
    media_type = DOCKER_LIST if kind == "docker" else OCI_INDEX
    top = Blob(
        media_type,
        json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode(),
    )
    await put_manifest(http, url, repo, tag, top)
    return MultiPlatform(top, children)


# -- asking -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    digest: str
    media_type: str
    body: bytes = b""


async def ask(
    http: aiohttp.ClientSession,
    base: str,
    repo: str,
    reference: str,
    accept: tuple[str, ...],
    method: str = "GET",
) -> Answer:
    headers = {"Accept": ", ".join(accept)}
    url = f"{base}/v2/{repo}/manifests/{reference}"
    async with http.request(method, url, headers=headers) as response:
        body = await response.read()
        if response.status != 200:
            return Answer(response.status, "", "")
        media_type = response.headers["Content-Type"].split(";")[0]
        return Answer(200, response.headers["Docker-Content-Digest"], media_type, body)


async def upstream_answers(
    http: aiohttp.ClientSession, upstream: ServerProcess, repo: str, tag: str
) -> dict[tuple[str, ...], Answer]:
    """What registry:2 itself answers each kind of client, checked to differ (or the
    test would prove nothing)."""
    answers = {
        accept: await ask(http, upstream.url, repo, tag, accept) for accept in (EVERYTHING, SINGLE)
    }
    assert answers[EVERYTHING].status == 200 and answers[EVERYTHING].media_type in INDEX_TYPES
    assert answers[SINGLE] != answers[EVERYTHING]
    return answers


def assert_served(got: Answer, wanted: Answer, accept: tuple[str, ...]) -> None:
    assert (got.status, got.digest, got.media_type) == (
        wanted.status,
        wanted.digest,
        wanted.media_type,
    )
    if got.status == 200:
        assert got.body == wanted.body
        assert got.media_type in accept, "a media type the client's Accept excludes"


# -- the tests --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["docker", "oci"])
@pytest.mark.parametrize("first", [SINGLE, EVERYTHING], ids=["single-first", "index-first"])
async def test_each_client_gets_the_representation_its_accept_allows_within_the_ttl(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    kind: str,
    first: tuple[str, ...],
) -> None:
    repo = f"neg/{kind}-{'single' if first == SINGLE else 'index'}"
    pushed = await push_multi_platform(http, upstream_registry.url, repo, "v1", kind=kind, seed=7)
    wanted = await upstream_answers(http, upstream_registry, repo, "v1")
    if kind == "docker":  # registry:2 rewrites a list to its linux/amd64 image for old clients
        assert wanted[SINGLE].digest == pushed.children["linux/amd64"].digest
    else:  # and refuses an OCI index to them
        assert wanted[SINGLE].status == 404
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=300))

    second = EVERYTHING if first == SINGLE else SINGLE
    for accept in (first, second, first, second):
        assert_served(await ask(http, server.url, repo, "v1", accept), wanted[accept], accept)
        # HEAD and GET with the same Accept name the same manifest.
        head = await ask(http, server.url, repo, "v1", accept, method="HEAD")
        assert (head.status, head.digest, head.media_type) == (
            wanted[accept].status,
            wanted[accept].digest,
            wanted[accept].media_type,
        )
    # Within the TTL each representation was resolved upstream once, however often asked;
    # a 404 is not cached (a tag pushed upstream a moment later shows at once): the old
    # client's four requests for the OCI index each asked again.
    assert proxy.count("HEAD", "manifests") == (2 if kind == "docker" else 1 + 4)


async def test_a_herd_of_two_kinds_of_client_makes_one_upstream_resolution_per_kind(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    repo = "neg/herd"
    await push_multi_platform(http, upstream_registry.url, repo, "v1", kind="docker", seed=17)
    wanted = await upstream_answers(http, upstream_registry, repo, "v1")
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=300))
    proxy.manifest_gate = asyncio.Event()  # upstream requests wait until the herd is in
    sent = Countdown(2 * HERD)
    trace = aiohttp.TraceConfig()

    async def on_sent(*_: object) -> None:
        sent.arrive()

    trace.on_request_headers_sent.append(on_sent)
    url = f"{server.url}/v2/{repo}/manifests/v1"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace]
    ) as herd:
        clients = {
            accept: [
                asyncio.create_task(
                    fetch_hashed(herd, url, headers={"Accept": ", ".join(accept)}, keep=True)
                )
                for _ in range(HERD)
            ]
            for accept in (SINGLE, EVERYTHING)
        }
        await sent.wait()
        await asyncio.wait_for(proxy.manifest_held.wait(), BOUND)
        proxy.manifest_gate.set()
        for accept, tasks in clients.items():
            for fetched in await asyncio.wait_for(asyncio.gather(*tasks), BOUND):
                assert fetched.error is None and fetched.status == 200
                assert fetched.headers["Docker-Content-Digest"] == wanted[accept].digest
                assert fetched.body == wanted[accept].body

    assert proxy.count("HEAD", "manifests") == 2  # one resolution per representation
    assert proxy.count("GET", "manifests") == 2  # the list, and the amd64 image


async def test_stale_if_error_serves_each_representation_its_own_digest_also_after_a_restart(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    repo = "neg/stale"
    await push_multi_platform(http, upstream_registry.url, repo, "v1", kind="docker", seed=27)
    wanted = await upstream_answers(http, upstream_registry, repo, "v1")
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=1))
    for accept in (SINGLE, EVERYTHING):
        assert_served(await ask(http, server.url, repo, "v1", accept), wanted[accept], accept)

    await proxy.stop()

    async def both_served_stale() -> bool:
        for accept in (SINGLE, EVERYTHING):
            assert_served(await ask(http, server.url, repo, "v1", accept), wanted[accept], accept)
        return server.logs(None).count(":v1 stale") >= 2

    await eventually(both_served_stale)  # the TTL passed, the HEADs failed

    # A restarted host (nothing in memory) serves each representation from disk.
    with run_regmirror(
        tmp_path / "restarted", env=upstream_env(proxy.url, tag_ttl=1), data_dir=server.data_dir
    ) as restarted:
        for accept in (EVERYTHING, SINGLE, EVERYTHING):
            assert_served(
                await ask(http, restarted.url, repo, "v1", accept), wanted[accept], accept
            )


@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_an_index_from_an_upstream_that_ignores_accept_is_never_served_to_an_old_client(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    http: aiohttp.ClientSession,
    kind: str,
) -> None:
    """The upstream has what the old client reads (the linux/amd64 image); the client
    gets that, as registry:2 and Docker Hub would answer it, never the index."""
    repo = f"neg/ignoring-{kind}"
    pushed = await push_multi_platform(http, upstream_registry.url, repo, "v1", kind=kind, seed=47)
    amd64 = pushed.children["linux/amd64"]
    async with aiohttp.ClientSession() as session:
        ignoring = AcceptIgnoringProxy(target=upstream_registry.url, session=session)
        await ignoring.start()
        try:
            server = regmirror_server(env=upstream_env(ignoring.url))
            only = (amd64.media_type,)
            for accept in (only, EVERYTHING, only):
                wanted = pushed.top if accept == EVERYTHING else amd64
                for method in ("GET", "HEAD"):
                    got = await ask(http, server.url, repo, "v1", accept, method)
                    assert (got.status, got.digest, got.media_type) == (
                        200,
                        wanted.digest,
                        wanted.media_type,
                    )
                    assert got.body == (wanted.data if method == "GET" else b"")
            # A client that reads neither the index nor its images: nothing to serve.
            other = DOCKER_MANIFEST if kind == "oci" else OCI_MANIFEST
            got = await ask(http, server.url, repo, "v1", (other,))
            assert got.status == 404
        finally:
            await ignoring.stop()


@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_a_manifest_by_digest_is_the_same_whatever_the_accept_cached_or_not(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    kind: str,
) -> None:
    """A digest names one representation: nothing to negotiate. It is served as stored
    whatever the Accept (as registry:2 serves lists and Docker manifests by digest), and
    the answer does not depend on whether it was cached."""
    repo = f"neg/digest-{kind}"
    pushed = await push_multi_platform(http, upstream_registry.url, repo, "v1", kind=kind, seed=37)
    server = regmirror_server(env=upstream_env(proxy.url))
    wanted = Answer(200, pushed.top.digest, pushed.top.media_type, pushed.top.data)
    for accept in (SINGLE, EVERYTHING, SINGLE, ()):
        for method in ("GET", "HEAD"):
            got = await ask(http, server.url, repo, pushed.top.digest, accept, method)
            assert got == (
                wanted if method == "GET" else Answer(200, wanted.digest, wanted.media_type)
            )
    assert proxy.count("GET", "manifests") == 1


def test_accept_headers_normalise_to_the_manifest_types_they_name() -> None:
    from regmirror.negotiation import negotiate

    everything = negotiate(())
    assert everything.types == frozenset(EVERYTHING)
    assert negotiate(["*/*"]) == everything
    assert negotiate(["application/json", "text/html"]) == everything  # names none of ours
    assert negotiate(list(reversed(EVERYTHING))) == everything
    single = negotiate([DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_MANIFEST])
    assert single == negotiate([OCI_MANIFEST, DOCKER_MANIFEST])
    assert single.types == frozenset(SINGLE) and single != everything
    assert single.accept == (OCI_MANIFEST, DOCKER_MANIFEST)
    # Every representation has its own key, fit for a path component; keys are stable.
    keys = {negotiate([t]).key for t in EVERYTHING} | {single.key, everything.key}
    assert len(keys) == 6 and all("/" not in k and k not in ("", ".", "..") for k in keys)


def test_the_default_image_of_an_index_is_its_linux_amd64_entry_or_none() -> None:
    from regmirror.digest import Digest
    from regmirror.negotiation import default_image

    amd64 = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 1}
    arm64 = {**amd64, "digest": "sha256:" + "b" * 64}

    def index(*entries: object) -> bytes:
        return json.dumps({"schemaVersion": 2, "manifests": list(entries)}).encode()

    found = index(
        {**arm64, "platform": {"os": "linux", "architecture": "arm64"}},
        {**amd64, "platform": {"os": "linux", "architecture": "amd64", "variant": "v3"}},
    )
    assert default_image(found) == (OCI_MANIFEST, Digest.parse(amd64["digest"]))
    for garbage in (
        b"not json",
        b"[]",
        json.dumps({"manifests": "x"}).encode(),
        index({**arm64, "platform": {"os": "linux", "architecture": "arm64"}}),
        index(amd64),  # no platform
        index({**amd64, "digest": "md5:x", "platform": {"os": "linux", "architecture": "amd64"}}),
        index("entry", 5),
    ):
        assert default_image(garbage) is None, garbage
