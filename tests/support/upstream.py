"""Upstream registries for tests: registry:2 processes, and small aiohttp servers in front.

- ``upstream_registry`` / ``basic_registry``: registry:2 (anonymous / htpasswd Basic
  auth as ``BASIC_USER``:``BASIC_PASSWORD``), one per test module.
- :func:`push_blob` / :func:`push_image`: push content over the Registry v2 HTTP API.
- :class:`CountingProxy`: forwards to a registry, counts blob GETs, and can be told to
  hold a blob body after N bytes until released, cut the connection mid-body, or serve
  corrupted bytes, so fills can be tested against a misbehaving upstream.
- :class:`TokenProxy`: a token service plus a proxy that demands ``Authorization:
  Bearer <token>`` and answers 401 with the challenge otherwise; counts token requests.
- :class:`RedirectingStorage`: a server on another origin that blob GETs are redirected
  to; records the Authorization headers it receives.

Everything listens on 127.0.0.1 with a kernel-chosen port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from yarl import URL

from regmirror.digest import Digest
from regmirror.upstream import basic_authorization
from tests.support.processes import (
    HOST,
    ServerProcess,
    run_distribution,
)

BASIC_USER = "ci"
BASIC_PASSWORD = "s3cret-pass"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
HOLD_TIMEOUT = 30.0  # the longest a held body waits for release


def _bcrypt(password: str) -> str:
    """An htpasswd entry's hash, as registry:2 wants it (bcrypt only)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=8)).decode()


@pytest.fixture(scope="module")
def upstream_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """registry:2 with filesystem storage, anonymous pull and push."""
    with run_distribution(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """registry:2 demanding Basic auth (htpasswd) for everything."""
    base = tmp_path_factory.mktemp("basic-upstream")
    htpasswd = base / "htpasswd"
    htpasswd.write_text(f"{BASIC_USER}:{_bcrypt(BASIC_PASSWORD)}\n")
    auth = {"auth": {"htpasswd": {"realm": "test", "path": str(htpasswd)}}}
    with run_distribution(base, extra=auth, ready_status=401) as server:
        yield server


# -- pushing -----------------------------------------------------------------


async def push_blob(
    session: aiohttp.ClientSession,
    url: str,
    repo: str,
    data: bytes,
    auth: str | None = None,
) -> Digest:
    digest = Digest.of(data)
    headers = {"Authorization": auth} if auth else {}
    async with session.post(f"{url}/v2/{repo}/blobs/uploads/", headers=headers) as response:
        assert response.status == 202, await response.text()
        location = response.headers["Location"]
    upload = URL(location)
    if not upload.is_absolute():
        upload = URL(url).join(upload)
    upload = upload.update_query(digest=str(digest))
    headers["Content-Type"] = "application/octet-stream"
    async with session.put(upload, data=data, headers=headers) as response:
        assert response.status == 201, await response.text()
    return digest


@dataclass
class PushedImage:
    repo: str
    tag: str
    manifest: bytes
    digest: Digest
    config: bytes
    layer: bytes
    layer_digest: Digest


async def push_image(
    session: aiohttp.ClientSession,
    url: str,
    repo: str,
    tag: str = "latest",
    *,
    layer: bytes | None = None,
    auth: str | None = None,
) -> PushedImage:
    """A one-layer Docker schema2 image, pushed as registry:2 expects."""
    layer = layer if layer is not None else secrets.token_bytes(4096)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer_digest = await push_blob(session, url, repo, layer, auth)
    config_digest = await push_blob(session, url, repo, config, auth)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": str(config_digest),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": str(layer_digest),
                    "size": len(layer),
                }
            ],
        },
        indent=3,
    ).encode()
    headers = {"Content-Type": DOCKER_MANIFEST, **({"Authorization": auth} if auth else {})}
    async with session.put(
        f"{url}/v2/{repo}/manifests/{tag}", data=manifest, headers=headers
    ) as response:
        assert response.status == 201, await response.text()
    return PushedImage(repo, tag, manifest, Digest.of(manifest), config, layer, layer_digest)


# -- small servers -------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 at a free port; yields its base URL."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def _forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}


@dataclass
class CountingProxy:
    """A reverse proxy in front of ``target`` that counts blob GETs and misbehaves on
    request. Set the knobs before the request they should affect."""

    target: str
    session: aiohttp.ClientSession
    blob_gets: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    hold_after: int | None = None  # pause a blob body after this many bytes...
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ...until this is set
    held: asyncio.Event = field(default_factory=asyncio.Event)  # set when a body is paused
    cut_after: int | None = None  # close the connection after this many body bytes
    corrupt: bool = False  # flip one byte of each blob body
    chunk: int = 64 * 1024

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        is_blob_get = request.method == "GET" and "/blobs/sha" in request.path
        if is_blob_get:
            self.blob_gets += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self.session.request(
            request.method,
            f"{self.target}{request.path_qs}",
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            response = web.StreamResponse(
                status=upstream.status, headers=_forward_headers(upstream.headers)
            )
            if request.method == "HEAD":
                if upstream.content_length is not None:
                    response.headers["Content-Length"] = str(upstream.content_length)
                await response.prepare(request)
                return response
            response.content_length = len(body)
            await response.prepare(request)
        if is_blob_get and self.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        sent = 0
        while sent < len(body):
            if self.cut_after is not None and is_blob_get and sent >= self.cut_after:
                assert request.transport is not None
                request.transport.close()  # mid-body: the client sees a short read
                return response
            if self.hold_after is not None and is_blob_get and sent >= self.hold_after:
                self.held.set()
                await asyncio.wait_for(self.release.wait(), HOLD_TIMEOUT)
            step = self.chunk
            for limit in (self.cut_after, self.hold_after):
                if is_blob_get and limit is not None and sent < limit:
                    step = min(step, limit - sent)
            await response.write(body[sent : sent + step])
            sent += step
        await response.write_eof()
        return response


@dataclass
class TokenProxy:
    """A Bearer-token registry front: ``/token`` issues tokens for the scopes asked;
    everything else under ``/v2/`` needs one (or gets the 401 challenge) and is
    forwarded to ``target``."""

    target: str
    session: aiohttp.ClientSession
    expires_in: int | None = 300
    require_basic: tuple[str, str] | None = None  # (user, password) the token service wants
    token_requests: int = 0
    token_scopes: list[list[str]] = field(default_factory=list)
    unauthorized: int = 0
    redirect_blobs_to: str | None = None  # answer blob GETs with a 307 to this base URL
    url: str = ""
    _tokens: dict[str, set[str]] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{path:.*}", self._registry)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        scopes = request.query.getall("scope", [])
        self.token_scopes.append(scopes)
        if self.require_basic is not None:
            expected = basic_authorization(*self.require_basic)
            if request.headers.get("Authorization") != expected:
                return web.json_response({"details": "bad credentials"}, status=401)
        token = secrets.token_hex(16)
        self._tokens[token] = set(scopes)
        body: dict[str, object] = {"token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    async def _registry(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        name = path.split("/manifests/")[0].split("/blobs/")[0]
        scope = f"repository:{name}:pull"
        auth = request.headers.get("Authorization", "")
        granted = self._tokens.get(auth.removeprefix("Bearer "), set())
        if not auth.startswith("Bearer ") or scope not in granted:
            self.unauthorized += 1
            challenge = f'Bearer realm="{self.url}/token",service="test-registry",scope="{scope}"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        if self.redirect_blobs_to and request.method == "GET" and "/blobs/" in path:
            raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/{path}")
        async with self.session.request(
            request.method, f"{self.target}/v2/{path}", headers=_pass(request)
        ) as upstream:
            body = await upstream.read()
            headers = _forward_headers(upstream.headers)
            if request.method == "HEAD":
                response = web.StreamResponse(status=upstream.status, headers=headers)
                if upstream.content_length is not None:
                    response.headers["Content-Length"] = str(upstream.content_length)
                await response.prepare(request)
                return response
            return web.Response(status=upstream.status, body=body, headers=headers)


def _pass(request: web.Request) -> dict[str, str]:
    return {
        k: v for k, v in request.headers.items() if k.lower() in ("accept", "range", "content-type")
    }


@dataclass
class RedirectingStorage:
    """Blob storage on another origin: serves ``/<name>/blobs/<digest>`` from ``target``
    (without auth) and records what Authorization headers reached it."""

    target: str
    session: aiohttp.ClientSession
    authorizations: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._get)
        return app

    async def _get(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        async with self.session.get(
            f"{self.target}/v2/{request.match_info['path']}", headers=_pass(request)
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                status=upstream.status, body=body, headers=_forward_headers(upstream.headers)
            )
