"""Single-flight streaming fills against a real upstream: registry:2 behind a counting proxy."""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regmirror import fill as fill_module
from regmirror import layout
from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.eviction import BlobCache
from regmirror.fill import Fill, FillFailed, Fills, FillStats, Source
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.upstream import Upstream
from tests.support.processes import ServerProcess
from tests.support.upstream import CountingProxy, push_blob, serve, upstream_registry


async def stream(fill: Fill, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
    """A reader of the fill, as the blob handler is, but reading the spans with pread."""
    async for part in fill.parts(start, end):
        if isinstance(part, bytes):
            yield part
            continue
        pos, fd = part.pos, part.file.fileno()
        while pos < part.limit:
            data = await asyncio.to_thread(os.pread, fd, min(1 << 18, part.limit - pos), pos)
            assert data, f"file ended at {pos}"
            pos += len(data)
            yield data


__all__ = ["upstream_registry"]

REPO = "team/app"
SIZE = 1024 * 1024 + 12345  # a few chunks, and not a multiple of any chunk size
BOUND = 30.0  # seconds: the longest any test waits for anything


@dataclass
class Setup:
    proxy: CountingProxy
    upstream: Upstream
    fills: Fills
    stats: FillStats
    data: bytes
    digest: Digest
    root: Path

    def source(self) -> Source:
        async def open_source(offset: int) -> tuple[int, AsyncIterator[bytes]]:
            return await self.upstream.open_blob(REPO, self.digest, offset)

        return open_source

    async def fetch(self, fills: Fills | None = None) -> Fill:
        return await (fills or self.fills).fetch(self.digest, self.source())

    def stored(self) -> Path:
        return self.root / layout.blob_data(self.digest)


async def read(fill: Fill, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in stream(fill, start, end)])


async def fetch_and_read(setup: Setup, fills: Fills | None = None) -> bytes:
    return await read(await setup.fetch(fills))


def no_partials(fills: Fills) -> bool:
    return not fills.directory.exists() or not any(fills.directory.iterdir())


@pytest.fixture
async def setup(upstream_registry: ServerProcess, tmp_path: Path) -> AsyncIterator[Setup]:
    async with aiohttp.ClientSession() as session:
        data = secrets.token_bytes(SIZE)
        digest = await push_blob(session, upstream_registry.url, REPO, data)
        proxy = CountingProxy(upstream_registry.url, session)
        async with serve(proxy.app()) as url:
            upstream = Upstream(UpstreamSettings(url=url), session)
            stats = FillStats()
            root = tmp_path / "data"
            fills = Fills(FilesystemDriver(root), timeout=BOUND, observer=stats)
            try:
                yield Setup(proxy, upstream, fills, stats, data, digest, root)
            finally:
                proxy.release.set()
                await fills.close()


async def test_hundred_concurrent_fetches_make_one_upstream_get(setup: Setup) -> None:
    setup.proxy.hold_after = 200 * 1024
    early = [asyncio.create_task(fetch_and_read(setup)) for _ in range(50)]
    await asyncio.wait_for(setup.proxy.held.wait(), BOUND)  # the fill is mid-body now
    joined = [await setup.fetch() for _ in range(50)]  # join the fill in flight
    late = [asyncio.create_task(read(fill)) for fill in joined]
    setup.proxy.release.set()
    bodies = await asyncio.wait_for(asyncio.gather(*early, *late), BOUND)

    assert setup.proxy.blob_gets == 1
    assert len(bodies) == 100 and all(body == setup.data for body in bodies)
    assert setup.stats.started == 1
    assert setup.stats.coalesced == 99
    assert setup.stats.results == {"ok": 1}
    assert setup.stored().read_bytes() == setup.data
    assert no_partials(setup.fills)


async def test_waiters_stream_before_the_fill_completes(setup: Setup) -> None:
    setup.proxy.hold_after = 300 * 1024
    fill = await setup.fetch()
    waiter = await setup.fetch()
    first = await asyncio.wait_for(anext(aiter(stream(waiter))), BOUND)
    assert first == setup.data[: len(first)]
    assert not fill.done  # the first byte arrived while the upstream body is held
    setup.proxy.release.set()
    assert await asyncio.wait_for(fill.wait(), BOUND) == setup.stored()


async def test_a_cancelled_reader_does_not_cancel_the_fill(setup: Setup) -> None:
    setup.proxy.hold_after = 100 * 1024
    fill = await setup.fetch()
    got_bytes = asyncio.Event()

    async def reader() -> None:
        async for _ in stream(fill):
            got_bytes.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(got_bytes.wait(), BOUND)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    setup.proxy.release.set()

    await asyncio.wait_for(fill.wait(), BOUND)
    assert await read(fill) == setup.data
    assert setup.stored().read_bytes() == setup.data
    assert setup.proxy.blob_gets == 1


async def test_a_source_dying_mid_stream_fails_every_reader_and_stores_nothing(
    setup: Setup,
) -> None:
    setup.proxy.cut_after = 300 * 1024
    fill = await setup.fetch()
    received = [0] * 10

    async def reader(i: int) -> None:
        async for chunk in stream(fill):
            received[i] += len(chunk)

    results = await asyncio.wait_for(
        asyncio.gather(*(reader(i) for i in range(10)), return_exceptions=True), BOUND
    )
    assert all(isinstance(r, FillFailed) for r in results), results
    assert all(n < SIZE for n in received)
    assert not setup.stored().exists()
    assert no_partials(setup.fills)
    assert setup.stats.results == {"source_error": 1}

    setup.proxy.cut_after = None  # the next fetch starts a new fill, which succeeds
    assert await asyncio.wait_for(fetch_and_read(setup), BOUND) == setup.data
    assert setup.proxy.blob_gets == 2
    assert setup.stored().read_bytes() == setup.data


async def test_wrong_bytes_fail_the_fill_and_store_nothing(setup: Setup) -> None:
    setup.proxy.corrupt = True
    with pytest.raises(FillFailed, match="not sha256"):
        await asyncio.wait_for(fetch_and_read(setup), BOUND)
    assert not setup.stored().exists()
    assert no_partials(setup.fills)
    assert setup.stats.results == {"digest_mismatch": 1}


async def test_a_size_unlike_the_descriptor_fails_the_fill(setup: Setup) -> None:
    fill = await setup.fills.fetch(setup.digest, setup.source(), size=SIZE + 1)
    with pytest.raises(FillFailed, match="descriptor"):
        await asyncio.wait_for(read(fill), BOUND)
    assert not setup.stored().exists()
    assert setup.stats.results == {"size_mismatch": 1}


async def test_a_fill_that_outlives_its_timeout_fails(setup: Setup) -> None:
    setup.proxy.hold_after = 1000  # and never released
    fills = Fills(FilesystemDriver(setup.root), timeout=0.5, observer=setup.stats)
    try:
        with pytest.raises(FillFailed, match="timed out"):
            await asyncio.wait_for(fetch_and_read(setup, fills), BOUND)
        assert no_partials(fills)
        assert not setup.stored().exists()
        assert setup.stats.results == {"timeout": 1}
    finally:
        await fills.close()


async def test_range_reads_during_a_fill_return_the_right_bytes(setup: Setup) -> None:
    setup.proxy.hold_after = 300 * 1024
    fill = await setup.fetch()
    await asyncio.wait_for(setup.proxy.held.wait(), BOUND)

    tail = asyncio.create_task(read(fill, SIZE - 10))  # waits for bytes not yet here
    middle = asyncio.create_task(read(fill, 500_000, 600_000))
    early = asyncio.create_task(read(fill, 1000, 2000))  # bytes already here: still waits
    setup.proxy.release.set()
    assert await asyncio.wait_for(tail, BOUND) == setup.data[-10:]
    assert await asyncio.wait_for(middle, BOUND) == setup.data[500_000:600_000]
    assert await asyncio.wait_for(early, BOUND) == setup.data[1000:2000]
    assert await read(fill, 7, 8) == setup.data[7:8]


async def test_a_range_of_bytes_already_filled_ends_only_once_the_digest_is_verified(
    setup: Setup,
) -> None:
    setup.proxy.hold_after = 300 * 1024
    fill = await setup.fetch()
    await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
    parts = aiter(stream(fill, 1000, 2000))

    first = await asyncio.wait_for(anext(parts), BOUND)  # all but the last byte, at once
    assert first == setup.data[1000:1999]
    last = asyncio.create_task(anext(parts))
    for _ in range(20):
        await asyncio.sleep(0)  # not waiting for work: showing that it is blocked
    assert not last.done() and not fill.done
    setup.proxy.release.set()
    assert await asyncio.wait_for(last, BOUND) == setup.data[1999:2000]
    assert fill.done


async def test_a_range_of_wrong_bytes_never_ends(setup: Setup) -> None:
    setup.proxy.corrupt = True  # byte 0 is wrong: only the digest can tell
    fill = await setup.fetch()
    with pytest.raises(FillFailed):
        await asyncio.wait_for(read(fill, 0, 1024), BOUND)


async def test_the_last_byte_waits_for_verification(setup: Setup) -> None:
    setup.proxy.corrupt = True  # the first byte is wrong: only the digest can tell
    fill = await setup.fetch()
    with pytest.raises(FillFailed):
        await asyncio.wait_for(read(fill, SIZE - 1), BOUND)


async def test_a_fetch_after_the_fill_serves_the_store(setup: Setup) -> None:
    await asyncio.wait_for((await setup.fetch()).wait(), BOUND)
    again = await setup.fetch()
    assert again.done
    assert await read(again) == setup.data
    assert setup.proxy.blob_gets == 1
    assert setup.stats.started == 1


async def test_fills_are_single_flight_across_processes_sharing_the_data_dir(
    setup: Setup,
) -> None:
    # Two Fills on one directory hold separate open files, so flock sees them as two
    # processes would.
    other_stats = FillStats()
    other = Fills(FilesystemDriver(setup.root), timeout=BOUND, observer=other_stats)
    try:
        setup.proxy.hold_after = 200 * 1024
        first = [asyncio.create_task(fetch_and_read(setup)) for _ in range(10)]
        await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
        follower = await setup.fetch(other)
        # The size is known before the end: the owner published it on the partial file.
        assert await asyncio.wait_for(follower.length(), BOUND) == SIZE
        second = [asyncio.create_task(fetch_and_read(setup, other)) for _ in range(10)]
        setup.proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*first, *second), BOUND)
    finally:
        await other.close()
    assert all(body == setup.data for body in bodies)
    assert setup.proxy.blob_gets == 1
    assert setup.stats.results == {"ok": 1}
    assert other_stats.results == {"other_process": 1}
    # One fill for both (the workers of a host): the other's requests joined it.
    assert (setup.stats.started, setup.stats.coalesced) == (1, 9)
    assert (other_stats.started, other_stats.coalesced) == (0, 11)


async def test_remove_stale_deletes_only_unowned_partial_files(setup: Setup) -> None:
    stale = setup.fills.partial_path(Digest.of(b"crashed"))
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a blob")
    setup.proxy.hold_after = 1000
    fill = await setup.fetch()
    await asyncio.wait_for(setup.proxy.held.wait(), BOUND)

    assert await asyncio.to_thread(setup.fills.remove_stale) == 1
    assert not stale.exists()
    assert fill.partial.exists()
    setup.proxy.release.set()
    await asyncio.wait_for(fill.wait(), BOUND)
    assert not os.path.exists(fill.partial)


# -- fills the cache cannot keep: streamed through ----------------------------------


def budgeted(setup: Setup, max_bytes: int, **kwargs: Any) -> Fills:
    """Fills into a cache with a byte budget (and no free-space floor)."""
    cache = BlobCache(setup.root, max_bytes=max_bytes)
    return Fills(
        FilesystemDriver(setup.root), timeout=BOUND, observer=setup.stats, cache=cache, **kwargs
    )


async def test_a_blob_bigger_than_the_budget_streams_through_to_every_waiter_unkept(
    setup: Setup,
) -> None:
    fills = budgeted(setup, SIZE // 2)
    try:
        setup.proxy.hold_after = 200 * 1024
        early = [asyncio.create_task(fetch_and_read(setup, fills)) for _ in range(20)]
        await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
        joined = [await setup.fetch(fills) for _ in range(20)]  # the window still holds byte 0
        late = [asyncio.create_task(read(fill)) for fill in joined]
        assert not any(fill.kept for fill in joined)
        setup.proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*early, *late), BOUND)
    finally:
        await fills.close()
    assert all(body == setup.data for body in bodies)
    assert setup.proxy.blob_gets == 1
    assert setup.stats.results == {"stream_through": 1}
    assert setup.stats.streamed_through == {"over_budget": 1}
    assert not setup.stored().exists()
    assert no_partials(fills)
    with pytest.raises(FillFailed, match="not kept"):
        await joined[0].wait()


async def test_a_reader_that_joins_after_the_window_passed_gets_a_stream_of_its_own(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fill_module, "WINDOW", 64 * 1024)
    fills = budgeted(setup, SIZE // 2)
    try:
        setup.proxy.hold_after = 600 * 1024
        first_fill = await setup.fetch(fills)
        got = bytearray()
        past = asyncio.Event()

        async def first_reader() -> None:
            async for chunk in stream(first_fill):
                got.extend(chunk)
                if len(got) >= 500 * 1024:
                    past.set()

        first = asyncio.create_task(first_reader())
        await asyncio.wait_for(past.wait(), BOUND)  # byte 0 has left the window
        joined = await setup.fetch(fills)
        assert joined is first_fill
        late = [asyncio.create_task(read(joined)) for _ in range(3)]  # they share one replay
        setup.proxy.release.set()
        await asyncio.wait_for(first, BOUND)
        assert bytes(got) == setup.data
        assert await asyncio.wait_for(asyncio.gather(*late), BOUND) == [setup.data] * 3
    finally:
        await fills.close()
    assert setup.proxy.blob_gets == 2
    assert setup.stats.streamed_through == {"over_budget": 1, "late": 1}
    assert setup.stats.results == {"stream_through": 2}
    assert not setup.stored().exists()


async def test_a_reader_that_stalls_a_stream_through_is_cut_and_the_others_finish(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fill_module, "WINDOW", 64 * 1024)
    fills = budgeted(setup, SIZE // 2, idle_timeout=0.5)
    try:
        fill = await setup.fetch(fills)
        stuck = aiter(stream(fill))
        await asyncio.wait_for(anext(stuck), BOUND)  # reads a little, then never again
        assert await asyncio.wait_for(read(fill), BOUND) == setup.data
        with pytest.raises(FillFailed, match="behind"):
            await asyncio.wait_for(anext(stuck), BOUND)
    finally:
        await fills.close()
    assert setup.stats.results == {"stream_through": 1}


async def test_wrong_bytes_streamed_through_fail_every_reader(setup: Setup) -> None:
    setup.proxy.corrupt = True
    fills = budgeted(setup, SIZE // 2)
    try:
        fill = await setup.fetch(fills)
        results = await asyncio.wait_for(
            asyncio.gather(read(fill), read(fill, 0, 10), return_exceptions=True), BOUND
        )
    finally:
        await fills.close()
    assert all(isinstance(r, FillFailed) for r in results), results
    assert setup.stats.results == {"digest_mismatch": 1}
    assert not setup.stored().exists()


async def test_a_disk_that_fills_up_as_the_blob_is_stored_still_serves_it(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(self: FilesystemDriver, key: str, source: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # e.g. a new shard directory

    monkeypatch.setattr(FilesystemDriver, "move_in", full)
    setup.proxy.hold_after = 200 * 1024
    fill = await setup.fetch()
    reading = [asyncio.create_task(read(fill)) for _ in range(5)]
    await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
    setup.proxy.release.set()
    bodies = await asyncio.wait_for(asyncio.gather(*reading), BOUND)

    assert all(body == setup.data for body in bodies)
    assert setup.stats.results == {"stream_through": 1}
    assert setup.stats.streamed_through == {"disk_full": 1}
    assert not setup.stored().exists()
    assert no_partials(setup.fills)


async def test_a_reader_that_joins_a_stream_through_late_reads_many_chunks_from_the_window(
    setup: Setup,
) -> None:
    fills = budgeted(setup, SIZE // 2)
    try:
        setup.proxy.hold_after, setup.proxy.chunk = 700 * 1024, 16 * 1024  # many small chunks
        fill = await setup.fetch(fills)
        got = bytearray()
        past = asyncio.Event()

        async def first_reader() -> None:
            async for chunk in stream(fill):
                got.extend(chunk)
                if len(got) >= 600 * 1024:
                    past.set()

        first = asyncio.create_task(first_reader())
        await asyncio.wait_for(past.wait(), BOUND)  # 600 KiB in the window, in many chunks
        joined = await setup.fetch(fills)
        ranged = asyncio.create_task(read(joined, 100_000, 650_000))
        whole = asyncio.create_task(read(joined))
        setup.proxy.release.set()
        await asyncio.wait_for(first, BOUND)
        assert bytes(got) == setup.data
        assert await asyncio.wait_for(whole, BOUND) == setup.data
        assert await asyncio.wait_for(ranged, BOUND) == setup.data[100_000:650_000]
    finally:
        await fills.close()
    assert setup.proxy.blob_gets == 1


async def test_a_range_waiting_for_the_digest_does_not_hold_a_stream_through_back(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fill_module, "WINDOW", 64 * 1024)  # the blob is 16 windows long
    fills = budgeted(setup, SIZE // 2, idle_timeout=2.0)  # a reader holding it is cut after 2 s
    try:
        fill = await setup.fetch(fills)
        early = asyncio.create_task(read(fill, 0, 1024))  # only its last byte will be waiting
        suffix = asyncio.create_task(read(fill, SIZE - 10))
        whole = asyncio.create_task(read(fill))
        assert await asyncio.wait_for(whole, BOUND) == setup.data
        assert await asyncio.wait_for(early, BOUND) == setup.data[:1024]
        assert await asyncio.wait_for(suffix, BOUND) == setup.data[-10:]
    finally:
        await fills.close()
    assert setup.stats.results == {"stream_through": 1}
    assert setup.proxy.blob_gets == 1
