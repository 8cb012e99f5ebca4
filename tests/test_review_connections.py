"""Review: a client that stops reading a blob's body must not hold its connection forever.

A connection with a request in progress is "busy": never displaced at the bound. A pull
whose client stops reading (a zero TCP window) stayed busy until the process stopped, so
``server.max_connections`` such clients (one host can open them) shut every other client
out for good. ``server.send_timeout`` bounds how long a body's send may make no progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from regmirror import layout
from regmirror.digest import Digest
from tests.support.api import blob_bytes, sha256
from tests.support.processes import HOST, ServerProcess, regmirror_server

__all__ = ["regmirror_server"]

Start = Callable[..., ServerProcess]
SEND_TIMEOUT = 2.0
BOUND = 20.0


def open_files(server: ServerProcess) -> list[str]:
    """What the serving processes (every worker) have open."""
    found = []
    for pid in server.serving_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found.append(os.readlink(fd))
    return found


async def stalled_pull(server: ServerProcess, path: str) -> socket.socket:
    """A GET of ``path`` whose client reads the response's head, then nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (HOST, server.port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


async def test_a_client_that_stops_reading_is_cut_and_frees_its_connection(
    regmirror_server: Start,
) -> None:
    server = regmirror_server(
        # workers: 1 because the bound under test is one listener's: a worker's share of
        # max_connections is at least min(max_connections, 64), so with 2 workers each
        # holds 3 and /v2/ would reach the other at once (server.worker_share).
        config={"server": {"max_connections": 3, "send_timeout": SEND_TIMEOUT, "workers": 1}}
    )
    data = blob_bytes(48 * 1024 * 1024, seed=3)
    digest = sha256(data)
    async with aiohttp.ClientSession() as session:
        url = f"{server.url}/v2/review/stall/blobs/uploads/?digest={digest}"
        async with session.post(url, data=data) as response:
            assert response.status == 201
    path = f"/v2/review/stall/blobs/{digest}"
    stalled = [await stalled_pull(server, path) for _ in range(3)]
    blob_file = str(server.data_dir / layout.blob_data(Digest.parse(digest)))
    try:
        assert blob_file in open_files(server)  # each stalled pull holds the file open
        started = time.monotonic()
        while True:  # at the bound, every connection busy: refused until the cut
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        f"{server.url}/v2/", timeout=aiohttp.ClientTimeout(total=2)
                    ) as response,
                ):
                    if response.status == 200:
                        break
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() - started < BOUND, "stalled readers still hold every slot"
            await asyncio.sleep(0.5)
        assert time.monotonic() - started >= SEND_TIMEOUT * 0.5
        for _ in range(int(BOUND / 0.1)):  # the cut responses closed their files
            if blob_file not in open_files(server):
                break
            await asyncio.sleep(0.1)
        assert blob_file not in open_files(server)
    finally:
        for sock in stalled:
            sock.close()
    # Readers that keep reading are not cut, however long the body takes.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}{path}") as response:
            body = bytearray()
            async for chunk in response.content.iter_chunked(1024 * 1024):
                body += chunk
                if len(body) < 8 * 1024 * 1024:
                    await asyncio.sleep(0.2)  # slow, never stalled for the timeout
        assert bytes(body) == data
