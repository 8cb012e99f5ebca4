"""Blob GET / HEAD / DELETE (OCI distribution spec: pulling blobs, deleting blobs).

A blob on local disk goes out by sendfile, or by nginx with ``server.accel_redirect``
(:mod:`regmirror.api.sendfile`: Range is answered with 206 and 416). The blob is held (kept from eviction) from before it is looked up until
its response is sent. A blob still arriving from S3 or an upstream streams from its fill as
it grows (by sendfile from the partial file, or from memory when the fill streams through
without being kept); the last byte of every body, ranged or not, waits for the digest
check (:meth:`~regmirror.fill.Fill.parts`). Should the fill fail after the headers went
out, the connection is cut so that the client sees a short body, never a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import re
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from regmirror.api import params
from regmirror.api.envelope import client_gone, cut
from regmirror.api.keys import ACCEL_REDIRECT, METRICS, REGISTRY
from regmirror.api.sendfile import StoredBlobResponse, accel_response, not_modified, wanted_span
from regmirror.digest import Digest
from regmirror.errors import BlobUnknown, FillFailed, RegistryError
from regmirror.eviction import Hold
from regmirror.fill import Fill
from regmirror.logs import served
from regmirror.stored import RemoteBlob, StoredBlob, StoredFiles, blob_headers

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")


async def get_blob(request: web.Request) -> web.StreamResponse:
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    hold = await request.app[REGISTRY].cache.hold(digest)
    try:
        response = await _answer(request, name, digest, hold, again=True)
    except BaseException:
        hold.release()
        raise
    if not isinstance(response, StoredBlobResponse):
        hold.release()  # else the response releases it once sent
    return response


async def _answer(
    request: web.Request, name: str, digest: Digest, hold: Hold, *, again: bool
) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    head = request.method == "HEAD"
    ns = request.query.get("ns")
    found = await registry.blob(name, digest, ns=ns, fetch=not head)
    served.mark(
        "local"
        if isinstance(found, StoredBlob)
        else found.tier
        if isinstance(found, RemoteBlob)
        else found.origin.tier
    )
    if isinstance(found, RemoteBlob):  # a HEAD of a blob local disk does not hold
        return web.Response(headers=blob_headers(digest, found.size))
    request.app[METRICS].cache_request(hit=isinstance(found, StoredBlob))
    if isinstance(found, Fill):
        if not (found.done and found.kept):
            return await _stream_fill(request, found, digest)
        found = await _stored(found, digest)
    served_locally = functools.partial(request.app[METRICS].served, "local")
    if not_modified(request, found):
        return StoredBlobResponse(found, None, None, hold, served_locally, status=304)
    accel = request.app.get(ACCEL_REDIRECT)
    try:  # on the event loop, not in a thread: see api.sendfile
        # A HEAD sends no body, nor does nginx's redirect: they look at the file, not open it.
        found, file = current_file(registry.stored, found, digest, body=not head and accel is None)
    except FileNotFoundError:
        # Gone since it was found (removed behind this process's back): look once more,
        # as if it had never been seen.
        registry.stored.forget(digest)
        if not again:
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)}) from None
        return await _answer(request, name, digest, hold, again=False)
    try:
        span = wanted_span(request, found, _range)
    except BaseException:
        if file is not None:
            file.close()
        raise
    if accel is not None and not head:
        served_locally(found.size if span is None else span[1] - span[0])
        return accel_response(found, digest, accel)
    return _send_stored(request, found, digest, file, span, hold)


async def respond(
    request: web.Request, found: StoredBlob | Fill, digest: Digest, hold: Hold
) -> web.StreamResponse:
    """A blob's body for a fleet peer (Range honoured): from its fill as it arrives, else
    by sendfile from the store. ``hold`` is released once the body is sent. ``found`` comes
    from a fresh look (nothing remembered), so the file is not checked against it again."""
    try:
        if isinstance(found, Fill):
            if not (found.done and found.kept):
                try:
                    return await _stream_fill(request, found, digest)
                finally:
                    hold.release()
            found = await _stored(found, digest)
        span = wanted_span(request, found, _range)
        try:
            file = _open_stored(found.path)
        except FileNotFoundError:  # gone since it was found (fsck, an operator)
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)}) from None
    except BaseException:
        hold.release()
        raise
    return _send_stored(request, found, digest, file, span, hold)


def current_file(
    stored: StoredFiles, found: StoredBlob, digest: Digest, *, body: bool
) -> tuple[StoredBlob, BinaryIO | None]:
    """``found`` as its file is now (:meth:`~regmirror.stored.StoredFiles.current`), and
    the file opened when ``body`` (else only stat'ed). The ``fstat`` is of the descriptor
    that will be sent: another worker may have replaced a damaged file under the digest
    since its size was remembered, and a stale size must never decide Content-Length,
    Range or the bytes sent. FileNotFoundError when the file is gone."""
    file = _open_stored(found.path) if body else None
    try:
        st = os.fstat(file.fileno()) if file is not None else os.stat(found.path)
    except BaseException:
        if file is not None:
            file.close()
        raise
    return stored.current(digest, found, st.st_ino, st.st_size), file


def _open_stored(path: Path) -> BinaryIO:
    """A stored blob's file, opened on the event loop (see api.sendfile) and locked shared
    so that another worker's eviction skips it while it is sent (regmirror.workers)."""
    file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the response)
    with contextlib.suppress(BlockingIOError):  # a fill's owner still holds it
        fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    return file


def _send_stored(
    request: web.Request,
    found: StoredBlob,
    digest: Digest,
    file: BinaryIO | None,  # None: a HEAD, no body
    span: tuple[int, int] | None,
    hold: Hold,
) -> StoredBlobResponse:
    """The response that sends ``file`` by sendfile and releases ``hold`` once sent; a file
    shorter than the size remembered for it makes that size forgotten."""
    return StoredBlobResponse(
        found,
        file,
        span,
        hold,
        functools.partial(request.app[METRICS].served, "local"),
        status=206 if span else 200,
        on_short=functools.partial(request.app[REGISTRY].stored.forget, digest),
    )


async def _stored(fill: Fill, digest: Digest) -> StoredBlob:
    """A fill that completed and was kept, as the stored blob it became."""
    size = await fill.length()
    return StoredBlob(fill.final, size, blob_headers(digest, size))


async def delete_blob(request: web.Request) -> web.Response:
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    await request.app[REGISTRY].delete_blob(name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})


async def _stream_fill(request: web.Request, fill: Fill, digest: Digest) -> web.StreamResponse:
    size = await fill.length()  # FillFailed here is still an ordinary 503
    served.mark(fill.origin.tier)  # known now that the source has answered
    start, end = _range(request.headers.get("Range"), size)
    response = web.StreamResponse(status=200 if (start, end) == (0, size) else 206)
    response.headers.update(blob_headers(digest, size))
    if response.status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    transport = request.transport
    if transport is None or client_gone(request):
        raise ConnectionResetError("client went away")
    # Each span already in the file goes out by sendfile: no copy through Python, so a
    # herd of waiters costs little more CPU or memory than the same herd served warm.
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        async for part in fill.parts(start, end):
            if isinstance(part, bytes):
                await response.write(part)
                sent += len(part)
            else:
                wanted = part.limit - part.pos
                spanned = await loop.sendfile(transport, part.file, part.pos, wanted)
                sent += spanned
                if spanned < wanted:  # the file holds less than the fill said it wrote
                    cut(request, "aborted")
                    return response
    except FillFailed:
        # Headers are out: only a cut connection tells the client the body is bad.
        cut(request, "aborted")
        return response
    finally:
        request.app[METRICS].served("fill", sent)
        served.sent(request, sent)
    await response.write_eof()
    return response


def _range(header: str | None, size: int) -> tuple[int, int]:
    """The half-open byte range a ``Range`` header asks for (RFC 9110, 14.1.2); the whole
    blob without one, or for a form not served ranged (other units, several ranges).
    One parser for stored blobs and fills, so both answer a header alike."""
    if header is None:
        return 0, size
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return 0, size
    first, last = (_position(text) for text in match.groups())
    if first is None:  # a suffix: the last ``last`` bytes
        assert last is not None
        if last == 0:
            raise RangeNotSatisfiable(size)
        return max(size - last, 0), size
    end = size if last is None else min(last + 1, size)
    if first >= size or first >= end:
        raise RangeNotSatisfiable(size)
    return first, end


def _position(text: str) -> int | None:
    """A byte position; one too long to be a real offset stands for "past any blob"."""
    if not text:
        return None
    return int(text) if len(text) <= 18 else 10**18


class RangeNotSatisfiable(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 416

    def __init__(self, size: int):
        super().__init__(
            f"the range asked for is outside the blob's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
