"""Review attacks on upstream credentials: they must never reach a client or a log.

An operator may write an upstream's credentials into its URL
(``https://robot:secret@registry.example``), as many tools accept. Those bytes must
never appear in an error a client reads, nor in a log line.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.upstream import Upstream, basic_authorization
from tests.support.api import data_dir, make_client  # noqa: F401
from tests.support.processes import free_port

SECRET = "review-url-s3cret"


@pytest.mark.parametrize("reference", ["latest", "sha256:" + "a" * 64])
async def test_credentials_in_an_upstream_url_reach_no_client_and_no_log(
    make_client: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    reference: str,
) -> None:
    port = free_port()  # nothing listens there: every request fails
    url = f"http://robot:{SECRET}@127.0.0.1:{port}"
    registry = await make_client(upstreams=[UpstreamSettings(url=url)])
    with caplog.at_level(logging.DEBUG):
        response = await registry.get(f"/v2/library/app/manifests/{reference}")
        body = await response.text()
        blob = await registry.get("/v2/library/app/blobs/sha256:" + "b" * 64)
        blob_body = await blob.text()
    assert response.status >= 400
    assert SECRET not in body, body
    assert SECRET not in blob_body, blob_body
    assert SECRET not in str(dict(response.headers))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged, logged


async def test_credentials_in_an_upstream_url_still_authenticate_at_its_origin(
    aiohttp_server: Any,
) -> None:
    """Taken out of the URL, they are the upstream's Basic credentials as before."""
    seen: list[str | None] = []

    async def blob(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return web.Response(body=b"x", headers={"Content-Length": "1"})

    app = web.Application()
    app.router.add_route("HEAD", "/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(app)
    url = f"http://robot:{SECRET}@127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(UpstreamSettings(url=url), session)
        assert SECRET not in str(upstream.url) and SECRET not in repr(upstream)
        assert await upstream.stat_blob("app", Digest.of(b"x")) == 1
    assert seen == [None, basic_authorization("robot", SECRET)]
