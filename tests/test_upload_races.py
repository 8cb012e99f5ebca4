"""Requests racing on one upload session never put bytes in the store that do not match.

The invariant (issue 7, finding 1): a blob enters the store only as bytes verified in the
same step that moves them in. Whatever PATCH, PUT, DELETE, status request or expiry does
to the session meanwhile, every stored blob re-hashes to its name, a request on a session
that is committing or committed is BLOB_UPLOAD_UNKNOWN, a write to a session another
request is writing is refused at once (416 BLOB_UPLOAD_INVALID, issue 9), and nothing
answers 5xx.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from regmirror.api.keys import REGISTRY, UPLOADS
from regmirror.errors import Unavailable
from regmirror.fsck import check_store
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    client,
    data_dir,
    error_code,
    make_client,
    sha256,
    start_upload,
)
from tests.support.processes import ServerProcess, regmirror_server  # noqa: F401

NAME = "lib/app"
BUSY = (416, "BLOB_UPLOAD_INVALID")  # another request is writing the session
TRIALS = 30
ROUNDS = 200
DEADLINE = 120.0  # seconds for the whole hammer, so a hang fails instead of stalling CI


def assert_store_sound(data_dir) -> int:
    report = check_store(data_dir)
    assert report.ok, report.bad
    return report.checked


async def outcome(response) -> tuple[int, str | None]:
    code = await error_code(response) if response.status >= 400 else None
    return response.status, code


class Remote:
    """A client of a real ``regmirror serve`` process, with paths relative to its root."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession):
        self.server, self.session = server, session

    def get(self, path: str, **kwargs):
        return self.session.get(self.server.url + path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.session.post(self.server.url + path, **kwargs)

    def put(self, path: str, **kwargs):
        return self.session.put(self.server.url + path, **kwargs)

    def patch(self, path: str, **kwargs):
        return self.session.patch(self.server.url + path, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.session.delete(self.server.url + path, **kwargs)


@pytest.fixture
async def remote(regmirror_server) -> AsyncIterator[Remote]:
    server = regmirror_server()
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Remote(server, session)


async def test_patch_racing_the_closing_put_never_lands_in_the_stored_blob(remote):
    # The reproduction, against `regmirror serve`: PATCH the whole blob,
    # PUT ?digest, immediately PATCH 100 more bytes.
    client, data_dir = remote, remote.server.data_dir
    for trial in range(TRIALS):
        data = blob_bytes(256 * 1024, seed=trial)
        location = await start_upload(client, NAME)
        assert (await client.patch(location, data=data)).status == 202

        put, patch = await asyncio.gather(
            client.put(f"{location}?digest={sha256(data)}"),
            client.patch(location, data=b"y" * 100),
        )

        put_outcome, patch_outcome = await outcome(put), await outcome(patch)
        assert (put_outcome, patch_outcome) in {
            ((201, None), (404, "BLOB_UPLOAD_UNKNOWN")),  # the PUT froze the session first
            # ... in another worker, which held the file lock but had not yet renamed it
            # when this PATCH tried it (README "What differs": 416 rather than 404)
            ((201, None), BUSY),
            ((400, "DIGEST_INVALID"), (202, None)),  # the PATCH was appended first
            (BUSY, (202, None)),  # the PUT came while the PATCH was being appended
        }, (trial, put_outcome, patch_outcome)
        if put.status == 201:
            blob = await client.get(f"/v2/{NAME}/blobs/{sha256(data)}")
            assert await blob.read() == data, f"trial {trial}: stored blob is not what was pushed"
    assert_store_sound(data_dir)


async def test_hammering_one_session_with_patch_put_delete_and_status(remote):
    client, data_dir = remote, remote.server.data_dir
    rng = random.Random(7)
    allowed = {
        "PATCH": {(202, None), (404, "BLOB_UPLOAD_UNKNOWN"), BUSY},
        "PUT": {(201, None), (400, "DIGEST_INVALID"), (404, "BLOB_UPLOAD_UNKNOWN"), BUSY},
        "DELETE": {(204, None), (404, "BLOB_UPLOAD_UNKNOWN")},
        "GET": {(204, None), (404, "BLOB_UPLOAD_UNKNOWN")},
    }
    committed: dict[str, bytes] = {}
    started = time.monotonic()
    for round_ in range(ROUNDS):
        assert time.monotonic() - started < DEADLINE, f"hammer too slow at round {round_}"
        base = blob_bytes(rng.randrange(1, 96 * 1024), seed=round_)
        extras = [bytes([65 + i]) * rng.randrange(1, 5000) for i in range(3)]
        location = await start_upload(client, NAME)
        assert (await client.patch(location, data=base)).status == 202
        candidates = {sha256(base): base, sha256(base + extras[0]): base + extras[0]}
        calls = [("PATCH", client.patch(location, data=extra)) for extra in extras]
        calls += [("PUT", client.put(f"{location}?digest={digest}")) for digest in candidates]
        calls += [("GET", client.get(location)) for _ in range(2)]
        if rng.random() < 0.3:
            calls.append(("DELETE", client.delete(location)))
        rng.shuffle(calls)

        responses = await asyncio.gather(*(call for _, call in calls))

        puts_created = 0
        for (method, _), response in zip(calls, responses, strict=True):
            got = await outcome(response)
            assert got in allowed[method], (round_, method, got)
            if method == "PUT" and response.status == 201:
                puts_created += 1
                digest = response.headers["Docker-Content-Digest"]
                committed[digest] = candidates[digest]
        assert puts_created <= 1, f"round {round_}: one session committed twice"
        # Every PUT may have come while a PATCH was being written (BUSY): drop the rest.
        assert await outcome(await client.delete(location)) in allowed["DELETE"]
    assert committed, "no round committed a blob: the hammer tested nothing"
    assert assert_store_sound(data_dir) >= len(committed)
    for digest, data in committed.items():
        response = await client.get(f"/v2/{NAME}/blobs/{digest}")
        assert await response.read() == data
    assert list((data_dir / "uploads").iterdir()) == []  # no session or frozen file left behind


def make_stale(client, session) -> None:
    old = time.time() - client.app[UPLOADS].ttl - 60
    for name in ("info.json", "data"):
        os.utime(session / name, (old, old))


class SlowChunk:
    """A PATCH whose body sends ``head``, then holds ``tail`` until :meth:`finish`: the
    session stays mid-chunk for as long as a test needs."""

    def __init__(self, client, location: str, head: bytes, tail: bytes):
        self.resume = asyncio.Event()

        async def body():
            yield head
            await self.resume.wait()
            yield tail

        self.patch = asyncio.create_task(client.patch(location, data=body()))

    async def until_written(self, session, past: int = 0) -> None:
        """Until the session's file holds more than ``past`` bytes (the server writes the
        first batch; nothing to await but the file)."""
        data, deadline = session / "data", time.monotonic() + 10
        while not data.exists() or data.stat().st_size <= past:
            assert time.monotonic() < deadline, "the first batch never reached the session"
            await asyncio.sleep(0.01)

    async def finish(self):
        self.resume.set()
        return await self.patch


async def test_expiry_racing_a_commit_never_breaks_it(client, data_dir):
    for trial in range(TRIALS):
        data = blob_bytes(128 * 1024, seed=1000 + trial)
        location = await start_upload(client, NAME)
        assert (await client.patch(location, data=data)).status == 202
        make_stale(client, data_dir / "uploads" / location.rsplit("/", 1)[1])

        put, _ = await asyncio.gather(
            client.put(f"{location}?digest={sha256(data)}"), client.app[UPLOADS].expire()
        )

        assert await outcome(put) in {(201, None), (404, "BLOB_UPLOAD_UNKNOWN")}, trial
        if put.status == 201:
            blob = await client.get(f"/v2/{NAME}/blobs/{sha256(data)}")
            assert await blob.read() == data
    assert_store_sound(data_dir)


async def test_expiry_leaves_a_session_alone_while_a_chunk_streams_in(client, data_dir):
    location = await start_upload(client, NAME)
    session = data_dir / "uploads" / location.rsplit("/", 1)[1]
    first, second = blob_bytes(2 * 1024 * 1024, seed=1), blob_bytes(1000, seed=2)
    chunk = SlowChunk(client, location, first, second)
    await chunk.until_written(session)
    make_stale(client, session)  # idle for longer than the TTL, by its files' times

    expired = await client.app[UPLOADS].expire()
    response = await chunk.finish()

    assert expired == 0
    assert response.status == 202, await response.text()
    put = await client.put(f"{location}?digest={sha256(first + second)}")
    assert put.status == 201, await put.text()
    assert_store_sound(data_dir)


class HeldCommit:
    """Wraps the registry's ``commit_blob`` so a test can hold a commit mid-flight."""

    def __init__(self, registry, *, fail_first: Exception | None = None):
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self._commit = registry.commit_blob
        self._fail = fail_first

    async def __call__(self, name, digest, data):
        self.entered.set()
        await self.release.wait()
        if self._fail is not None:
            failure, self._fail = self._fail, None
            raise failure
        await self._commit(name, digest, data)


async def committing(client, monkeypatch, data: bytes, *, stale_in=None):
    """A session holding ``data`` whose closing PUT is held inside the store's commit
    (after the freeze): (the hold, the session's location, the PUT's task). ``stale_in``:
    the data directory, to make the session look expired first."""
    registry = client.app[REGISTRY]
    held = HeldCommit(registry)
    monkeypatch.setattr(registry, "commit_blob", held)
    location = await start_upload(client, NAME)
    assert (await client.patch(location, data=data)).status == 202
    if stale_in is not None:
        make_stale(client, stale_in / "uploads" / location.rsplit("/", 1)[1])
    put = asyncio.create_task(client.put(f"{location}?digest={sha256(data)}"))
    await held.entered.wait()
    return held, location, put


async def test_requests_on_a_committing_session_are_unknown_at_once(client, data_dir, monkeypatch):
    data = blob_bytes(100_000, seed=5)
    held, location, put = await committing(client, monkeypatch, data)

    others = [
        client.patch(location, data=b"late"),
        client.get(location),
        client.delete(location),
        client.put(f"{location}?digest={sha256(data)}"),
    ]
    responses = await asyncio.wait_for(asyncio.gather(*others), timeout=10)
    held.release.set()

    for response in responses:
        assert await outcome(response) == (404, "BLOB_UPLOAD_UNKNOWN")
    assert (await put).status == 201
    assert await (await client.get(f"/v2/{NAME}/blobs/{sha256(data)}")).read() == data
    assert_store_sound(data_dir)


async def test_expiry_leaves_a_committing_session_alone(client, data_dir, monkeypatch):
    data = blob_bytes(100_000, seed=6)
    held, _, put = await committing(client, monkeypatch, data, stale_in=data_dir)

    expired = await client.app[UPLOADS].expire()
    held.release.set()

    assert expired == 0
    assert (await put).status == 201
    assert await (await client.get(f"/v2/{NAME}/blobs/{sha256(data)}")).read() == data


async def test_a_commit_the_store_refuses_leaves_the_session_to_retry(
    client, data_dir, monkeypatch
):
    registry = client.app[REGISTRY]
    held = HeldCommit(registry, fail_first=Unavailable("S3 is down"))
    held.release.set()
    monkeypatch.setattr(registry, "commit_blob", held)
    data = blob_bytes(100_000, seed=8)
    location = await start_upload(client, NAME)
    assert (await client.patch(location, data=data)).status == 202

    failed = await client.put(f"{location}?digest={sha256(data)}")

    assert await outcome(failed) == (503, "UNAVAILABLE")
    status = await client.get(location)
    assert status.status == 204 and status.headers["Range"] == f"0-{len(data) - 1}"
    retried = await client.put(f"{location}?digest={sha256(data)}")
    assert retried.status == 201, await retried.text()
    assert await (await client.get(f"/v2/{NAME}/blobs/{sha256(data)}")).read() == data


async def test_commit_in_one_process_refuses_a_chunk_streaming_in_another(make_client, data_dir):
    # Two apps on one data directory stand for two worker processes: their asyncio locks
    # are separate, so only the file lock keeps the freeze from overtaking the append.
    first, second = await make_client(), await make_client()
    base = blob_bytes(10_000, seed=20)
    head, tail = blob_bytes(2 * 1024 * 1024, seed=21), blob_bytes(1000, seed=22)
    location = await start_upload(first, NAME)
    assert (await first.patch(location, data=base)).status == 202
    session = data_dir / "uploads" / location.rsplit("/", 1)[1]
    chunk = SlowChunk(second, location, head, tail)
    await chunk.until_written(session, past=len(base))
    # The digest of what the file holds right now: a commit that froze it mid-chunk
    # would verify and store it, then the rest of the chunk would land in the store.
    put = await asyncio.wait_for(first.put(f"{location}?digest={sha256(base + head)}"), 5)
    patch = await chunk.finish()

    assert await outcome(put) == BUSY, "the commit did not refuse the session being appended"
    assert patch.status == 202
    done = await first.put(f"{location}?digest={sha256(base + head + tail)}")
    assert done.status == 201, await done.text()
    assert_store_sound(data_dir)


async def test_expiry_in_one_process_leaves_a_session_another_is_appending_to(
    make_client, data_dir
):
    first, second = await make_client(), await make_client()
    location = await start_upload(first, NAME)
    session = data_dir / "uploads" / location.rsplit("/", 1)[1]
    head, tail = blob_bytes(2 * 1024 * 1024, seed=30), blob_bytes(1000, seed=31)
    chunk = SlowChunk(second, location, head, tail)
    await chunk.until_written(session)
    make_stale(first, session)

    expired = await first.app[UPLOADS].expire()
    patch = await chunk.finish()

    assert expired == 0
    assert patch.status == 202
    put = await first.put(f"{location}?digest={sha256(head + tail)}")
    assert put.status == 201, await put.text()


async def test_expiry_in_one_process_leaves_a_session_another_is_committing(
    make_client, data_dir, monkeypatch
):
    first, second = await make_client(), await make_client()
    data = blob_bytes(100_000, seed=40)
    held, _, put = await committing(first, monkeypatch, data, stale_in=data_dir)

    expired = await second.app[UPLOADS].expire()
    held.release.set()

    assert expired == 0
    assert (await put).status == 201
    assert await (await first.get(f"/v2/{NAME}/blobs/{sha256(data)}")).read() == data
