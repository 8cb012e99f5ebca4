"""Review: the lean stored-blob path remembers each blob's size (StoredFiles); a verified
push that replaces a damaged file under the same digest must not leave the old size in
memory, or every later GET sends a body that misses its digest (cut clean at the old
length) or a Content-Length the file cannot fill."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regmirror import layout
from regmirror.digest import Digest
from tests.support.api import blob_bytes, client, data_dir, make_client, push_blob, sha256

__all__ = ["client", "data_dir", "make_client"]

NAME = "review/stored"


def stored_file(data_dir: Path, digest: str) -> Path:
    return data_dir / layout.blob_data(Digest.parse(digest))


@pytest.mark.parametrize("damage", ["truncated", "extended"])
async def test_a_push_repairing_a_damaged_blob_is_served_whole_at_once(
    client: Any, data_dir: Path, damage: str
) -> None:
    data = blob_bytes(256 * 1024, seed=7)
    digest = await push_blob(client, NAME, data)
    path = stored_file(data_dir, digest)
    # Damage behind the registry's back (a disk fault, an operator's mistake).
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data + b"x" * 4096)
    try:
        async with client.get(f"/v2/{NAME}/blobs/{digest}") as response:
            await response.read()  # served as damaged: its size is now remembered
    except aiohttp.ClientPayloadError:
        pass
    assert await push_blob(client, NAME, data) == digest  # the verified bytes replace it
    assert path.read_bytes() == data
    head = await client.head(f"/v2/{NAME}/blobs/{digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    async with client.get(f"/v2/{NAME}/blobs/{digest}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        body = await response.read()
    assert hashlib.sha256(body).hexdigest() == sha256(data).removeprefix("sha256:")


async def test_a_stored_file_shorter_than_its_known_size_is_cut_not_ended(
    client: Any, data_dir: Path
) -> None:
    """Truncated behind the registry's back (another process, a disk fault) after its size
    was remembered: the body must end with a cut connection at once, never a clean end
    that leaves the client waiting for bytes (or a keep-alive connection out of step)."""
    data = blob_bytes(256 * 1024, seed=8)
    digest = await push_blob(client, NAME, data)
    assert (await (await client.get(f"/v2/{NAME}/blobs/{digest}")).read()) == data
    stored_file(data_dir, digest).write_bytes(data[:1000])
    host, port = str(client.make_url("/")).removeprefix("http://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /v2/{NAME}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"Content-Length: {len(data)}".encode() in head
    assert body == data[:1000]  # what there was, then the connection closed
