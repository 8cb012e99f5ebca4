"""An adversarial review of the fast path (regmirror.lean): what it must do as aiohttp's
path does, beyond the bytes of one answer (tests/test_lean.py): the bounds a connection
is held to, and what is counted.

Real server processes (two workers each, the default), compared with a server run with
``server.fast_path: false`` where the behaviour is aiohttp's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.http import session  # noqa: F401
from tests.support.oci_layout import Blob, build_image
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.pullthrough import push_image_to, put_manifest
from tests.test_lean import FAST, REPO, WARM, exchange, get, metric

Start = Callable[..., ServerProcess]


async def unread_for(server: ServerProcess, request: bytes, seconds: float) -> bytes:
    """``request`` from a client with a small window that reads nothing for ``seconds``,
    then all it can until the connection ends (or 5 s pass)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    client.connect((HOST, server.port))
    reader, writer = await asyncio.open_connection(sock=client, limit=1 << 16)
    got = bytearray()
    try:
        writer.write(request)
        await asyncio.sleep(seconds)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 1)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
    return bytes(got)


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_large_manifest_its_client_does_not_read_is_cut_after_send_timeout(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    fast_path: bool,
) -> None:
    """A manifest of megabytes written to a client that takes none of it: aiohttp's
    path waits for the client as a request in progress, which ``send_timeout`` cuts; the
    fast path wrote it all to the transport and called the connection idle, whose
    keep-alive close waits to flush it forever (the descriptor held by nobody's timer)."""
    image = build_image(seed=61)
    body = json.loads(image.manifest.data)
    body["annotations"]["padding"] = "x" * (3 * 1024 * 1024)
    big = Blob(image.manifest.media_type, json.dumps(body).encode())
    server = regmirror_server(
        config={"server": {"fast_path": fast_path, "send_timeout": 1.0, "keepalive_timeout": 1.0}}
    )
    await push_image_to(session, server.url, REPO, image, "v1")
    await put_manifest(session, server.url, REPO, "big", big)
    for _ in range(WARM):
        assert (await exchange(server, get(f"/v2/{REPO}/manifests/big"))).endswith(big.data)
    before = metric(server, FAST)
    got = await unread_for(server, get(f"/v2/{REPO}/manifests/big"), 4.0)
    assert metric(server, FAST) - before == (1 if fast_path else 0)
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert len(got) < len(big.data)  # cut, not kept waiting for the client
