"""``server.workers``: the upload-session caps are exact for the host, however a burst of
session openings is spread over the workers (:meth:`regmirror.uploads.Uploads.start`
admits under a lock of the host's).

A real ``regmirror serve`` with two workers; each burst is many POSTs on connections
opened beforehand (so both workers have some), released at one instant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp

from regmirror.host_lock import HostLock
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.test_workers import BOUND
from tests.test_workers_flight import answered_by_worker, both_listening

Start = Callable[..., ServerProcess]
BURST = 32
ROUNDS = 6
START_ROUTE = "/v2/{name}/blobs/uploads/"


async def burst(server: ServerProcess, count: int) -> list[tuple[int, str]]:
    """``count`` session openings at one instant, each on a connection of its own that
    is open before the instant; (status, Location) of each."""
    go = asyncio.Event()
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=BOUND),
        )
        for _ in range(count)
    ]

    async def open_one(s: aiohttp.ClientSession) -> tuple[int, str]:
        async with s.get(f"{server.url}/v2/") as response:  # the connection, kept alive
            await response.read()
        await go.wait()
        async with s.post(f"{server.url}/v2/team/app/blobs/uploads/") as response:
            await response.read()
            return response.status, response.headers.get("Location", "")

    try:
        tasks = [asyncio.create_task(open_one(s)) for s in sessions]
        await asyncio.sleep(0.5)  # every connection is open and idle
        go.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


def sessions_on_disk(data_dir: Path) -> list[Path]:
    root = data_dir / "uploads"
    return [p for p in root.iterdir() if p.is_dir()] if root.exists() else []


async def cancel(server: ServerProcess, locations: list[str]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as s:
        for location in locations:
            async with s.delete(f"{server.url}{location}") as response:
                assert response.status == 204, await response.text()


async def bursts_admit_exactly(server: ServerProcess, cap: int) -> None:
    """Every burst opens exactly ``cap`` sessions (the rest refused 429), round after
    round; the sessions are cancelled between rounds."""
    await both_listening(server)
    for _ in range(ROUNDS):
        results = await burst(server, BURST)
        admitted = [location for status, location in results if status == 202]
        assert sorted({status for status, _ in results}) == [202, 429], results
        assert len(admitted) == cap, f"{len(admitted)} sessions opened with a cap of {cap}"
        assert len(sessions_on_disk(server.data_dir)) == cap
        await cancel(server, admitted)
        assert sessions_on_disk(server.data_dir) == []
    # Both workers refused some: the bursts were spread over them, and each counted the
    # sessions the other admitted.
    by_worker = answered_by_worker(server, START_ROUTE, "429")
    assert len([c for c in by_worker.values() if c > 0]) == 2, by_worker


async def test_the_session_cap_is_exact_for_a_burst_spread_over_two_workers(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(
        config={
            "server": {"workers": 2},
            "uploads": {"max_sessions": 4, "max_sessions_per_client": 1000},
        }
    )
    await bursts_admit_exactly(server, 4)


async def test_the_per_client_cap_is_exact_for_a_burst_spread_over_two_workers(
    regmirror_server: Start,  # noqa: F811
) -> None:
    server = regmirror_server(
        config={
            "server": {"workers": 2},
            "uploads": {"max_sessions": 1000, "max_sessions_per_client": 3},
        }
    )
    await bursts_admit_exactly(server, 3)


# -- the host's lock, two open files standing for two processes ---------------------------


async def test_a_wedged_holder_delays_the_host_lock_and_never_blocks_it(tmp_path: Path) -> None:
    path = tmp_path / "uploads"
    wedged, other = HostLock(path, wait=0.2), HostLock(path, wait=0.2)
    order: list[str] = []
    try:
        async with wedged.held() as got:
            assert got
            async with other.held() as also:  # waits its 0.2 s, then goes on without it
                assert not also
                order.append("other, without the lock")
        async with other.held() as got:  # free again: had at once
            assert got
            order.append("other, with it")

        async def hold_briefly() -> None:
            async with wedged.held() as got:
                assert got
                await asyncio.sleep(0.05)
                order.append("wedged, done")

        holder = asyncio.create_task(hold_briefly())
        await asyncio.sleep(0.01)
        async with other.held() as got:  # waits for the holder, within its bound
            assert got
            order.append("other, after it")
        await holder
        waiter = asyncio.create_task(_hold(other))
        async with wedged.held():
            await asyncio.sleep(0.02)
            waiter.cancel()  # a request cancelled while it waits takes nothing with it
        await asyncio.gather(waiter, return_exceptions=True)
        async with wedged.held() as got:
            assert got
    finally:
        wedged.close()
        other.close()
    assert order == [
        "other, without the lock",
        "other, with it",
        "wedged, done",
        "other, after it",
    ]


async def _hold(lock: HostLock) -> None:
    async with lock.held():
        await asyncio.sleep(10)
