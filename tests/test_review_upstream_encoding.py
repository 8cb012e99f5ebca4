"""Review attack: an upstream (or the nginx/CDN in front of it) that compresses what it
sends when the client accepts it.

The upstream client keeps bodies as they come (``auto_decompress=False``: digests are of
the bytes as stored), so it must not invite compression: aiohttp sends
``Accept-Encoding: gzip, deflate`` unless told otherwise, and a server that honours it
(nginx with ``gzip_types`` naming the manifest types, a CDN) answers gzip bytes whose
digest is not the manifest's. Every pull of such a name failed.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

from aiohttp import web

from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.manifest import OCI_MANIFEST
from tests.support.api import (  # noqa: F401
    OCI_CONFIG,
    OCI_LAYER,
    canonical,
    data_dir,
    descriptor,
    make_client,
)

LAYER = b"layer bytes that compress well " * 2000
CONFIG = b"{}"
MANIFEST = canonical(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, CONFIG),
        "layers": [descriptor(OCI_LAYER, LAYER)],
    }
)


async def test_an_upstream_that_compresses_when_asked_is_not_asked(
    make_client: Any, aiohttp_server: Any
) -> None:
    encodings: list[str | None] = []
    blobs = {str(Digest.of(d)): d for d in (LAYER, CONFIG)}

    def compressed(request: web.Request, body: bytes, media_type: str) -> web.Response:
        encodings.append(request.headers.get("Accept-Encoding"))
        headers = {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(body))}
        response = web.Response(body=body, headers=headers)
        response.enable_compression()  # gzip/deflate when the request accepts it
        return response

    async def manifest(request: web.Request) -> web.Response:
        return compressed(request, MANIFEST, OCI_MANIFEST)

    async def blob(request: web.Request) -> web.Response:
        return compressed(request, blobs[request.match_info["digest"]], "application/octet-stream")

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    upstream = await aiohttp_server(app)
    client = await make_client(
        upstreams=[UpstreamSettings(url=f"http://127.0.0.1:{upstream.port}")]
    )

    response = await client.get("/v2/team/app/manifests/v1")
    assert response.status == 200, await response.text()
    assert await response.read() == MANIFEST
    response = await client.get(f"/v2/team/app/blobs/{Digest.of(LAYER)}")
    assert response.status == 200, await response.text()
    assert await response.read() == LAYER
    assert encodings and all(e in (None, "identity") for e in encodings), encodings
