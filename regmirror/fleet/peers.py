"""Streaming a blob from the host that owns its fill (``GET /-/fleet/blobs/<digest>``).

The owner answers from its fill as it grows (its last byte only once the digest is
verified there), or from its store once the fill is done. Anything but a steady stream
of the right length is a :class:`PeerError`: refused or failed connections, an answer
other than 200/206, a body cut short, no byte for ``timeout`` seconds. The caller
decides what then (take the lease over, resume elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp

from regmirror.digest import Digest
from regmirror.fleet import credential

log = logging.getLogger(__name__)

PATH = "/-/fleet/blobs/{digest}"
CHUNK = 256 * 1024


class PeerError(Exception):
    """A peer did not deliver; ``kind`` is a bounded metrics label."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Peers:
    def __init__(self, session: aiohttp.ClientSession, *, secret: str | None, timeout: float):
        self.session = session
        self.secret = secret
        self.timeout = timeout

    async def open(
        self, owner: str, digest: Digest, offset: int
    ) -> tuple[int, AsyncIterator[bytes]]:
        """The blob's size and its bytes from ``offset``, streamed from ``owner``."""
        path = PATH.format(digest=digest)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if self.secret is not None:
            headers["Authorization"] = credential.sign(self.secret, "GET", path)
        try:
            response = await self.session.get(
                owner.rstrip("/") + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_read=self.timeout
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerError("unreachable", f"peer {owner}: {exc or type(exc).__name__}") from exc
        try:
            expected = 206 if offset else 200
            if response.status != expected:
                raise PeerError("status", f"peer {owner} answered {response.status} for {digest}")
            length = response.content_length
            if length is None:
                raise PeerError("status", f"peer {owner} sent no Content-Length for {digest}")
            size = offset + length
        except BaseException:
            response.release()
            raise
        return size, self._chunks(owner, response, length)

    async def _chunks(
        self, owner: str, response: aiohttp.ClientResponse, length: int
    ) -> AsyncIterator[bytes]:
        received = 0
        try:
            while received < length:
                try:
                    async with asyncio.timeout(self.timeout):
                        chunk = await response.content.read(CHUNK)
                except TimeoutError as exc:
                    raise PeerError(
                        "stalled", f"peer {owner} sent nothing for {self.timeout:g}s"
                    ) from exc
                except aiohttp.ClientError as exc:
                    raise PeerError("broken", f"peer {owner}: {exc}") from exc
                if not chunk:
                    raise PeerError("broken", f"peer {owner} ended after {received} of {length}")
                received += len(chunk)
                yield chunk
        finally:
            response.close()
