"""What the shared store's wrapper and the drivers promise every reader (issue 7):

- ``get(key, limit=)`` refuses content over the limit before reading it, on local disk
  and on S3 (a real moto server), and reads empty content as empty;
- :class:`~regmirror.storage.counted.CountedDriver` bounds each read by a deadline,
  stops asking a failed store (the outage circuit), lets one trial read through after
  the backoff, and always tries writes and readiness checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regmirror.config import S3Settings
from regmirror.storage.counted import CountedDriver
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.storage.s3 import S3Driver
from tests.support.s3 import REGION, MotoS3, moto_s3

__all__ = ["moto_s3"]


@pytest.fixture(params=["filesystem", "s3"])
async def driver(
    request: pytest.FixtureRequest, tmp_path: Path, moto_s3: MotoS3
) -> AsyncIterator[Driver]:
    if request.param == "filesystem":
        yield FilesystemDriver(tmp_path / "root")
        return
    settings = S3Settings(
        bucket=moto_s3.new_bucket("guard"),
        region=REGION,
        endpoint_url=moto_s3.endpoint_url,
        path_style=True,
    )
    s3 = await S3Driver.create(settings)
    try:
        yield s3
    finally:
        await s3.close()


async def test_get_with_a_limit_reads_content_up_to_it(driver: Driver) -> None:
    await driver.put("a/small", b"x" * 100)
    await driver.put("a/empty", b"")
    assert await driver.get("a/small", limit=100) == b"x" * 100
    assert await driver.get("a/empty", limit=100) == b""


async def test_get_with_a_limit_refuses_larger_content(driver: Driver) -> None:
    await driver.put("a/big", b"y" * 5000)
    with pytest.raises(TooLarge) as raised:
        await driver.get("a/big", limit=4096)
    assert raised.value.limit == 4096
    with pytest.raises(PathNotFound):
        await driver.get("a/missing", limit=4096)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(Driver):
    """A store that answers, fails, or never answers, as the test says; counts calls."""

    name = "flaky"

    def __init__(self) -> None:
        self.state = "up"
        self.calls: list[str] = []

    async def _answer(self, operation: str) -> None:
        self.calls.append(operation)
        if self.state == "down":
            raise StorageUnavailable("down")
        if self.state == "hung":
            await asyncio.sleep(60)

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        await self._answer("get")
        return b"data"

    async def put(self, key: str, data: bytes) -> None:
        await self._answer("put")

    async def put_file(self, key: str, source: Path) -> None:
        await self._answer("put_file")

    async def stat(self, key: str) -> int:
        await self._answer("stat")
        return 4

    async def list(self, key: str) -> list[str]:
        await self._answer("list")
        return ["a"]

    async def delete(self, key: str) -> None:
        await self._answer("delete")

    async def check(self) -> None:
        await self._answer("check")

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        await self._answer("read")
        yield b"data"


def guarded(store: FlakyStore, clock: Clock, errors: list[str]) -> CountedDriver:
    return CountedDriver(
        store, errors.append, read_deadline=0.2, list_deadline=0.2, backoff=2.0, clock=clock
    )


async def test_a_read_that_gets_no_answer_fails_at_its_deadline_and_is_counted() -> None:
    store, clock, errors = FlakyStore(), Clock(), list[str]()
    shared = guarded(store, clock, errors)
    store.state = "hung"
    started = asyncio.get_running_loop().time()
    with pytest.raises(StorageUnavailable):
        await shared.stat("k")
    assert asyncio.get_running_loop().time() - started < 2.0
    assert errors == ["stat"] and shared.down


async def test_after_a_failure_reads_are_not_tried_until_the_backoff_then_one_trial() -> None:
    store, clock, errors = FlakyStore(), Clock(), list[str]()
    shared = guarded(store, clock, errors)
    store.state = "down"
    with pytest.raises(StorageUnavailable):
        await shared.get("k")
    store.calls.clear()
    for read in (shared.get("k"), shared.stat("k"), shared.list("k")):
        with pytest.raises(StorageUnavailable):
            await read
    assert store.calls == []  # nobody waited for the store
    assert errors == ["get"]  # skipped reads are not errors of the store

    # After the backoff one read tries; while it waits, the others still do not.
    clock.now += 2.5
    store.state = "hung"
    trial = asyncio.ensure_future(shared.get("k"))
    await asyncio.sleep(0.05)
    with pytest.raises(StorageUnavailable):
        await shared.stat("k")
    with pytest.raises(StorageUnavailable):
        await trial
    assert store.calls == ["get"]

    # The store is back: the next trial closes the circuit and everything asks again.
    clock.now += 2.5
    store.state = "up"
    assert await shared.get("k") == b"data"
    assert not shared.down
    assert await shared.stat("k") == 4


async def test_writes_and_readiness_checks_are_tried_even_while_reads_are_skipped() -> None:
    store, clock, errors = FlakyStore(), Clock(), list[str]()
    shared = guarded(store, clock, errors)
    store.state = "down"
    with pytest.raises(StorageUnavailable):
        await shared.stat("k")
    store.state = "up"
    store.calls.clear()
    await shared.put("k", b"v")
    assert store.calls == ["put"] and not shared.down  # a success closes the circuit
    store.state = "down"
    with pytest.raises(StorageUnavailable):
        await shared.stat("k")
    store.state = "up"
    await shared.check()
    assert not shared.down


async def test_a_missing_key_is_an_answer_not_an_outage() -> None:
    store, clock, errors = FlakyStore(), Clock(), list[str]()
    shared = guarded(store, clock, errors)

    async def missing(key: str, *, limit: int | None = None) -> bytes:
        raise PathNotFound(key)

    store.get = missing  # type: ignore[method-assign]
    with pytest.raises(PathNotFound):
        await shared.get("k")
    assert errors == [] and not shared.down
