"""Blob GET / HEAD / DELETE (OCI distribution spec: pulling blobs, deleting blobs).

A blob on local disk goes out by sendfile (FileResponse answers Range with 206
and 416). The blob is held (kept from eviction) from before it is looked up until
its response is sent. A blob still arriving from S3 or an upstream streams from its fill as
it grows (by sendfile from the partial file, or from memory when the fill streams through
without being kept); the last byte of every body, ranged or not, waits for the digest
check (:meth:`~regmirror.fill.Fill.parts`). Should the fill fail after the headers went
out, the connection is cut so that the client sees a short body, never a clean end.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from regmirror.api import params
from regmirror.api.envelope import client_gone, cut
from regmirror.api.keys import METRICS, REGISTRY
from regmirror.digest import Digest
from regmirror.errors import FillFailed, RegistryError
from regmirror.eviction import Hold
from regmirror.fill import Fill
from regmirror.logs import served
from regmirror.metrics import Metrics
from regmirror.stored import RemoteBlob, StoredBlob

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
# Where sendfile is not available, FileResponse reads and writes in chunks this big.
FILE_CHUNK = 1024 * 1024


class _CountedFileResponse(web.FileResponse):
    """A FileResponse that counts the bytes it sent (after any Range) as served locally,
    and releases the blob's hold once they are sent (prepare sends the whole body).

    The range is ours (``_range``, as for fills): aiohttp is handed it as one canonical
    ``Range`` header, or none for the whole blob, and never parses a client's."""

    def __init__(
        self,
        path: Path,
        metrics: Metrics,
        hold: Hold,
        ranged: tuple[int, int] | None,  # None: the whole blob
        **kwargs: Any,
    ):
        super().__init__(path, **kwargs)
        self._metrics = metrics
        self._hold = hold
        self._ranged = ranged

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = CIMultiDict(request.headers)
        headers.popall("Range", None)
        if self._ranged is not None:
            headers["Range"] = f"bytes={self._ranged[0]}-{self._ranged[1] - 1}"
        try:
            writer = await super().prepare(request.clone(headers=headers))
        finally:
            self._hold.release()
        if request.method != "HEAD" and 200 <= self.status < 300:
            self._metrics.served("local", self.content_length or 0)
        return writer


async def get_blob(request: web.Request) -> web.StreamResponse:
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    registry = request.app[REGISTRY]
    hold = await registry.cache.hold(digest)
    handed_over = False
    try:
        head = request.method == "HEAD"
        found = await registry.blob(name, digest, ns=request.query.get("ns"), fetch=not head)
        headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"}
        served.mark(
            "local"
            if isinstance(found, StoredBlob)
            else found.tier
            if isinstance(found, RemoteBlob)
            else found.origin.tier
        )
        if isinstance(found, RemoteBlob):  # a HEAD of a blob local disk does not hold
            headers.update({"Content-Length": str(found.size), "Accept-Ranges": "bytes"})
            return web.Response(headers=headers)
        request.app[METRICS].cache_request(hit=isinstance(found, StoredBlob))
        handed_over = True  # respond() releases it
        return await respond(request, found, digest, hold, headers)
    finally:
        if not handed_over:
            hold.release()


async def respond(
    request: web.Request,
    found: StoredBlob | Fill,
    digest: Digest,
    hold: Hold,
    headers: dict[str, str],
) -> web.StreamResponse:
    """The blob's body (Range honoured): by sendfile from the store, else from its fill as
    it arrives. Releases ``hold`` once the stored blob is sent (or at once for a fill)."""
    handed_over = False
    try:
        if isinstance(found, Fill) and not (found.done and found.kept):
            return await _stream_fill(request, found, digest, headers)
        path = found.path if isinstance(found, StoredBlob) else found.final
        size = found.size if isinstance(found, StoredBlob) else await found.length()
        ranged = _range(request.headers.get("Range"), size)
        response = _CountedFileResponse(
            path,
            request.app[METRICS],
            hold,
            None if ranged == (0, size) else ranged,
            headers=headers,
            chunk_size=FILE_CHUNK,
        )
        handed_over = True  # the response releases it once sent
        return response
    finally:
        if not handed_over:
            hold.release()


async def delete_blob(request: web.Request) -> web.Response:
    name = params.name(request)
    digest = params.digest(request.match_info["digest"])
    await request.app[REGISTRY].delete_blob(name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})


async def _stream_fill(
    request: web.Request, fill: Fill, digest: Digest, headers: dict[str, str]
) -> web.StreamResponse:
    size = await fill.length()  # FillFailed here is still an ordinary 503
    served.mark(fill.origin.tier)  # known now that the source has answered
    start, end = _range(request.headers.get("Range"), size)
    response = web.StreamResponse(status=200 if (start, end) == (0, size) else 206)
    response.headers.update(headers)
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["ETag"] = f'"{digest}"'
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
                await loop.sendfile(transport, part.file, part.pos, part.limit - part.pos)
                sent += part.limit - part.pos
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
