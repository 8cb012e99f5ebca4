"""Blob uploads: monolithic, chunked, resumable, and cross-repository mount.

OCI distribution spec, "Pushing blobs": POST opens a session (or, with
``?digest=``, is the whole upload; with ``?mount=&from=``, a mount), PATCH
appends a chunk in order, PUT ``?digest=`` closes it, GET reports progress and
DELETE cancels.
"""

from __future__ import annotations

import contextlib

from aiohttp import web

from regmirror.api import params
from regmirror.api.keys import REGISTRY, UPLOADS
from regmirror.digest import Digest
from regmirror.errors import BlobUploadUnknown, SizeInvalid
from regmirror.names import check_name
from regmirror.uploads import Upload, disk_full


async def start_upload(request: web.Request) -> web.Response:
    name = params.name(request)
    registry, uploads = request.app[REGISTRY], request.app[UPLOADS]
    if "mount" in request.query:
        digest = params.digest(request.query["mount"], "mount")
        source = request.query.get("from")
        if source is not None:
            with disk_full("link the mounted blob"):
                if await registry.mount(name, check_name(source), digest):
                    return _created(name, digest)
    # Parse the digest before opening a session, so a bad one leaves no session behind.
    whole = params.digest(request.query["digest"]) if "digest" in request.query else None
    upload = await uploads.start(name)
    if whole is not None:
        try:
            await _append(request, upload)
            await _commit(request, upload, whole)
        except BaseException:
            with contextlib.suppress(BlobUploadUnknown):  # the commit already dropped it
                await uploads.cancel(upload)
            raise
        return _created(name, whole)
    return _progress(upload, 0, status=202)


async def patch_upload(request: web.Request) -> web.Response:
    upload = await _upload(request)
    size = await _append(request, upload)
    return _progress(upload, size, status=202)


async def finish_upload(request: web.Request) -> web.Response:
    upload = await _upload(request)
    digest = params.digest(request.query.get("digest"))
    await _append(request, upload)
    await _commit(request, upload, digest)
    return _created(upload.name, digest)


async def upload_status(request: web.Request) -> web.Response:
    upload = await _upload(request)
    return _progress(upload, await request.app[UPLOADS].size(upload), status=204)


async def cancel_upload(request: web.Request) -> web.Response:
    upload = await _upload(request)
    await request.app[UPLOADS].cancel(upload)
    return web.Response(status=204)


async def _upload(request: web.Request) -> Upload:
    return await request.app[UPLOADS].get(params.name(request), request.match_info["uuid"])


async def _append(request: web.Request, upload: Upload) -> int:
    """Stream the request body (if any) onto the session; returns its new size."""
    uploads = request.app[UPLOADS]
    declared = params.content_length(request)
    chunk_range = params.content_range(request)
    if chunk_range is None and not request.body_exists:
        return await uploads.size(upload)
    start, length = None, declared
    if chunk_range is not None:
        start, length = chunk_range[0], chunk_range[1] - chunk_range[0] + 1
        if declared is not None and declared != length:
            raise SizeInvalid(
                f"Content-Length {declared} does not match Content-Range {start}-{chunk_range[1]}"
            )
    return await uploads.append(upload, request.content.iter_any(), start=start, length=length)


async def _commit(request: web.Request, upload: Upload, digest: Digest) -> None:
    """Only the bytes the session held when it was frozen and verified reach the store."""
    async with request.app[UPLOADS].commit(upload, digest) as verified:
        await request.app[REGISTRY].commit_blob(upload.name, digest, verified)


def _progress(upload: Upload, size: int, *, status: int) -> web.Response:
    return web.Response(
        status=status,
        headers={
            "Location": f"/v2/{upload.name}/blobs/uploads/{upload.id}",
            "Range": f"0-{max(size - 1, 0)}",
            "Docker-Upload-UUID": upload.id,
        },
    )


def _created(name: str, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest)},
    )
