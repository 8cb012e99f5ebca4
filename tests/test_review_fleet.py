"""Review: the fleet peer endpoint against hostile credentials.

Every parser total (issue 9): an ``Authorization`` header the peer credential cannot read
is a 401 with the registry's envelope, never a 500, whatever its characters.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from regmirror.api import blobs
from regmirror.digest import Digest
from regmirror.errors import BlobUnknown
from regmirror.eviction import BlobCache
from regmirror.fleet import credential
from regmirror.stored import StoredBlob, blob_headers
from tests.support.processes import HOST, ServerProcess, regmirror_server
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_registry import regmirror_env

__all__ = ["moto_s3", "regmirror_server"]

SECRET = "review-fleet-secret"
DIGEST = "sha256:" + "a" * 64
PATH = f"/-/fleet/blobs/{DIGEST}"


async def raw_get(server: ServerProcess, authorization: bytes) -> tuple[int, bytes]:
    """GET the peer path with ``authorization`` sent as raw bytes (UTF-8 or not)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + authorization + b"\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def unreadable_credentials() -> list[bytes]:
    now = str(int(time.time())).encode()
    return [
        "RegmirrorFleet ²:00".encode(),  # str.isdigit() says yes, int() says no
        "RegmirrorFleet ¹²³:00".encode(),
        b"RegmirrorFleet " + now + ":é".encode(),  # compare_digest refuses non-ASCII str
        b"RegmirrorFleet " + now + b":\xff\xfe",  # not UTF-8 at all
        b"RegmirrorFleet " + now + b":" + "٠".encode() * 64,
    ]


@pytest.mark.parametrize("index", range(5))
def test_verify_is_total(index: int) -> None:
    header = unreadable_credentials()[index].decode("utf-8", "surrogateescape")
    assert credential.verify(SECRET, header, "GET", PATH) is False


async def test_an_unreadable_peer_credential_is_a_401_not_a_500(
    regmirror_server: object, moto_s3: MotoS3
) -> None:
    env = regmirror_env(moto_s3, moto_s3.new_bucket("review-fleet"), write_back="true")
    env.update(
        {
            "REGMIRROR_FLEET__ADVERTISE_URL": f"http://{HOST}:{{port}}",
            "REGMIRROR_FLEET__SECRET": SECRET,
        }
    )
    server = regmirror_server(env=env)  # type: ignore[operator]
    for authorization in unreadable_credentials():
        status, body = await raw_get(server, authorization)
        assert status == 401, (authorization, status, body[:300])
        assert b"UNAUTHORIZED" in body
    signed = credential.sign(SECRET, "GET", PATH).encode()
    assert (await raw_get(server, signed))[0] == 404  # the endpoint itself still answers


async def test_a_stored_blob_gone_before_the_peer_response_opens_it_is_404(
    tmp_path: Path,
) -> None:
    """Between the peer endpoint's look at the store and the response's open, the file
    can go (quarantined by fsck, removed by an operator): BLOB_UNKNOWN, not a 500."""
    cache = BlobCache(tmp_path)
    digest = Digest.parse(DIGEST)
    hold = await cache.hold(digest)
    gone = StoredBlob(tmp_path / "gone" / "data", 10, blob_headers(digest, 10))
    request = make_mocked_request("GET", PATH)
    with pytest.raises(BlobUnknown):
        await blobs.respond(request, gone, digest, hold)
    assert not cache.held(digest)  # the hold is released however it ends
