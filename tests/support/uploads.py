"""Pushing to a ``regmirror serve`` process in steps: open an upload session, finish one
from where it stands, and read how many uploads the limits refused."""

from __future__ import annotations

import aiohttp

from tests.support.api import sha256
from tests.support.processes import ServerProcess

NAME = "lib/app"


async def open_session(
    http: aiohttp.ClientSession, server: ServerProcess, holding: bytes = b"", name: str = NAME
) -> str:
    """POST a new session (and PATCH ``holding`` into it); its Location."""
    async with http.post(f"{server.url}/v2/{name}/blobs/uploads/") as response:
        assert response.status == 202, await response.text()
        location = response.headers["Location"]
    if holding:
        async with http.patch(f"{server.url}{location}", data=holding) as first:
            assert first.status == 202, await first.text()
    return location


async def finish_from(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    location: str,
    data: bytes,
    offset: int,
    name: str = NAME,
) -> None:
    """Send ``data[offset:]`` to a session holding ``data[:offset]``, commit it, and check
    the stored blob is ``data``."""
    async with http.patch(
        f"{server.url}{location}",
        data=data[offset:],
        headers={"Content-Range": f"{offset}-{len(data) - 1}"},
    ) as rest:
        assert rest.status == 202, await rest.text()
    async with http.put(f"{server.url}{location}?digest={sha256(data)}") as put:
        assert put.status == 201, await put.text()
    async with http.get(f"{server.url}/v2/{name}/blobs/{sha256(data)}") as blob:
        assert await blob.read() == data


async def refusals(http: aiohttp.ClientSession, server: ServerProcess, reason: str) -> float:
    """``regmirror_upload_refusals_total{reason=...}`` from the server's /metrics."""
    async with http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'regmirror_upload_refusals_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refusals metric for {reason}")
