"""Helpers for tests of the fast path (regmirror.lean) against real server processes:
requests and responses as raw bytes over asyncio streams (the fast path answers what
arrives whole in one read, so the tests decide exactly what is sent how), a client with
a small receive window, and content read into every worker's memory before a test
looks at what the fast path does with it."""

from __future__ import annotations

import asyncio
import re
import socket

import aiohttp

from tests.support.oci_layout import Image
from tests.support.processes import HOST, ServerProcess
from tests.support.pullthrough import push_image_to

REPO = "lean/app"
# Fresh connections to warm with: the kernel picks a worker per connection, and each
# worker reads the links (and the manifest) into its own memory on its first request.
WARM = 24
FAST = "regmirror_http_fast_path_requests_total"


def get(path: str, *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    """A request for ``path`` with Host and ``headers`` ("Name: value"), as bytes."""
    lines = [f"{method} {path} HTTP/{version}", f"Host: {HOST}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> bytes:
    """One whole response: its head, and the body its Content-Length says."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    if method == b"HEAD" or length is None:
        return head
    return head + await asyncio.wait_for(reader.readexactly(int(length[1])), 10)


async def exchange(server: ServerProcess, request: bytes) -> bytes:
    """``request`` sent whole on a fresh connection; the response, Date blanked."""
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(request)
        response = await read_response(reader, request.split(b" ", 1)[0])
    finally:
        writer.close()
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", response)


async def narrow_connection(
    server: ServerProcess, window: int = 16384
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is ``window`` bytes (set before connecting, so
    the TCP window is that small too): a large body cannot be taken in one go."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    client.connect((HOST, server.port))
    return await asyncio.open_connection(sock=client, limit=1 << 16)


async def serving(
    server: ServerProcess, http: aiohttp.ClientSession, image: Image, *paths: str
) -> None:
    """``image`` pushed as ``REPO:v1``, and ``paths`` (default: its manifest) asked for
    on fresh connections until every worker holds what they need in memory."""
    await push_image_to(http, server.url, REPO, image, "v1")
    await warm(server, *(paths or (f"/v2/{REPO}/manifests/v1",)))


async def warm(server: ServerProcess, *paths: str) -> None:
    """``paths`` asked for (HEAD) on ``WARM`` fresh connections each."""
    for _ in range(WARM):
        for path in paths:
            await exchange(server, get(path, method="HEAD"))
