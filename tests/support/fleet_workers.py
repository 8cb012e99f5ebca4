"""Reaching a given worker of a ``regmirror serve`` host of several workers, for the
fleet's tests (tests/test_fleet_workers.py).

Requests are aimed at a worker: a connection's server side is found in
``/proc/net/tcp`` and among the workers' descriptors, and the worker filling a blob is
the one holding its partial file's ``flock`` (``/proc/locks``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from regmirror.digest import Digest
from regmirror.fleet import credential
from tests.support.fleet import SECRET, Fleet, Rig
from tests.support.processes import HOST, ServerProcess
from tests.support.s3 import MotoS3
from tests.support.s3_registry import PREFIX
from tests.support.upstream import PushedImage
from tests.test_workers import workers_of

MiB = 1024 * 1024
BOUND = 30.0
WORKERS = {"REGMIRROR_SERVER__WORKERS": "2"}


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose every request has a connection of its own (any worker may get it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=BOUND)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as fresh:
        yield fresh


# -- reaching a given worker -------------------------------------------------------------


def worker_of_connection(host: ServerProcess, client_port: int) -> int | None:
    """The worker that accepted the connection from ``client_port``; None until one has."""
    local, remote = f"0100007F:{host.port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote and fields[9] != "0":
            inode = fields[9]
    if inode is None:
        return None
    for pid in workers_of(host):
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


async def connect(
    host: ServerProcess, worker: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that the kernel handed to ``worker`` (new ones until it does)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection(HOST, host.port)
        port = writer.get_extra_info("sockname")[1]
        found = None
        for _ in range(100):
            found = await asyncio.to_thread(worker_of_connection, host, port)
            if found is not None:
                break
            await asyncio.sleep(0.02)
        if found == worker:
            return reader, writer
        writer.close()
        await writer.wait_closed()
    raise AssertionError(f"no connection reached worker {worker} of {host.url}")


@dataclass
class Answer:
    """A response whose status and headers have arrived; its body is read by :meth:`body`."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter  # kept: the connection closes with it

    async def body(self) -> bytes | None:
        """The whole body, or None when the connection was cut short of Content-Length."""
        try:
            body = await asyncio.wait_for(self.reader.read(), BOUND)  # Connection: close
        finally:
            self.writer.close()
        return body if len(body) == int(self.headers["content-length"]) else None


async def get_at(host: ServerProcess, worker: int, path: str, **headers: str) -> Answer:
    """``GET path`` sent to ``worker`` (HTTP/1.1, ``Connection: close``), answered."""
    reader, writer = await connect(host, worker)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host.host_port}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)).decode("latin-1")
    status_line, *header_lines = head.strip().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    status = int(status_line.split()[1])
    return Answer(status, {k.lower(): v for k, v in fields.items()}, reader, writer)


async def start_pull(host: ServerProcess, worker: int, image: PushedImage) -> Answer:
    """A client's pull of the layer through ``worker``, answered 200 (body to come)."""
    answer = await get_at(host, worker, f"/v2/{image.repo}/blobs/{image.layer_digest}")
    assert answer.status == 200, (answer.status, await answer.reader.read(300))
    return answer


async def layer_of(answer: Answer, image: PushedImage) -> bytes | None:
    """The pulled layer, or None when the connection was cut (never a wrong clean body)."""
    body = await answer.body()
    assert body is None or body == image.layer, "a clean body with the wrong bytes"
    return body


async def pull_at(host: ServerProcess, worker: int, image: PushedImage) -> bytes | None:
    return await layer_of(await start_pull(host, worker, image), image)


async def peer_get_at(host: ServerProcess, worker: int, digest: Digest, start: int = 0) -> Answer:
    """A signed peer request (what another host sends) for ``digest``, to ``worker``."""
    path = f"/-/fleet/blobs/{digest}"
    headers = {"Authorization": credential.sign(SECRET, "GET", path)}
    if start:
        headers["Range"] = f"bytes={start}-"
    return await get_at(host, worker, path, **headers)


def partial_file(host: ServerProcess, digest: Digest) -> Path:
    return host.data_dir / "fills" / f"{digest.algorithm}-{digest.hex}.partial"


def filler(host: ServerProcess, digest: Digest) -> int | None:
    """The pid of the worker filling ``digest``: the holder of its partial file's lock."""
    try:
        inode = partial_file(host, digest).stat().st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.replace("->", "").split()  # "1: FLOCK ADVISORY WRITE <pid> <dev>:<ino> ..."
        if fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


async def until_filler(host: ServerProcess, digest: Digest) -> int:
    for _ in range(int(BOUND / 0.02)):
        if (pid := filler(host, digest)) is not None:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody fills {digest} on {host.url}")


def two_workers(host: ServerProcess) -> list[int]:
    pids = workers_of(host)
    assert len(pids) == 2, pids
    return pids


def total(text: str, family: str) -> float:
    """The sum of every labelled series of ``family``."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(family + "{")
    )


def blob_puts(moto: MotoS3, bucket: str, digest: Digest) -> int:
    """PUTs of the blob's data object that moto logged (write-backs; a single-part
    upload: the test blobs are below the multipart threshold)."""
    key = f"{PREFIX}/docker/registry/v2/blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}/data"
    log = moto.log_path.read_text(errors="replace")
    return len(re.findall(rf'"PUT /{bucket}/{re.escape(key)} HTTP', log))


# -- what the tests do again and again -----------------------------------------------------


async def held_fill(
    rig: Rig, host: ServerProcess, worker: int, image: PushedImage
) -> tuple[Answer, int]:
    """A pull of the layer started at ``worker``, whose fill's upstream body the proxy
    holds after 1 MiB (until ``rig.proxy.release``): (its answer, the filling worker)."""
    rig.proxy.hold_after = 1 * MiB
    pull = await start_pull(host, worker, image)
    await asyncio.wait_for(rig.proxy.held.wait(), BOUND)
    return pull, await until_filler(host, image.layer_digest)


def other_worker(host: ServerProcess, worker: int) -> int:
    (other,) = set(two_workers(host)) - {worker}
    return other


async def pull_at_every_worker(hosts: list[ServerProcess], image: PushedImage) -> None:
    """The layer pulled whole through every worker of every host, one after another."""
    for host in hosts:
        for worker in two_workers(host):
            assert await pull_at(host, worker, image) == image.layer


async def written_back_once(fleet: Fleet, digest: Digest) -> None:
    """Until the blob's lease is released (its holder wrote it back): one upload of it."""
    await fleet.until_gone(fleet.lease_key(digest))
    assert blob_puts(fleet.moto, fleet.bucket, digest) == 1
