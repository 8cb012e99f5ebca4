"""Review attack: a fill followed across processes must not end cleanly with the bytes of
another fill of the same digest that failed.

Across processes sharing a data directory the partial file is the single-flight token;
a process that finds it locked tails it. If the owner's fill fails its digest check
(it deletes the partial file) and a new fill of the same digest claims the same path
before the follower looks again, the follower used to take the new file for the one it
was following: its readers, reading the failed fill's (unlinked) file, ended cleanly
once the new fill stored the blob, with the wrong bytes.

Two :class:`Fills` over one directory stand for the two processes (``flock`` locks are
per open file, so they exclude each other exactly as processes do).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from regmirror import fill as fill_module
from regmirror.digest import Digest
from regmirror.fill import FillFailed, Fills, Source
from regmirror.storage.filesystem import FilesystemDriver
from tests.test_fill import stream

SIZE = 300_000
BOUND = 30.0


def gated(data: bytes, gate: asyncio.Event) -> Source:
    """A source that sends all but the last byte, then the last once ``gate`` is set."""

    async def open_at(offset: int) -> tuple[int, AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield data[offset:-1]
            await gate.wait()
            yield data[-1:]

        return len(data), chunks()

    return open_at


async def never(offset: int) -> tuple[int, AsyncIterator[bytes]]:
    raise AssertionError("the follower must not fetch: the owner does")


async def until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.01)  # polls a file another "process" writes


@pytest.mark.parametrize("second_fill_done_between_looks", [False, True])
async def test_a_follower_never_ends_cleanly_with_a_failed_fills_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second_fill_done_between_looks: bool
) -> None:
    # The follower looks rarely, so the owner's retry falls between two looks.
    monkeypatch.setattr(fill_module, "TAIL_INTERVAL", 0.5)
    good = os.urandom(SIZE)
    bad = bytes([good[0] ^ 0xFF]) + good[1:]  # same size, wrong digest
    digest = Digest.of(good)
    owner = Fills(FilesystemDriver(tmp_path), timeout=BOUND)
    follower = Fills(FilesystemDriver(tmp_path), timeout=BOUND)
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    try:
        first = await owner.fetch(digest, gated(bad, first_gate))
        partial = owner.partial_path(digest)
        await until(lambda: partial.exists() and partial.stat().st_size == SIZE - 1, "bytes")

        followed = await follower.fetch(digest, never)
        received: list[bytes] = []

        async def read() -> bytes:
            async for chunk in stream(followed):
                received.append(chunk)
            return b"".join(received)

        reader = asyncio.create_task(read())
        await until(lambda: sum(map(len, received)) == SIZE - 1, "the follower's bytes")

        first_gate.set()  # the first fill fails its digest check and drops its file
        with pytest.raises(FillFailed):
            await first.wait()
        if second_fill_done_between_looks:
            second_gate.set()
        second = await owner.fetch(digest, gated(good, second_gate))  # a retry, same path
        second_gate.set()
        assert await second.wait() == second.final

        try:
            body = await asyncio.wait_for(reader, BOUND)
        except FillFailed:
            return  # cut: the client retries and gets the stored, verified blob
        assert Digest.of(body) == digest, "a follower ended cleanly with unverified bytes"
    finally:
        first_gate.set()
        second_gate.set()
        await owner.close()
        await follower.close()
