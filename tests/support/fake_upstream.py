"""A small upstream registry of the tests' own that misbehaves on demand.

registry:2 (tests/support/upstream.py) is the upstream when the tests need a real one;
this one is for what a real one will not do on cue. It runs in the test's event loop
on a fixed free port of 127.0.0.1 and answers the Registry v2 read API from what the
test gave it, in one of these modes (set ``fake.mode`` at any time):

- ``"serve"``: blobs and manifests added with :meth:`FakeUpstream.add_blob`,
  :meth:`~FakeUpstream.add_manifest` or :meth:`~FakeUpstream.add_image`; anything else
  is 404 (``BLOB_UNKNOWN`` / ``MANIFEST_UNKNOWN``). With ``wrong_bytes`` every blob body
  has its first byte flipped (same length, wrong digest).
- ``"deny"``: like Docker Hub for a repository that does not exist or is private: 401
  with a Bearer challenge, a token from ``/token`` for any scope asked (anonymous), then
  401 again with ``error="insufficient_scope"``.
- ``"forbid"``: the same challenge and token, then 403 ``DENIED``.
- ``"hang"``: accepts the request and never answers (until :meth:`stop`, or
  :data:`HANG_LIMIT` seconds).

Down (connections refused) is :meth:`stop`; :meth:`start` brings it back on the same
port. Every request is recorded (:attr:`requests`), so a test can assert what reached
the upstream: ``fake.names()`` is every repository name it was asked about.

    async with fake_upstream(mode="deny") as fake:
        server = regmirror_server(env={"REGMIRROR_UPSTREAMS__0__URL": fake.url})
        ...
        assert fake.names() == set()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from regmirror.digest import Digest
from tests.support.oci_layout import Image
from tests.support.processes import HOST, free_port

Mode = Literal["serve", "deny", "forbid", "hang"]
HANG_LIMIT = 60.0  # seconds a hanging request is held at most
SERVICE = "fake-upstream"
_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<reference>[^/]+)$")


@dataclass(frozen=True)
class Seen:
    """One request the upstream received."""

    method: str
    path: str
    name: str | None  # the repository it named, if any
    authorization: str | None


@dataclass
class FakeUpstream:
    mode: Mode = "serve"
    wrong_bytes: bool = False
    port: int = field(default_factory=free_port)
    requests: list[Seen] = field(default_factory=list)
    token_requests: int = 0
    _blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    _manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    # -- content ------------------------------------------------------------------

    def add_blob(self, name: str, data: bytes) -> str:
        digest = str(Digest.of(data))
        self._blobs[(name, digest)] = data
        return digest

    def add_manifest(self, name: str, reference: str, data: bytes, media_type: str) -> str:
        """Serve ``data`` as ``name``'s manifest by its digest, and by ``reference`` too."""
        digest = str(Digest.of(data))
        self._manifests[(name, digest)] = (media_type, data)
        self._manifests[(name, reference)] = (media_type, data)
        return digest

    def add_image(self, name: str, image: Image, tag: str) -> None:
        for blob in (image.config, *image.layers):
            self.add_blob(name, blob.data)
        self.add_manifest(name, tag, image.manifest.data, image.manifest.media_type)

    # -- what it saw --------------------------------------------------------------

    def names(self) -> set[str]:
        """Every repository name a request named."""
        return {seen.name for seen in self.requests if seen.name is not None}

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        """Requests seen, optionally only with ``method`` and for ``kind`` (blobs, manifests)."""
        return sum(
            1
            for seen in self.requests
            if (method is None or seen.method == method)
            and (kind is None or f"/{kind}/" in seen.path)
        )

    # -- running ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on :attr:`port` (again, after :meth:`stop`)."""
        self._released.clear()
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/{path:.*}", self._registry)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, HOST, self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        """Down: connections to the port are refused from now on; hanging requests end."""
        self._released.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- answers ------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"token": f"anonymous-{self.token_requests}", "expires_in": 300})

    async def _registry(self, request: web.Request) -> web.StreamResponse:
        match = _PATH.match(request.path)
        name = match["name"] if match else None
        authorization = request.headers.get("Authorization")
        self.requests.append(Seen(request.method, request.path, name, authorization))
        if self.mode == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), HANG_LIMIT)
            raise web.HTTPServiceUnavailable()
        if self.mode in ("deny", "forbid"):
            return self._refuse(name, authorization)
        if request.path == "/v2/" or request.path == "/v2":
            return web.json_response({})
        if match is None:
            return _error(404, "NAME_UNKNOWN", "no such path")
        if match["kind"] == "manifests":
            return self._manifest(request, match["name"], match["reference"])
        return self._blob(request, match["name"], match["reference"])

    def _refuse(self, name: str | None, authorization: str | None) -> web.Response:
        scope = f"repository:{name}:pull" if name else "registry:catalog:*"
        challenge = f'Bearer realm="{self.url}/token",service="{SERVICE}",scope="{scope}"'
        if not (authorization or "").startswith("Bearer "):
            return _error(401, "UNAUTHORIZED", "authentication required", challenge)
        if self.mode == "forbid":
            return _error(403, "DENIED", "requested access to the resource is denied")
        return _error(
            401,
            "UNAUTHORIZED",
            "authentication required",
            challenge + ',error="insufficient_scope"',
        )

    def _manifest(self, request: web.Request, name: str, reference: str) -> web.Response:
        found = self._manifests.get((name, reference))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", f"manifest {reference} unknown")
        media_type, data = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(data))}
        return web.Response(body=data, headers=headers)  # HEAD: aiohttp sends no body

    def _blob(self, request: web.Request, name: str, digest: str) -> web.Response:
        data = self._blobs.get((name, digest))
        if data is None:
            return _error(404, "BLOB_UNKNOWN", f"blob {digest} unknown")
        if self.wrong_bytes and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        return web.Response(body=data, headers=headers)


def _error(status: int, code: str, message: str, challenge: str | None = None) -> web.Response:
    headers = {"WWW-Authenticate": challenge} if challenge else {}
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


@contextlib.asynccontextmanager
async def fake_upstream(
    mode: Mode = "serve", *, running: bool = True
) -> AsyncIterator[FakeUpstream]:
    """A :class:`FakeUpstream` on a free port, listening unless ``running=False`` (down),
    stopped on exit."""
    fake = FakeUpstream(mode=mode)
    if running:
        await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
