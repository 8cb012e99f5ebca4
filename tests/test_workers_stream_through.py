"""``server.workers``: a fill one worker streams through (the blob cannot be kept) is
followed by every worker's waiters, and still makes one upstream GET for the host
(:mod:`regmirror.fill_relay`).

Each test runs a real ``regmirror serve`` with two workers in front of registry:2,
through a proxy that holds the blob body midway until a herd of requests, each on a
connection of its own, has reached both workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from regmirror import layout
from regmirror.digest import Digest
from regmirror.eviction import BlobCache
from regmirror.fill import Fill, Fills, FillStats
from regmirror.fill_relay import FillRelay
from regmirror.storage.filesystem import FilesystemDriver
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import CountingProxy, push_blob, serve, upstream_registry
from tests.test_fill import SIZE, Setup, budgeted, fetch_and_read, setup
from tests.test_workers import BOUND, session
from tests.test_workers_flight import both_listening, served_by_both

__all__ = ["session", "setup", "upstream_registry"]

Start = Callable[..., ServerProcess]
MiB = 1024 * 1024
BUDGET = 2 * MiB
HERD = 12
ROUTE = "/v2/{name}/blobs/{digest}"


@dataclass
class Body:
    status: int
    received: int
    digest: str
    error: str | None  # the body was cut (or never came)


async def fetch(url: str, progress: list[int], i: int) -> Body:
    """A GET on a connection of its own (so the kernel hands it to any worker), hashing
    the body as it comes and noting how much has arrived in ``progress[i]``."""
    connector = aiohttp.TCPConnector(force_close=True)
    hasher = hashlib.sha256()
    status = 0
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=BOUND)
            ) as s,
            s.get(url) as response,
        ):
            status = response.status
            async for chunk in response.content.iter_chunked(256 * 1024):
                hasher.update(chunk)
                progress[i] += len(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Body(status, progress[i], "", f"{type(exc).__name__}: {exc}")
    return Body(status, progress[i], f"sha256:{hasher.hexdigest()}", None)


def disk_bytes(data_dir: Path) -> int:
    """Bytes of files under the fills and the blob store."""
    return sum(
        p.stat().st_size
        for d in (data_dir / "fills", data_dir / layout.ROOT / "blobs")
        if d.exists()
        for p in d.rglob("*")
        if p.is_file()
    )


async def metric(server: ServerProcess, name: str) -> float:
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(f"{server.url}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name} ")
    )


async def test_a_herd_over_two_workers_shares_one_streamed_through_fill(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    data = os.urandom(12 * MiB + 3)
    digest = await push_blob(session, upstream_registry.url, "team/big", data)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url}],
                "server": {"workers": 2},
                "cache": {"max_bytes": BUDGET},  # the blob is over it: streamed through
            }
        )
        await both_listening(server)
        proxy.hold_after = 6 * MiB  # the fill stays in flight while the herd gathers
        url = f"{server.url}/v2/team/big/blobs/{digest}"
        progress = [0] * HERD
        herd = [asyncio.create_task(fetch(url, progress, i)) for i in range(HERD)]
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            await asyncio.sleep(1.5)  # every request reaches a worker and joins the fill
            on_disk = disk_bytes(server.data_dir)
        finally:
            proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*herd), BOUND)

    assert on_disk <= BUDGET, f"{on_disk} bytes on disk with a {BUDGET}-byte budget"
    for body in bodies:
        assert (body.status, body.error, body.received) == (200, None, len(data)), body
        assert body.digest == str(digest)
    assert proxy.blob_gets == 1
    served_by_both(server, ROUTE)  # the herd did reach both workers
    assert await metric(server, 'regmirror_fills_total{result="stream_through"}') == 1
    assert await metric(server, 'regmirror_fill_stream_through_total{reason="over_budget"}') == 1
    assert disk_bytes(server.data_dir) == 0  # nothing kept, no spool left behind
    assert not list((server.data_dir / "fills").glob("*.partial"))


async def test_a_streamed_through_fill_that_fails_cuts_every_workers_waiters(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """The relay sends the last byte only once the filler has verified the digest: wrong
    bytes end no body cleanly, on the filling worker or on the other."""
    data = os.urandom(6 * MiB + 1)
    digest = await push_blob(session, upstream_registry.url, "team/lies", data)
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url}],
                "server": {"workers": 2},
                "cache": {"max_bytes": BUDGET},
            }
        )
        await both_listening(server)
        proxy.corrupt = True  # byte 0 is wrong: only the digest check can tell
        proxy.hold_after = 3 * MiB
        url = f"{server.url}/v2/team/lies/blobs/{digest}"
        progress = [0] * HERD
        herd = [asyncio.create_task(fetch(url, progress, i)) for i in range(HERD)]
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            await asyncio.sleep(1.5)
        finally:
            proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*herd), BOUND)

    for body in bodies:
        clean = body.error is None and body.status == 200
        assert not clean, f"a clean 200 of unverified bytes: {body}"
    assert proxy.blob_gets == 1
    served_by_both(server, ROUTE, "aborted")  # both started a body, then cut it
    assert await metric(server, 'regmirror_fills_total{result="digest_mismatch"}') == 1


# -- two Fills on one directory, as two workers (flock sees two open files as two) ------


async def test_a_fill_that_finds_the_disk_full_midway_is_relayed_from_where_its_file_ends(
    setup: Setup, tmp_path: Path
) -> None:
    """The follower reads the bytes written before the disk filled up from the partial
    file, and the rest from the filler's window, over the relay."""
    # Deeper than a unix socket's path may be (a deep TMPDIR): bound and reached through
    # a descriptor of the directory.
    run_dir = tmp_path / ("deep" * 30) / "run"
    run_dir.mkdir(parents=True)
    filler = Fills(
        FilesystemDriver(setup.root),
        timeout=BOUND,
        observer=setup.stats,
        relay=FillRelay(run_dir, name="filler.sock"),
    )
    follower_stats = FillStats()
    follower = Fills(
        FilesystemDriver(setup.root),
        timeout=BOUND,
        observer=follower_stats,
        relay=FillRelay(run_dir, name="follower.sock"),
    )
    write = filler._write
    full_at = 300 * 1024

    async def filling_up(fd: int, chunk: bytes, offset: int, hasher: Any, size: int) -> bool:
        if offset + len(chunk) > full_at:
            return False  # ENOSPC, and nothing left to evict
        return await write(fd, chunk, offset, hasher, size)

    filler._write = filling_up  # type: ignore[method-assign]
    try:
        for fills in (filler, follower):
            assert fills.relay is not None
            await fills.relay.start(fills.relayable)
        setup.proxy.hold_after = 600 * 1024
        here = [asyncio.create_task(fetch_and_read(setup, filler)) for _ in range(3)]
        await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
        there = [asyncio.create_task(fetch_and_read(setup, follower)) for _ in range(3)]
        await asyncio.sleep(0.5)  # the follower tails the file, finds the marker, connects
        setup.proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(*here, *there), BOUND)
    finally:
        for fills in (filler, follower):
            await fills.close()
            assert fills.relay is not None
            await fills.relay.close()

    assert all(body == setup.data for body in bodies)
    assert setup.proxy.blob_gets == 1
    assert setup.stats.results == {"stream_through": 1}
    assert setup.stats.streamed_through == {"disk_full": 1}
    assert follower_stats.results == {"other_process": 1}
    assert not setup.stored().exists()
    assert not list(run_dir.glob("through/*"))  # the marker went with the fill
    assert not list(filler.directory.glob("*.partial"))


async def test_a_waiter_that_finds_the_relay_only_after_the_fill_ended_still_shares_it(
    setup: Setup, tmp_path: Path
) -> None:
    """A fill streamed through stays relayed for a moment after it ends: a worker whose
    waiter joined it (the partial file was locked) but that looks for its relay only
    once the file is gone (the fill was fast: between two looks) still gets the bytes
    from the filler's window, without a second upstream GET or a cut."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    filler = budgeted(setup, SIZE // 2, relay=FillRelay(run_dir, name="filler.sock"))
    follower_stats = FillStats()
    follower = Fills(
        FilesystemDriver(setup.root),
        timeout=BOUND,
        observer=follower_stats,
        cache=BlobCache(setup.root, max_bytes=SIZE // 2),
        relay=FillRelay(run_dir, name="follower.sock"),
    )
    assert follower.relay is not None
    lookup = follower.relay.lookup
    partial = follower.partial_path(setup.digest)
    # The follower misses the relay while the fill runs: it looks only after.
    follower.relay.lookup = lambda digest: None if partial.exists() else lookup(digest)  # type: ignore[method-assign]
    try:
        for fills in (filler, follower):
            assert fills.relay is not None
            await fills.relay.start(fills.relayable)
        setup.proxy.hold_after = 200 * 1024
        here = asyncio.create_task(fetch_and_read(setup, filler))
        await asyncio.wait_for(setup.proxy.held.wait(), BOUND)
        there = asyncio.create_task(fetch_and_read(setup, follower))
        await asyncio.sleep(0.3)  # the follower tails the locked file
        setup.proxy.release.set()
        bodies = await asyncio.wait_for(asyncio.gather(here, there), BOUND)
    finally:
        for fills in (filler, follower):
            await fills.close()
            assert fills.relay is not None
            await fills.relay.close()

    assert bodies == [setup.data, setup.data]
    assert setup.proxy.blob_gets == 1
    assert setup.stats.results == {"stream_through": 1}
    assert follower_stats.results == {"other_process": 1}
    assert not list(run_dir.glob("through/*"))  # withdrawn at close, grace or not


def test_a_done_fill_is_not_relayed_for_a_new_fill_that_reuses_its_inode(tmp_path: Path) -> None:
    """After a fill streamed through, its partial file is gone; a new fill's file at that
    path may get the same inode number. A follower of the new one names that number: it
    must not be sent the old fill's bytes after the new one's (they may fail the digest
    check; the old fill's are verified and would end the body cleanly)."""
    fills = Fills(FilesystemDriver(tmp_path), timeout=BOUND, relay=FillRelay(tmp_path / "run"))
    digest = Digest.of(b"blob")
    partial = fills.partial_path(digest)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"")
    inode = partial.stat().st_ino
    done = Fill(digest, partial, tmp_path / "final", 4)
    done._inode = inode
    done._stream_through()
    fills._relaying[digest] = done  # streamed through, within its grace
    assert fills.relayable(digest, inode + 1) is None  # another fill's file
    assert fills.relayable(digest, inode) is None  # a file of that number is there: new
    partial.unlink()
    assert fills.relayable(digest, inode) is done  # gone: the follower read this one's
