"""Stored blob GET and HEAD answered below aiohttp (the fast path: :mod:`regmirror.lean`).

Answered here: a blob :meth:`Registry.blob_now` finds on local disk without waiting,
asked for whole (a ``Range`` or ``If-Range`` is aiohttp's), on a plain TCP connection
for a body (TLS needs the bytes through the transport), without ``accel_redirect``.
It does what :func:`regmirror.api.blobs.get_blob` does for it: holds the blob from
eviction until the body is sent, opens the file (shared-locked, as another worker's
eviction looks for) and believes the size of what it opened (``fstat``), answers
``If-None-Match`` with 304, sends the headers the handler would and the body by
sendfile, and cuts the connection when the file holds fewer bytes than its size.

The body goes out at once when the socket takes it all (the common case: a kernel send
buffer holds megabytes); otherwise the rest is ``loop.sendfile``'s, in a task the
listener treats as a request in progress (the connection reads nothing meanwhile, a
drain waits for it, a client that stops reading is cut).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cachetools import LRUCache

from regmirror.api.blobs import current_file
from regmirror.api.sendfile import names_etag
from regmirror.digest import Digest
from regmirror.eviction import Hold
from regmirror.lean.gate import Admitted, text
from regmirror.lean.wire import Clock, Head, status_head
from regmirror.registry import Registry
from regmirror.stored import StoredBlob

log = logging.getLogger("regmirror.api.sendfile")

HEADS = 4096  # blobs whose response heads are kept
# Told how a body ended: (bytes sent, None or why it ended early: "aborted", "client_disconnect").
Ended = Callable[[int, str | None], None]


class BlobBody:
    """A stored blob's response: its head, then its file by sendfile."""

    def __init__(
        self,
        head: bytes,
        file: BinaryIO,
        blob: StoredBlob,
        ended: Ended,
        on_short: Callable[[], None],
    ):
        """``on_short()``: the file held fewer bytes than its size (the size remembered
        is stale); not a body cut for another reason (a client gone, slow, a drain)."""
        self.head = head
        self.file = file
        self.blob = blob
        self.ended = ended
        self.on_short = on_short

    def send(self, transport: asyncio.Transport) -> asyncio.Task[None] | None:
        """Write the head and what the socket takes of the body now; a task sending the
        rest, or None when the response is over."""
        transport.write(self.head)
        sent, eof = 0, False
        if transport.get_write_buffer_size() == 0:
            try:
                sent, eof = _sendfile_now(transport, self.file, self.blob.size)
            except OSError as exc:
                transport.abort()
                self._end(0, _why(exc))
                return None
        if sent == self.blob.size:
            self._end(sent, None)
            return None
        if eof:
            transport.abort()
            self._short(sent)
            self._end(sent, "aborted")
            return None
        return asyncio.get_running_loop().create_task(self._rest(transport, sent))

    async def _rest(self, transport: asyncio.Transport, offset: int) -> None:
        sent, why = offset, None
        try:
            loop = asyncio.get_running_loop()
            sent += await loop.sendfile(transport, self.file, offset, self.blob.size - offset)
            if sent < self.blob.size:
                why = "aborted"
                transport.abort()
                self._short(sent)
        except (OSError, RuntimeError) as exc:  # asyncio: "Transport is closing"
            sent = max(sent, self.file.tell())  # asyncio leaves it after what went out
            why = _why(exc)
            transport.abort()
        except asyncio.CancelledError:
            sent = max(sent, self.file.tell())
            why = "aborted"  # cut: a drain's deadline, or send_timeout
            transport.abort()
            raise
        finally:
            self._end(sent, why)

    def _short(self, sent: int) -> None:
        log.warning(
            "%s: %d of %d bytes on disk; connection cut", self.blob.path, sent, self.blob.size
        )
        self.on_short()

    def _end(self, sent: int, why: str | None) -> None:
        self.file.close()
        self.ended(sent, why)


def _sendfile_now(transport: asyncio.Transport, file: BinaryIO, count: int) -> tuple[int, bool]:
    """(bytes the socket took, whether the file ended first) without waiting."""
    sock = transport.get_extra_info("socket").fileno()
    source = file.fileno()
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock, source, sent, count - sent)
        except BlockingIOError:
            return sent, False
        if n == 0:
            return sent, True
        sent += n
    return sent, False


def _why(exc: BaseException) -> str:
    # asyncio's sendfile says a peer gone mid-body with a plain ConnectionError too
    # ("Connection closed by peer", "socket is not connected"), as api.envelope knows.
    if isinstance(exc, (ConnectionError, RuntimeError)):
        return "client_disconnect"
    log.warning("sending a blob failed: %s; connection cut", exc)
    return "aborted"


class _Head:
    """A stored blob's response heads, up to the ``Date`` line."""

    __slots__ = ("blob", "not_modified", "ok")

    def __init__(self, blob: StoredBlob):
        self.blob = blob
        self.ok = status_head("200 OK", blob.headers)
        self.not_modified = status_head("304 Not Modified", blob.headers, without="Content-Length")


class Blobs:
    def __init__(self, registry: Registry, clock: Clock, on_sent: Callable[[int], None]):
        self.registry = registry
        self.clock = clock
        self.on_sent = on_sent  # bytes of a body sent (regmirror_bytes_served_total)
        self._heads: LRUCache[Path, _Head] = LRUCache(HEADS)

    def answer(
        self, asked: Admitted, head: Head, plain: bool, ended: Ended
    ) -> tuple[bytes | BlobBody, int, int] | None:
        """(the response: whole, or a body to send; its status; its body's bytes), or
        None: aiohttp's."""
        headers = head.headers
        if b"range" in headers or b"if-range" in headers:
            return None
        body = asked.verb == "GET"
        if body and not plain:
            return None
        digest = asked.reference
        assert isinstance(digest, Digest)
        registry = self.registry
        hold = registry.cache.hold_now(digest)
        if hold is None:
            return None
        try:
            found = registry.blob_now(asked.name, digest, ns=asked.ns)
            if found is None:
                hold.release()
                return None
            match = headers.get(b"if-none-match")
            if match is not None and names_etag(text(match[0]), found):
                hold.release()
                return self._head(found).not_modified + self.clock.end_of_head(), 304, 0
            try:  # the handler's own look (the file closed should fstat fail)
                found, file = current_file(registry.stored, found, digest, body=body)
            except FileNotFoundError:
                registry.stored.forget(digest)  # aiohttp looks for it anew
                hold.release()
                return None
        except BaseException:
            hold.release()
            raise
        response_head = self._head(found).ok + self.clock.end_of_head()
        if file is None:
            hold.release()
            return response_head, 200, 0
        return (
            BlobBody(
                response_head,
                file,
                found,
                self._ending(hold, ended),
                functools.partial(registry.stored.forget, digest),  # the size is stale
            ),
            200,
            found.size,
        )

    def _ending(self, hold: Hold, ended: Ended) -> Ended:
        def end(sent: int, why: str | None) -> None:
            hold.release()
            self.on_sent(sent)
            ended(sent, why)

        return end

    def _head(self, blob: StoredBlob) -> _Head:
        cached = self._heads.get(blob.path)
        if cached is None or cached.blob.headers is not blob.headers:
            cached = self._heads[blob.path] = _Head(blob)
        return cached
