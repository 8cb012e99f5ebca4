"""Upstream credentials stay with their upstream (CVE-2026-33540 was a registry that sent
them to whatever token realm a challenge named).

The upstream here is a real registry:2 behind :class:`TokenProxy`; its token service is
served on a second port, so every challenge names a realm on another origin. The token
service records the Authorization header of every request it gets.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from regmirror.config import UpstreamSettings
from regmirror.errors import UpstreamDenied
from regmirror.upstream import Upstream, basic_authorization
from tests.support.http import session
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import (
    PushedImage,
    RedirectingStorage,
    TokenProxy,
    push_image,
    serve,
    upstream_registry,
)

__all__ = ["session", "upstream_registry"]

USER, PASSWORD = "robot", "realm-test-password"
CREDENTIALS = basic_authorization(USER, PASSWORD)


@dataclass
class ForeignRealm:
    """A registry whose token realm is on another port, and what that realm was sent."""

    registry_url: str
    realm_url: str
    proxy: TokenProxy
    authorizations: list[str | None] = field(default_factory=list)

    @property
    def realm_host_port(self) -> str:
        return URL(self.realm_url).raw_authority


@pytest.fixture
async def image(upstream_registry: ServerProcess, session: aiohttp.ClientSession) -> PushedImage:
    return await push_image(session, upstream_registry.url, "team/app", "v1")


@pytest.fixture
async def foreign(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession
) -> AsyncIterator[ForeignRealm]:
    proxy = TokenProxy(upstream_registry.url, session)
    realm_app = proxy.app()
    seen: list[str | None] = []

    @web.middleware
    async def record(request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
        seen.append(request.headers.get("Authorization"))
        return await handler(request)  # type: ignore[no-any-return]

    realm_app.middlewares.append(record)
    async with serve(proxy.app()) as registry_url, serve(realm_app) as realm_url:
        proxy.url = realm_url  # the challenge names realm_url/token
        yield ForeignRealm(registry_url, realm_url, proxy, seen)


def upstream(url: str, session: aiohttp.ClientSession, **settings: object) -> Upstream:
    return Upstream(UpstreamSettings(url=url, **settings), session)  # type: ignore[arg-type]


async def test_credentials_never_go_to_a_token_realm_on_another_port(
    foreign: ForeignRealm, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    client = upstream(foreign.registry_url, session, username=USER, password=PASSWORD)
    with pytest.raises(UpstreamDenied, match="token_realms"):
        await client.get_manifest("team/app", "v1")
    assert foreign.authorizations == []
    assert foreign.proxy.token_requests == 0


@pytest.mark.parametrize("form", ["{host_port}", "http://{host_port}", "http://{host_port}/"])
async def test_a_token_realm_listed_in_token_realms_gets_the_credentials(
    foreign: ForeignRealm, session: aiohttp.ClientSession, image: PushedImage, form: str
) -> None:
    foreign.proxy.require_basic = (USER, PASSWORD)
    listed = form.format(host_port=foreign.realm_host_port)
    client = upstream(
        foreign.registry_url, session, username=USER, password=PASSWORD, token_realms=[listed]
    )
    assert (await client.get_manifest("team/app", "v1")).raw == image.manifest
    assert foreign.authorizations == [CREDENTIALS]


@pytest.mark.parametrize("listed", ["https://{host_port}", "127.0.0.2:{port}", "{host}"])
async def test_a_realm_matches_token_realms_by_scheme_host_and_port(
    foreign: ForeignRealm, session: aiohttp.ClientSession, image: PushedImage, listed: str
) -> None:
    realm = URL(foreign.realm_url)
    entry = listed.format(host_port=foreign.realm_host_port, port=realm.port, host=realm.host)
    client = upstream(
        foreign.registry_url, session, username=USER, password=PASSWORD, token_realms=[entry]
    )
    with pytest.raises(UpstreamDenied):
        await client.get_manifest("team/app", "v1")
    assert foreign.authorizations == []


async def test_an_anonymous_upstream_may_use_a_token_realm_elsewhere(
    foreign: ForeignRealm, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    # Nothing of ours to leak: Docker Hub, GitLab and NGC all keep their realm elsewhere.
    client = upstream(foreign.registry_url, session)
    assert (await client.get_manifest("team/app", "v1")).raw == image.manifest
    assert foreign.authorizations == [None]


def test_token_realms_can_be_set_from_the_environment() -> None:
    from regmirror.config import load

    settings = load(
        environ={
            "REGMIRROR_UPSTREAMS__0__URL": "https://registry.gitlab.com",
            "REGMIRROR_UPSTREAMS__0__TOKEN_REALMS": '["gitlab.com", "https://auth.example.com:8443"]',
            "REGMIRROR_UPSTREAMS__1__URL": "https://nvcr.io",
            "REGMIRROR_UPSTREAMS__1__TOKEN_REALMS__0": "authn.nvidia.com",
        }
    )
    assert settings.upstreams[0].token_realms == ["gitlab.com", "https://auth.example.com:8443"]
    assert settings.upstreams[1].token_realms == ["authn.nvidia.com"]
    gitlab = Upstream(settings.upstreams[0], None)  # type: ignore[arg-type]
    assert gitlab.trusts_realm(URL("https://gitlab.com/jwt/auth"))
    assert gitlab.trusts_realm(URL("https://auth.example.com:8443/token"))
    assert not gitlab.trusts_realm(URL("https://auth.example.com/token"))


def test_docker_hub_trusts_its_own_token_service_only() -> None:
    hub = Upstream(UpstreamSettings(url="docker.io", username=USER, password=PASSWORD), None)  # type: ignore[arg-type]
    assert hub.trusts_realm(URL("https://auth.docker.io/token"))
    assert hub.trusts_realm(URL("https://registry-1.docker.io/token"))
    assert not hub.trusts_realm(URL("http://auth.docker.io/token"))
    assert not hub.trusts_realm(URL("https://auth.docker.io.evil.example/token"))
    assert not hub.trusts_realm(URL("https://evil.example/token"))


async def test_regmirror_refuses_the_realm_and_says_why_in_its_log(
    regmirror_server: Callable[..., ServerProcess],  # noqa: F811
    foreign: ForeignRealm,
    session: aiohttp.ClientSession,
    image: PushedImage,
) -> None:
    config = {"upstreams": [{"url": foreign.registry_url, "username": USER, "password": PASSWORD}]}
    server = regmirror_server(config=config)
    async with session.get(f"{server.url}/v2/team/app/manifests/v1") as response:
        body = await response.read()
    assert response.status >= 400
    assert json.loads(body)["errors"], body
    assert foreign.authorizations == []
    logs = server.logs(None)
    assert f"token realm {foreign.realm_url}/token" in logs
    assert "token_realms" in logs
    assert PASSWORD not in logs


async def test_redirects_never_carry_basic_credentials_to_another_origin(
    upstream_registry: ServerProcess, session: aiohttp.ClientSession, image: PushedImage
) -> None:
    storage = RedirectingStorage(upstream_registry.url, session)
    async with serve(storage.app()) as storage_url:

        async def blobs(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != CREDENTIALS:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="t"'})
            raise web.HTTPTemporaryRedirect(f"{storage_url}/{request.match_info['path']}")

        front = web.Application()
        front.router.add_get("/v2/{path:.*}", blobs)
        async with serve(front) as url:
            client = upstream(url, session, username=USER, password=PASSWORD)
            size, chunks = await client.open_blob("team/app", image.layer_digest)
            assert size == len(image.layer)
            assert b"".join([chunk async for chunk in chunks]) == image.layer
    assert storage.authorizations == [None]  # same host, another port: another origin
