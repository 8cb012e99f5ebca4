"""Pull-through tests' pieces: an upstream proxy that can be stopped and gated, pushing
generated OCI images into an upstream, and clients that hash what they read.

- :class:`UpstreamProxy`: a :class:`~tests.support.upstream.CountingProxy` on a fixed
  port of 127.0.0.1 that can be stopped (connections refused: the upstream is down)
  and started again, that can hold manifest requests until released, and that counts
  requests by method and kind (``proxy.count("HEAD", "manifests")``).
- :func:`upstream_env`: ``REGMIRROR_UPSTREAMS__<i>__*`` variables for one upstream.
- :func:`push_image_to` / :func:`push_index_to`: push an
  :mod:`~tests.support.oci_layout` image (or index) byte for byte over the HTTP API.
- :func:`fetch_hashed`: GET a URL, hashing the body as it streams (100 clients reading
  32 MiB each must not hold 3 GiB); a transfer error is recorded, not raised.
- :func:`eventually`: poll a condition with a bounded deadline.
- Fixtures (import them with the ones they use, ``upstream_registry`` from
  :mod:`tests.support.upstream`): ``http``, a client with no connection limit (a herd
  really is concurrent) that reads bodies as sent; ``proxy``, an :class:`UpstreamProxy`
  in front of ``upstream_registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from regmirror.digest import Digest
from tests.support.oci_layout import Blob, Image, MultiPlatformImage
from tests.support.processes import HOST, ServerProcess, free_port
from tests.support.upstream import HOLD_TIMEOUT, CountingProxy, push_blob

BOUND = 60.0  # seconds: the longest any pull-through test waits for anything


@dataclass
class UpstreamProxy(CountingProxy):
    """A counting proxy in front of ``target`` that can go down and come back on the
    same port, and hold manifest requests (``manifest_gate``) until the gate is set."""

    port: int = field(default_factory=free_port)
    manifest_gate: asyncio.Event | None = None
    manifest_held: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    def count(self, method: str, kind: str) -> int:
        """Requests seen with ``method`` for ``kind`` (``manifests`` or ``blobs``)."""
        return sum(1 for m, path in self.requests if m == method and f"/{kind}/" in path)

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, HOST, self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        """Down: from now on connections to the port are refused."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.manifest_gate is not None and "/manifests/" in request.path:
            self.manifest_held.set()
            await asyncio.wait_for(self.manifest_gate.wait(), HOLD_TIMEOUT)
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def upstream_proxy(target: str) -> AsyncIterator[UpstreamProxy]:
    """An :class:`UpstreamProxy` in front of ``target``, running, stopped on exit."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    ) as session:
        proxy = UpstreamProxy(target=target, session=session)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=BOUND * 2),
        auto_decompress=False,
    ) as session:
        yield session


@pytest.fixture
async def proxy(upstream_registry: ServerProcess) -> AsyncIterator[UpstreamProxy]:
    async with upstream_proxy(upstream_registry.url) as running:
        yield running


def upstream_env(url: str, index: int = 0, /, **settings: object) -> dict[str, str]:
    """``REGMIRROR_UPSTREAMS__<index>__URL`` and one variable per setting given."""
    env = {f"REGMIRROR_UPSTREAMS__{index}__URL": url}
    for key, value in settings.items():
        env[f"REGMIRROR_UPSTREAMS__{index}__{key.upper()}"] = str(value)
    return env


# -- pushing generated images --------------------------------------------------------


async def put_manifest(
    session: aiohttp.ClientSession, url: str, repo: str, reference: str, manifest: Blob
) -> None:
    async with session.put(
        f"{url}/v2/{repo}/manifests/{reference}",
        data=manifest.data,
        headers={"Content-Type": manifest.media_type},
    ) as response:
        assert response.status == 201, await response.text()


async def push_image_to(
    session: aiohttp.ClientSession, url: str, repo: str, image: Image, reference: str
) -> None:
    """``image``'s config, layers and manifest, byte for byte, as ``repo:reference``."""
    for blob in (image.config, *image.layers):
        await push_blob(session, url, repo, blob.data)
    await put_manifest(session, url, repo, reference, image.manifest)


async def push_index_to(
    session: aiohttp.ClientSession, url: str, repo: str, index: MultiPlatformImage, tag: str
) -> None:
    """Every platform's image by digest, then the index as ``repo:tag``."""
    for image in index.images:
        await push_image_to(session, url, repo, image, image.manifest.digest)
    await put_manifest(session, url, repo, tag, index.index)


# -- reading -------------------------------------------------------------------------


@dataclass
class Fetched:
    """What one GET saw: the status and headers (None if it failed before them), the
    body's sha256 and length as far as it got, and the transfer error if any."""

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    digest: str = ""
    size: int = 0
    error: BaseException | None = None
    body: bytes = b""


async def fetch_hashed(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    on_headers: Callable[[], None] | None = None,
    keep: bool = False,
) -> Fetched:
    """GET ``url``, hashing the body as it streams; ``keep`` keeps the bytes too."""
    fetched = Fetched()
    hasher = hashlib.sha256()
    kept = bytearray()
    try:
        async with session.get(url, headers=dict(headers or {})) as response:
            fetched.status, fetched.headers = response.status, response.headers
            if on_headers is not None:
                on_headers()
            async for chunk in response.content.iter_chunked(1024 * 1024):
                hasher.update(chunk)
                fetched.size += len(chunk)
                if keep:
                    kept += chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        fetched.error = exc
    fetched.digest = "sha256:" + hasher.hexdigest()
    fetched.body = bytes(kept)
    return fetched


class Countdown:
    """Set once ``arrive()`` has been called ``n`` times."""

    def __init__(self, n: int):
        self.remaining = n
        self.reached = asyncio.Event()
        if n <= 0:
            self.reached.set()

    def arrive(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.reached.set()

    async def wait(self, timeout: float = BOUND) -> None:
        await asyncio.wait_for(self.reached.wait(), timeout)


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = BOUND, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout:g}s (last: {result!r})")
        await asyncio.sleep(interval)


async def error_code(response: aiohttp.ClientResponse) -> str:
    """The first error code of a spec error envelope."""
    body = await response.json(content_type=None)
    return str(body["errors"][0]["code"])


def stored_files(data_dir: Path, digest: Digest | str) -> list[Path]:
    """Whatever regmirror holds for ``digest``: the stored blob and any partial file."""
    hex_digest = str(digest).split(":", 1)[1]
    found = list((data_dir / "docker/registry/v2/blobs/sha256").glob(f"*/{hex_digest}/*"))
    found += list((data_dir / "fills").glob(f"*{hex_digest}*"))
    return found
