"""The response for a blob complete on local disk: its bytes by sendfile, or by nginx.

This is the hot path of a mirror, so it does only what the answer needs: the headers
come prebuilt with the blob (:class:`~regmirror.stored.StoredFiles`), the file is opened
on the event loop (an ``open`` of a file whose directory entry is cached costs
microseconds, less than the executor hop that would carry it), and the body goes out
by ``loop.sendfile``. No ``stat`` per request, no parsing of the request again.

The ETag is the digest. ``If-None-Match`` naming it is answered 304; ``If-Range`` with
anything but the ETag gets the whole blob, as RFC 9110 (13.1.5) says for a validator
that does not match (no Last-Modified is sent: the file's mtime records use, not
content).

With ``server.accel_redirect`` set (regmirror behind nginx), a GET is answered with
``X-Accel-Redirect`` to that internal location plus the blob's path below
``<data_dir>/docker/registry/v2/blobs/``, and nginx sends the file (and answers Range)
itself; see ``deploy/nginx/regmirror-accel.conf``. Everything before it is the same:
the repository's link, access control, the 304 and 416 answers, the metrics. The blob's
hold ends with the redirect: nginx opens the file moments later, and should eviction
win that race the client gets nginx's 404 and retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from regmirror import layout
from regmirror.api.envelope import cut
from regmirror.digest import Digest
from regmirror.eviction import Hold
from regmirror.logs import served
from regmirror.stored import StoredBlob

log = logging.getLogger(__name__)


class StoredBlobResponse(web.StreamResponse):
    """A stored blob (or the span ``[start, end)`` of it) from an open file.

    ``hold`` keeps the blob from eviction until the body is sent; ``on_sent(nbytes)``
    counts what went out; ``on_short()`` hears that the file held fewer bytes than its
    size said (the size remembered for it is stale). Both ``file`` and ``hold`` are
    released however it ends."""

    def __init__(
        self,
        blob: StoredBlob,
        file: BinaryIO | None,  # None: no body (HEAD, 304)
        span: tuple[int, int] | None,  # None: all of it
        hold: Hold,
        on_sent: Callable[[int], None],
        status: int = 200,
        on_short: Callable[[], None] = lambda: None,
    ):
        super().__init__(status=status, headers=blob.headers)
        self._path = blob.path
        self._on_short = on_short
        self._file = file
        self._hold = hold
        self._on_sent = on_sent
        self._offset, self._count = 0, blob.size
        if span is not None:
            start, end = span
            self._offset, self._count = start, end - start
            self.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
            self.headers["Content-Length"] = str(end - start)
        if status == 304:
            del self.headers["Content-Length"]

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            writer = await super().prepare(request)
            if self._file is None or self._count == 0 or request.method == "HEAD":
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            sent = await asyncio.get_running_loop().sendfile(
                transport, self._file, self._offset, self._count
            )
            if sent < self._count:
                # The file is shorter than the size known for it (truncated or replaced
                # behind this process's back): cut, so the client sees a short body
                # rather than waiting on a clean end that never fills its Content-Length.
                log.warning(
                    "%s: %d of %d bytes on disk; connection cut", self._path, sent, self._count
                )
                self._on_short()
                self._on_sent(sent)
                served.sent(request, sent)
                cut(request, "aborted")  # type: ignore[arg-type]
                return writer
            await super().write_eof()
            self._on_sent(self._count)
            return writer
        finally:
            self.release()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._hold.release()


def wanted_span(
    request: web.BaseRequest, blob: StoredBlob, parse: Callable[[str | None, int], tuple[int, int]]
) -> tuple[int, int] | None:
    """The part of ``blob`` to send (None: all of it), from ``Range`` and ``If-Range``;
    ``parse`` is the one Range parser fills use too (RangeNotSatisfiable past the end)."""
    header = request.headers.get("Range")
    if header is None:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != blob.headers["ETag"]:
        return None
    span = parse(header, blob.size)
    return None if span == (0, blob.size) else span


def not_modified(request: web.BaseRequest, blob: StoredBlob) -> bool:
    """Whether ``If-None-Match`` names this blob's ETag (or ``*``)."""
    return names_etag(request.headers.get("If-None-Match"), blob)


def names_etag(if_none_match: str | None, blob: StoredBlob) -> bool:
    """Whether an ``If-None-Match`` value names ``blob``'s ETag (or ``*``)."""
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or blob.headers["ETag"] in tags


def accel_response(blob: StoredBlob, digest: Digest, location: str) -> web.Response:
    """Hand the body to nginx: ``X-Accel-Redirect`` to ``location`` + the blob's path
    below the data directory's ``docker/registry/v2/blobs/`` (which the location
    aliases). nginx answers Range and sends Content-Length itself; the internal
    location copies the headers it would not pass on (deploy/nginx/regmirror-accel.conf)."""
    headers = {
        k: v for k, v in blob.headers.items() if k not in ("Content-Length", "Accept-Ranges")
    }
    headers["X-Accel-Redirect"] = location.rstrip("/") + "/" + layout.blob_under_blobs(digest)
    return web.Response(headers=headers)
