"""A wrapper that counts a driver's failures by operation, whatever the driver.

Failure counting is cross-cutting: it lives here once rather than in each driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from regmirror.storage.driver import Driver, StorageUnavailable

T = TypeVar("T")


class CountedDriver(Driver):
    def __init__(self, inner: Driver, on_error: Callable[[str], None]):
        self.inner = inner
        self.name = inner.name
        self._on_error = on_error

    async def get(self, key: str) -> bytes:
        return await self._counted("get", self.inner.get(key))

    async def put(self, key: str, data: bytes) -> None:
        await self._counted("put", self.inner.put(key, data))

    async def put_file(self, key: str, source: Path) -> None:
        await self._counted("put_file", self.inner.put_file(key, source))

    async def stat(self, key: str) -> int:
        return await self._counted("stat", self.inner.stat(key))

    async def list(self, key: str) -> list[str]:
        return await self._counted("list", self.inner.list(key))

    async def delete(self, key: str) -> None:
        await self._counted("delete", self.inner.delete(key))

    async def check(self) -> None:
        await self._counted("check", self.inner.check())

    async def close(self) -> None:
        await self.inner.close()

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner.reader(key, offset):
                yield chunk
        except StorageUnavailable:
            self._on_error("read")
            raise

    async def _counted(self, operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StorageUnavailable:
            self._on_error(operation)
            raise
