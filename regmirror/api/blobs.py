"""Blob GET / HEAD / DELETE (OCI distribution spec: pulling blobs, deleting blobs)."""

from __future__ import annotations

from aiohttp import web

from regmirror.api import params
from regmirror.api.keys import REGISTRY


async def get_blob(request: web.Request) -> web.StreamResponse:
    """A stored blob, by sendfile; FileResponse answers Range with 206 and 416."""
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    blob = await request.app[REGISTRY].blob(name, digest)
    return web.FileResponse(
        blob.path,
        headers={
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
        },
    )


async def delete_blob(request: web.Request) -> web.Response:
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    await request.app[REGISTRY].delete_blob(name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
