"""Review: ``Expect`` on the upload routes answers as the rest of the API does.

An expectation other than 100-continue is refused with the registry's JSON envelope
(417), not aiohttp's text; an HTTP/1.0 request's 100-continue is ignored, as RFC 9110
(10.1.1) requires, instead of failing the push.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.support.api import client, data_dir, make_client

__all__ = ["client", "data_dir", "make_client"]


async def exchange(client: Any, request: bytes) -> tuple[bytes, bytes]:
    host, port = str(client.make_url("/")).removeprefix("http://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
            if b"\r\n\r\n" in received and not received.startswith(b"HTTP/1.1 100"):
                head, _, body = received.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


async def test_an_unknown_expectation_is_refused_with_the_envelope(client: Any) -> None:
    head, body = await exchange(
        client,
        b"POST /v2/review/expect/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        b"Expect: something-else\r\nContent-Length: 0\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 417"), head
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


async def test_an_http_1_0_100_continue_is_ignored(client: Any) -> None:
    head, _body = await exchange(
        client,
        b"POST /v2/review/expect/blobs/uploads/ HTTP/1.0\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    )
    assert head.startswith((b"HTTP/1.0 202", b"HTTP/1.1 202")), head
