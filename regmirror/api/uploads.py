"""Blob uploads: monolithic, chunked, resumable, and cross-repository mount.

OCI distribution spec, "Pushing blobs": POST opens a session (or, with
``?digest=``, is the whole upload; with ``?mount=&from=``, a mount), PATCH
appends a chunk in order, PUT ``?digest=`` closes it, GET reports progress and
DELETE cancels.

A body is read in pieces of at most 64 KiB, each written before the next is read; a body
that sends nothing for ``uploads.idle_timeout`` seconds, or less than ``uploads.min_rate``
bytes a second over a window, is cut with a 408 (:mod:`regmirror.upload_pace`; the
session keeps what it held before that request, and stays usable). Refusals by the
upload limits (too large, idle, busy, too many sessions) are counted by reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web

from regmirror.api import params
from regmirror.api.envelope import error_response
from regmirror.api.keys import METRICS, REGISTRY, TRUSTED_PROXIES, UPLOAD_PACE, UPLOADS
from regmirror.auth.clients import client_address
from regmirror.digest import Digest
from regmirror.errors import (
    BlobUploadUnknown,
    ExpectationFailed,
    RegistryError,
    SizeInvalid,
    UploadIdle,
    UploadRefused,
    UploadTooLarge,
)
from regmirror.names import check_name
from regmirror.upload_pace import paced
from regmirror.uploads import Upload, disk_full

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _counted(handler: Handler) -> Handler:
    """Count the refusals of the upload limits, by reason; a stalled body's 408 is sent,
    then its connection closed (nothing more is read from a client that sends nothing)."""

    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except UploadRefused as exc:
            request.app[METRICS].upload_refused(exc.reason)
            if isinstance(exc, UploadIdle):
                return await _close_after(request, error_response(exc))
            raise

    return counted


async def _close_after(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response``, then close the connection rather than wait for the rest of a body."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # closes the transport once what was written is sent
    return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` (curl sends it for large bodies): a body larger than any
    blob may be is refused with its 413 before the client sends it; otherwise "100
    Continue", as aiohttp's own handler answers. Runs before the middlewares, so it
    raises nothing: a malformed Content-Length is the handler's to refuse."""
    try:
        declared = params.content_length(request)
        if declared is not None:
            request.app[UPLOADS].check_size(declared)
    except UploadTooLarge as exc:
        request.app[METRICS].upload_refused(exc.reason)
        response = error_response(exc)
        response.force_close()  # the body it announced is not coming, or not wanted
        return response
    except RegistryError:
        pass
    expect = request.headers.get("Expect", "")
    if expect.strip().lower() != "100-continue":
        return error_response(
            ExpectationFailed(f"Expect {expect[:100]!r} is not supported; only 100-continue")
        )
    if request.version < HttpVersion11:
        return None  # an HTTP/1.0 client's 100-continue is ignored (RFC 9110, 10.1.1)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the response proper has not started
    return None


@_counted
async def start_upload(request: web.Request) -> web.StreamResponse:
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
    declared = params.content_length(request)
    if whole is not None and declared is not None:
        uploads.check_size(declared)  # before a session is opened for it
    upload = await uploads.start(name, client=_client(request))
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


@_counted
async def patch_upload(request: web.Request) -> web.StreamResponse:
    upload = await _upload(request)
    size = await _append(request, upload)
    return _progress(upload, size, status=202)


@_counted
async def finish_upload(request: web.Request) -> web.StreamResponse:
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
    body = paced(request.content, request.app[UPLOAD_PACE])
    return await uploads.append(upload, body, start=start, length=length)


def _client(request: web.Request) -> str:
    """The client's address, believing X-Forwarded-For only from auth.trusted_proxies."""
    forwarded = request.headers.getall("X-Forwarded-For", [])
    trusted = request.app[TRUSTED_PROXIES]
    address = client_address(request.remote, forwarded, trusted)
    return str(address) if address is not None else "-"


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
