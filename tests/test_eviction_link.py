"""The eviction owner's mailbox (regmirror/eviction_link.py): two caches on one data
directory in one event loop, as worker 0 and another worker, talking over the real
unix datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from regmirror import eviction_link, layout
from regmirror.digest import Digest
from regmirror.eviction import BlobCache, State
from regmirror.eviction_link import OwnerLink, OwnerMailbox, socket_path


@dataclass
class Pair:
    owner: BlobCache
    other: BlobCache
    root: Path


def store(root: Path, size: int) -> Digest:
    data = os.urandom(size)
    digest = Digest.of(data)
    path = root / layout.blob_data(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


async def until(condition: object, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not in time")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    root, run = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    owner = BlobCache(root, max_bytes=10_000, min_free_bytes=0)
    link = OwnerLink(run)
    other = BlobCache(root, max_bytes=10_000, min_free_bytes=0, evicts=False, link=link)
    mailbox = OwnerMailbox(run, owner)
    await mailbox.start()
    await link.start()
    await owner.load()
    await other.load()
    yield Pair(owner, other, root)
    link.close()
    await mailbox.close()
    await owner.close()
    await other.close()


async def test_what_another_worker_stores_the_owner_counts_and_evicts_at_once(
    pair: Pair,
) -> None:
    digests = [store(pair.root, 3000) for _ in range(5)]
    for digest in digests:
        pair.other.added(digest, 3000, evictable=True)
    await until(lambda: digests[-1] in pair.owner._entries)
    await pair.owner.settle()
    assert pair.owner.total <= 8500  # the low watermark of max_bytes
    on_disk = [d for d in digests if (pair.root / layout.blob_data(d)).exists()]
    assert on_disk == digests[-len(on_disk) :] and len(on_disk) == 2  # the coldest went
    pinned = store(pair.root, 100)
    pair.other.added(pinned, 100, evictable=False)
    await until(lambda: pinned in pair.owner._entries)
    assert pair.owner.state(pinned) is State.PINNED


async def test_another_workers_fill_is_reserved_in_the_owner_until_released(
    pair: Pair,
) -> None:
    reservation = pair.other.reserve(4000)
    await until(lambda: pair.owner.reserved == 4000)
    reservation.release()
    await until(lambda: pair.owner.reserved == 0)
    dead = pair.other.reserve(700)
    await until(lambda: pair.owner.reserved == 700)
    pair.owner.drop_remote(lambda pid: pid != os.getpid())  # as if this pid had died
    assert pair.owner.reserved == 0
    dead.release()  # a late release of a dropped one changes nothing
    await asyncio.sleep(0.05)
    assert pair.owner.reserved == 0


async def test_another_worker_gets_room_and_admission_from_the_owner(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = [store(pair.root, 2000) for _ in range(3)]
    for digest in digests:
        pair.owner.added(digest, 2000, evictable=True)  # stored by worker 0
    await pair.owner.settle()
    free = {"bytes": 500}
    monkeypatch.setattr(
        "regmirror.eviction.disk_free",
        lambda root: (
            free["bytes"]
            + 2000 * (3 - sum((pair.root / layout.blob_data(d)).exists() for d in digests))
        ),
    )
    # The other worker's own index knows none of them: only the owner can say yes.
    assert pair.other.evictable_bytes() == 0
    assert await pair.other.admit(3000) is None
    freed = await pair.other.make_room(3000)
    assert freed >= 2000 and not (pair.root / layout.blob_data(digests[0])).exists()


async def test_without_an_owner_the_worker_decides_alone_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eviction_link, "ASK_TIMEOUT", 0.2)
    link = OwnerLink(tmp_path)  # nobody listens there
    cache = BlobCache(tmp_path, max_bytes=10_000, evicts=False, link=link)
    await link.start()
    try:
        assert await cache.make_room(1000) == 0
        cache.added(store(tmp_path, 10), 10, evictable=True)  # no error: told to nobody
    finally:
        link.close()
        await cache.close()


async def test_a_malformed_message_is_ignored(pair: Pair, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"stored nonsense", b"reserve k x", b"\xff\xfe", b"evict all"):
            sock.sendto(junk, str(socket_path(tmp_path / "run")))
    reservation = pair.other.reserve(10)  # still answering
    await until(lambda: pair.owner.reserved == 10)
    reservation.release()
