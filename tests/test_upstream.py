"""The upstream client against real registries (registry:2 anonymous, with Basic auth,
and behind a Bearer token flow), and the router that picks an upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.errors import (
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnavailable,
)
from regmirror.upstream import Upstream, UpstreamRouter, basic_authorization, parse_challenge
from tests.support.http import session
from tests.support.processes import ServerProcess, free_port
from tests.support.upstream import (
    BASIC_PASSWORD,
    BASIC_USER,
    DOCKER_MANIFEST,
    CountingProxy,
    PushedImage,
    RedirectingStorage,
    TokenProxy,
    basic_registry,
    push_image,
    serve,
    upstream_registry,
)

__all__ = ["basic_registry", "session", "upstream_registry"]

BOUND = 30.0


@pytest.fixture
async def image(upstream_registry: ServerProcess, session: aiohttp.ClientSession) -> PushedImage:
    return await push_image(session, upstream_registry.url, "team/app", "v1")


def client(url: str, session: aiohttp.ClientSession, **settings: str) -> Upstream:
    return Upstream(UpstreamSettings(url=url, **settings), session)  # type: ignore[arg-type]


async def read(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# -- anonymous registry:2 ----------------------------------------------------------


async def test_get_manifest_by_tag(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    raw, media_type, digest = await client(upstream_registry.url, session).get_manifest(
        "team/app", "v1"
    )
    assert (raw, media_type, digest) == (image.manifest, DOCKER_MANIFEST, image.digest)


async def test_get_manifest_by_digest(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    fetched = await client(upstream_registry.url, session).get_manifest(
        "team/app", str(image.digest)
    )
    assert fetched.raw == image.manifest and fetched.digest == image.digest


async def test_head_manifest(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    head = await client(upstream_registry.url, session).head_manifest("team/app", "v1")
    assert head == (image.digest, DOCKER_MANIFEST, len(image.manifest))


async def test_unknown_manifest_is_manifest_unknown(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(upstream_registry.url, session)
    with pytest.raises(ManifestUnknown):
        await upstream.get_manifest("team/app", "nope")
    with pytest.raises(ManifestUnknown):
        await upstream.head_manifest("team/other", "v1")


async def test_open_blob_streams_it_from_an_offset(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(upstream_registry.url, session)
    size, chunks = await upstream.open_blob("team/app", image.layer_digest)
    assert size == len(image.layer) and await read(chunks) == image.layer
    size, chunks = await upstream.open_blob("team/app", image.layer_digest, offset=1000)
    assert size == len(image.layer) and await read(chunks) == image.layer[1000:]
    assert await upstream.stat_blob("team/app", image.layer_digest) == len(image.layer)


async def test_unknown_blob_is_blob_unknown(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(upstream_registry.url, session)
    missing = Digest.of(b"never pushed")
    with pytest.raises(BlobUnknown):
        await upstream.open_blob("team/app", missing)
    with pytest.raises(BlobUnknown):
        await upstream.stat_blob("team/app", missing)


async def test_a_blob_cut_short_raises_rather_than_ending(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    proxy = CountingProxy(upstream_registry.url, session, cut_after=1000)
    async with serve(proxy.app()) as url:
        _, chunks = await client(url, session).open_blob("team/app", image.layer_digest)
        with pytest.raises(UpstreamUnavailable):
            await read(chunks)


# -- Basic auth ---------------------------------------------------------------------


@pytest.fixture
async def basic_image(basic_registry: ServerProcess, session: aiohttp.ClientSession) -> PushedImage:
    auth = basic_authorization(BASIC_USER, BASIC_PASSWORD)
    return await push_image(session, basic_registry.url, "private/app", auth=auth)


async def test_basic_credentials_are_used(
    basic_registry: ServerProcess, session: aiohttp.ClientSession, basic_image: PushedImage
) -> None:
    upstream = client(basic_registry.url, session, username=BASIC_USER, password=BASIC_PASSWORD)
    assert (await upstream.get_manifest("private/app", "latest")).raw == basic_image.manifest
    _, chunks = await upstream.open_blob("private/app", basic_image.layer_digest)
    assert await read(chunks) == basic_image.layer


async def test_basic_auth_without_or_with_wrong_credentials_is_denied(
    basic_registry: ServerProcess, session: aiohttp.ClientSession, basic_image: PushedImage
) -> None:
    with pytest.raises(UpstreamDenied, match="none are configured"):
        await client(basic_registry.url, session).get_manifest("private/app", "latest")
    wrong = client(basic_registry.url, session, username=BASIC_USER, password="wrong")
    with pytest.raises(UpstreamDenied):
        await wrong.get_manifest("private/app", "latest")


# -- Bearer tokens --------------------------------------------------------------------


@pytest.fixture
async def tokens(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession
) -> AsyncIterator[TokenProxy]:
    proxy = TokenProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as url:
        proxy.url = url
        yield proxy


async def test_bearer_challenge_fetches_a_token_and_retries(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(tokens.url, session)
    assert (await upstream.get_manifest("team/app", "v1")).raw == image.manifest
    assert tokens.token_requests == 1
    assert tokens.token_scopes == [["repository:team/app:pull"]]


async def test_tokens_are_cached_per_scope(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(tokens.url, session)
    await upstream.get_manifest("team/app", "v1")
    await upstream.head_manifest("team/app", "v1")
    _, chunks = await upstream.open_blob("team/app", image.layer_digest)
    assert await read(chunks) == image.layer
    assert await upstream.stat_blob("team/app", image.layer_digest) == len(image.layer)
    assert tokens.token_requests == 1
    assert tokens.unauthorized == 1  # only the very first request met the challenge

    with pytest.raises(ManifestUnknown):
        await upstream.get_manifest("team/other", "v1")  # a new scope needs a new token
    assert tokens.token_requests == 2, tokens.token_scopes
    assert tokens.unauthorized == 1  # the realm was known: no second 401 round trip


async def test_concurrent_requests_share_one_token_request(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(tokens.url, session)
    results = await asyncio.wait_for(
        asyncio.gather(*(upstream.get_manifest("team/app", "v1") for _ in range(20))), BOUND
    )
    assert all(r.raw == image.manifest for r in results)
    assert tokens.token_requests == 1


async def test_an_expired_token_is_renewed(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    tokens.expires_in = None  # the spec's default lifetime: 60 s
    now = [1000.0]
    upstream = Upstream(UpstreamSettings(url=tokens.url), session, clock=lambda: now[0])
    await upstream.get_manifest("team/app", "v1")
    now[0] += 50
    await upstream.get_manifest("team/app", "v1")
    assert tokens.token_requests == 1
    now[0] += 11
    await upstream.get_manifest("team/app", "v1")
    assert tokens.token_requests == 2


async def test_a_token_the_registry_rejects_is_replaced_once(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    upstream = client(tokens.url, session)
    await upstream.get_manifest("team/app", "v1")
    tokens._tokens.clear()  # the registry forgets every token it issued
    await upstream.get_manifest("team/app", "v1")
    assert tokens.token_requests == 2


async def test_token_service_gets_basic_credentials(
    tokens: TokenProxy, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    tokens.require_basic = ("robot", "token-pass")
    authed = client(tokens.url, session, username="robot", password="token-pass")
    assert (await authed.get_manifest("team/app", "v1")).raw == image.manifest
    with pytest.raises(UpstreamDenied, match="anonymous token"):
        await client(tokens.url, session).get_manifest("team/app", "v1")


async def test_redirects_to_blob_storage_do_not_carry_authorization(
    tokens: TokenProxy,
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
    image: PushedImage,
) -> None:
    storage = RedirectingStorage(upstream_registry.url, session)
    async with serve(storage.app()) as storage_url:
        tokens.redirect_blobs_to = storage_url
        size, chunks = await client(tokens.url, session).open_blob("team/app", image.layer_digest)
        assert size == len(image.layer) and await read(chunks) == image.layer
    assert storage.authorizations == [None]


# -- failures ---------------------------------------------------------------------------


async def test_an_unreachable_upstream_is_unavailable(session: aiohttp.ClientSession) -> None:
    upstream = client(f"http://127.0.0.1:{free_port()}", session)
    with pytest.raises(UpstreamUnavailable) as raised:
        await upstream.get_manifest("team/app", "v1")
    assert isinstance(raised.value.__cause__, aiohttp.ClientError)


@pytest.fixture
async def misbehaving(session: aiohttp.ClientSession) -> AsyncIterator[str]:
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["name"].split("/")[0])
        return web.Response(status=code, headers={"Retry-After": "7"})

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"{" + b" " * (4 * 1024 * 1024) + b"}")

    async def liar(request: web.Request) -> web.Response:
        return web.Response(body=b'{"not": "what you asked for"}')

    app = web.Application()
    app.router.add_get("/v2/huge/manifests/{ref}", huge)
    app.router.add_get("/v2/liar/manifests/{ref}", liar)
    app.router.add_get("/v2/{name:.*}/manifests/{ref}", status)
    async with serve(app) as url:
        yield url


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, UpstreamUnavailable),
        (503, UpstreamUnavailable),
        (429, TooManyRequests),
        (403, UpstreamDenied),
    ],
)
async def test_upstream_statuses_become_our_errors(
    misbehaving: str, session: aiohttp.ClientSession, status: int, error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await client(misbehaving, session).get_manifest(f"{status}/app", "v1")
    if status == 429:
        assert raised.value.headers == {"Retry-After": "7"}  # type: ignore[attr-defined]


async def test_a_manifest_over_4_mib_is_refused(
    misbehaving: str, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(ManifestTooLarge):
        await client(misbehaving, session).get_manifest("huge", "v1")


async def test_a_manifest_not_matching_its_digest_is_refused(
    misbehaving: str, session: aiohttp.ClientSession
) -> None:
    wanted = Digest.of(b"something else")
    with pytest.raises(UpstreamUnavailable, match="has digest"):
        await client(misbehaving, session).get_manifest("liar", str(wanted))


# -- units: Docker Hub names, challenges, routing ---------------------------------------


@pytest.mark.parametrize(
    "url", ["https://registry-1.docker.io", "docker.io", "https://index.docker.io/"]
)
async def test_docker_hub_official_images_live_under_library(
    url: str, session: aiohttp.ClientSession
) -> None:
    hub = client(url, session)
    assert str(hub.url) == "https://registry-1.docker.io"
    assert hub.registry_host == "docker.io"
    assert hub.remote_name("nginx") == "library/nginx"
    assert hub.remote_name("grafana/grafana") == "grafana/grafana"


async def test_other_registries_keep_single_component_names(
    session: aiohttp.ClientSession,
) -> None:
    ghcr = client("https://ghcr.io/", session)
    assert ghcr.remote_name("nginx") == "nginx"
    assert ghcr.registry_host == "ghcr.io"


def test_bearer_challenges_parse() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull,push"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull,push",
    }
    basic = parse_challenge('Basic realm="test"')
    assert basic is not None and basic.scheme == "basic"


@pytest.fixture
async def router(session: aiohttp.ClientSession) -> UpstreamRouter:
    return UpstreamRouter.from_settings(
        [
            UpstreamSettings(url="https://ghcr.io", prefix="ghcr", ns="ghcr.io"),
            UpstreamSettings(url="https://quay.io", prefix="quay"),
            UpstreamSettings(url="https://registry.example:5000", prefix="ghcr/team"),
            UpstreamSettings(url="https://registry-1.docker.io"),
        ],
        session,
    )


def _route(router: UpstreamRouter, name: str, ns: str | None = None) -> tuple[str, str] | None:
    route = router.route(name, ns)
    return None if route is None else (route.upstream.registry_host, route.name)


async def test_a_prefix_routes_to_its_upstream_stripped(router: UpstreamRouter) -> None:
    assert _route(router, "ghcr/foo/bar") == ("ghcr.io", "foo/bar")
    assert _route(router, "quay/prometheus/node-exporter") == (
        "quay.io",
        "prometheus/node-exporter",
    )
    assert _route(router, "ghcr/team/app") == ("registry.example:5000", "app")  # longest


async def test_containerds_ns_routes_by_ns_or_host(router: UpstreamRouter) -> None:
    assert _route(router, "foo/bar", ns="ghcr.io") == ("ghcr.io", "foo/bar")
    assert _route(router, "nginx", ns="docker.io") == ("docker.io", "nginx")
    assert _route(router, "app", ns="registry.example:5000") == ("registry.example:5000", "app")


async def test_an_unknown_ns_routes_nowhere(router: UpstreamRouter) -> None:
    assert router.route("foo/bar", "gcr.io") is None


async def test_anything_else_goes_to_the_default(router: UpstreamRouter) -> None:
    assert _route(router, "nginx") == ("docker.io", "nginx")
    assert _route(router, "ghcrx/foo") == ("docker.io", "ghcrx/foo")
    assert _route(router, "ghcr") == ("docker.io", "ghcr")


async def test_without_a_default_unprefixed_names_route_nowhere(
    session: aiohttp.ClientSession,
) -> None:
    router = UpstreamRouter.from_settings(
        [UpstreamSettings(url="https://ghcr.io", prefix="ghcr")], session
    )
    assert router.route("nginx") is None
    assert _route(router, "ghcr/a/b") == ("ghcr.io", "a/b")


async def test_with_no_upstreams_nothing_routes(session: aiohttp.ClientSession) -> None:
    router = UpstreamRouter.from_settings([], session)
    assert router.route("nginx") is None
    assert router.route("nginx", "docker.io") is None
