"""Requests racing on one upload session in different worker processes.

Two apps over one data directory stand for two workers: their asyncio locks are
separate, so only what the filesystem gives (the file lock, atomic renames) keeps them
apart. A request racing a commit in another process gets an envelope answer, never a
500, and the blob the commit acknowledged is stored whole.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import threading

from regmirror import gc
from regmirror.api.keys import REGISTRY
from regmirror.config import Settings
from regmirror.uploads import GONE_SUFFIX
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    client,
    data_dir,
    make_client,
    sha256,
    start_upload,
)
from tests.test_upload_races import NAME, HeldCommit, assert_store_sound, outcome

UNKNOWN = (404, "BLOB_UPLOAD_UNKNOWN")


class HeldRemoval:
    """Pauses the first file deletion made through a directory descriptor (how a
    directory tree is deleted) of a session's file, until :meth:`resume`: a cancel in
    one process held mid-delete while another process acts."""

    def __init__(self, monkeypatch):
        self.paused, self.go = threading.Event(), threading.Event()
        unlink = os.unlink

        def held(path, *args, dir_fd=None, **kwargs):
            if dir_fd is not None and path in ("data", "info.json") and not self.paused.is_set():
                self.paused.set()
                self.go.wait(timeout=10)
            return unlink(path, *args, dir_fd=dir_fd, **kwargs)

        monkeypatch.setattr(os, "unlink", held)

    async def until_paused(self) -> None:
        for _ in range(1000):
            if self.paused.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the cancel never started deleting the session")

    def resume(self) -> None:
        self.go.set()


async def test_a_cancel_in_one_process_never_deletes_a_commit_in_another(
    make_client, data_dir, monkeypatch
):
    # The 500 seen with 2 workers: a DELETE had opened the session's directory and was
    # deleting its files when the PUT in another worker froze (renamed) it; the delete
    # went on inside the frozen session, and the commit found its data gone.
    first, second = await make_client(), await make_client()
    data = blob_bytes(100_000, seed=50)
    held = HeldCommit(first.app[REGISTRY])
    monkeypatch.setattr(first.app[REGISTRY], "commit_blob", held)
    location = await start_upload(first, NAME)
    assert (await first.patch(location, data=data)).status == 202
    removal = HeldRemoval(monkeypatch)

    delete = asyncio.create_task(second.delete(location))
    await removal.until_paused()
    put = asyncio.create_task(first.put(f"{location}?digest={sha256(data)}"))
    entered = asyncio.create_task(held.entered.wait())
    await asyncio.wait({put, entered}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    removal.resume()
    deleted = await asyncio.wait_for(delete, 10)
    held.release.set()
    put_response = await asyncio.wait_for(put, 10)
    entered.cancel()

    put_outcome, delete_outcome = await outcome(put_response), await outcome(deleted)
    assert (put_outcome, delete_outcome) in {
        ((201, None), UNKNOWN),  # the freeze took the session first
        (UNKNOWN, (204, None)),  # the cancel did
    }, (put_outcome, delete_outcome)
    if put_response.status == 201:
        blob = await first.get(f"/v2/{NAME}/blobs/{sha256(data)}")
        assert await blob.read() == data
    assert_store_sound(data_dir)
    assert list((data_dir / "uploads").iterdir()) == []


async def test_requests_in_another_process_on_a_committing_session_are_unknown(
    make_client, data_dir, monkeypatch
):
    first, second = await make_client(), await make_client()
    data = blob_bytes(100_000, seed=51)
    held = HeldCommit(first.app[REGISTRY])
    monkeypatch.setattr(first.app[REGISTRY], "commit_blob", held)
    location = await start_upload(first, NAME)
    assert (await first.patch(location, data=data)).status == 202
    put = asyncio.create_task(first.put(f"{location}?digest={sha256(data)}"))
    await asyncio.wait_for(held.entered.wait(), 10)

    others = [
        second.patch(location, data=b"late"),
        second.get(location),
        second.delete(location),
        second.put(f"{location}?digest={sha256(data)}"),
    ]
    responses = await asyncio.wait_for(asyncio.gather(*others), timeout=10)
    held.release.set()

    for response in responses:
        assert await outcome(response) == UNKNOWN
    assert (await put).status == 201
    assert await (await second.get(f"/v2/{NAME}/blobs/{sha256(data)}")).read() == data
    assert_store_sound(data_dir)


def test_gc_removes_a_cancel_that_never_finished(data_dir):
    # A cancel renames the session to <uuid>.gone-<random> before deleting it; a process
    # killed in between leaves it, and with no server running it is garbage whatever its age.
    uploads = data_dir / "uploads"
    gone = uploads / ("e" * 32 + GONE_SUFFIX + "0" * 32)
    gone.mkdir(parents=True)
    (gone / "data").write_bytes(b"g" * 700)
    live = uploads / ("f" * 32)
    live.mkdir()
    (live / "data").write_bytes(b"l" * 10)

    report = gc.collect(Settings(data_dir=str(data_dir)))

    assert [(r.path, r.bytes) for r in report.removed] == [(str(gone.relative_to(data_dir)), 700)]
    assert not gone.exists() and live.exists()


async def test_a_write_refused_in_another_process_is_told_what_the_session_holds(
    make_client, data_dir
):
    # One process answers a write to a busy session with Range: what the session held
    # before the chunk being written. Another process read the file's size instead, which
    # counts the chunk still streaming in (seen with 2 workers: '0-1126399' for '0-0').
    first, second = await make_client(), await make_client()
    held_before = blob_bytes(1000, seed=52)
    location = await start_upload(first, NAME)
    assert (await first.patch(location, data=held_before)).status == 202
    session = data_dir / "uploads" / location.rstrip("/").rsplit("/", 1)[-1] / "data"
    go = asyncio.Event()

    async def stalling():
        yield b"s" * 5000
        await go.wait()
        yield b"t" * 10

    writing = asyncio.create_task(first.patch(location, data=stalling()))
    for _ in range(1000):
        if session.stat().st_size > len(held_before):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the chunk never reached the session")

    refused = await second.patch(location, data=b"late")
    assert refused.status == 416, await refused.text()
    assert refused.headers["Range"] == f"0-{len(held_before) - 1}"
    go.set()
    assert (await asyncio.wait_for(writing, 10)).status == 202
