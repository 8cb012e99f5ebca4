"""The storage driver interface: distribution's StorageDriver, trimmed to what we use.

Keys are ``/``-separated paths relative to the driver's root, laid out as
registry:2 lays out its storage (see :mod:`regmirror.layout`). Content written
under a key becomes visible only when complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path


class PathNotFound(Exception):
    """Nothing is stored at the key."""


class StorageUnavailable(Exception):
    """The backend could not be reached or failed; the request may succeed later."""


class TooLarge(Exception):
    """The content at the key is larger than the caller's limit; it was not read."""

    def __init__(self, key: str, size: int | None, limit: int):
        over = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{key} holds {over}; at most {limit} are read")
        self.size = size
        self.limit = limit


class Driver(ABC):
    name: str

    @abstractmethod
    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        """The whole (small) content at ``key``. With ``limit``, :class:`TooLarge` when
        it holds more than ``limit`` bytes, known before they are read: never more than
        ``limit + 1`` bytes are held in memory."""

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, atomically and durably."""

    @abstractmethod
    async def put_file(self, key: str, source: Path) -> None:
        """Store a copy of the local file ``source`` at ``key``, atomically and durably."""

    @abstractmethod
    async def stat(self, key: str) -> int:
        """The size in bytes of the content at ``key``."""

    @abstractmethod
    async def list(self, key: str) -> list[str]:
        """The sorted names directly below ``key``; PathNotFound when there are none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key`` and everything below it; a missing key is not an error."""

    @abstractmethod
    async def check(self) -> None:
        """Raise StorageUnavailable unless the store can be used (for readiness probes)."""

    async def close(self) -> None:
        """Release threads and connections; nothing to do by default."""

    @abstractmethod
    def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream the content at ``key`` from ``offset``, in bounded chunks."""
