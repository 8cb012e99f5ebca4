"""The local-disk driver: registry:2's filesystem layout under the data directory.

Every write goes to a temporary name in the destination directory, is fsynced,
renamed into place and the directory fsynced, so a crash leaves either the old
content or the new, never a torn file. Blocking calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge

CHUNK = 1024 * 1024
TEMP_PREFIX = ".tmp-"


class FilesystemDriver(Driver):
    name = "local"

    def __init__(self, root: Path):
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """The file for ``key``; keys never reach outside the root."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        return await asyncio.to_thread(self._get, self.path(key), limit)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(write_atomic, self.path(key), data)

    async def put_file(self, key: str, source: Path) -> None:
        await asyncio.to_thread(self._copy_in, source, self.path(key))

    async def move_in(self, key: str, source: Path) -> None:
        """Take ``source`` (a file on the same filesystem) and make it the content at ``key``."""
        await asyncio.to_thread(move_atomic, source, self.path(key))

    async def stat(self, key: str) -> int:
        return await asyncio.to_thread(self._stat, self.path(key))

    async def list(self, key: str) -> list[str]:
        return await asyncio.to_thread(self._list, self.path(key))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, self.path(key))

    async def check(self) -> None:
        if not await asyncio.to_thread(os.access, self.root, os.W_OK):
            raise StorageUnavailable(f"data directory {self.root} is not writable")

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        path = self.path(key)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(key) from exc
        try:
            handle.seek(offset)
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                yield chunk
        finally:
            handle.close()

    @staticmethod
    def _get(path: Path, limit: int | None) -> bytes:
        try:
            with open(path, "rb") as handle:
                if limit is None:
                    return handle.read()
                size = os.fstat(handle.fileno()).st_size
                if size > limit:
                    raise TooLarge(str(path), size, limit)
                data = handle.read(limit + 1)  # the file may have grown since fstat
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise PathNotFound(str(path)) from exc
        if len(data) > limit:
            raise TooLarge(str(path), None, limit)
        return data

    @staticmethod
    def _stat(path: Path) -> int:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(str(path)) from exc
        if not path.is_file():
            raise PathNotFound(str(path))
        return st.st_size

    @staticmethod
    def _list(path: Path) -> builtins.list[str]:
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(str(path)) from exc
        return sorted(n for n in names if not n.startswith(TEMP_PREFIX))

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _copy_in(source: Path, target: Path) -> None:
        temp = temp_path(target)
        try:
            with open(source, "rb") as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            move_atomic(temp, target)
        finally:
            temp.unlink(missing_ok=True)


def temp_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"


def write_atomic(target: Path, data: bytes) -> None:
    temp = temp_path(target)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        move_atomic(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def move_atomic(source: Path, target: Path) -> None:
    """Rename ``source`` (already fsynced) over ``target`` and fsync the directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
