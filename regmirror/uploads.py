"""Blob upload sessions, staged on local disk so that a restart loses none.

A session is a directory ``<data_dir>/uploads/<uuid>/`` holding ``data`` (the
bytes so far) and ``info.json`` (the repository and start time). The sha256 state
of each session is kept in memory while the process lives; after a restart, or
when a chunk landed in another process, it is rebuilt from ``data``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from regmirror.digest import Digest
from regmirror.errors import BlobUploadUnknown, DigestInvalid, RangeInvalid, SizeInvalid

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-f]{32}$")
# Chunks are hashed and written off the event loop in batches of this size.
BATCH = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    name: str
    directory: Path

    @property
    def data(self) -> Path:
        return self.directory / "data"


class _Hash:
    """The running sha256 of a session's bytes, valid while ``offset`` matches the file."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.offset = 0


class Uploads:
    def __init__(self, root: Path, *, ttl: float):
        self.root = root
        self.ttl = ttl
        self._hashes: dict[str, _Hash] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def start(self, name: str) -> Upload:
        upload_id = uuid.uuid4().hex
        upload = Upload(upload_id, name, self.root / upload_id)
        info = json.dumps({"name": name, "started_at": time.time()}).encode()
        await asyncio.to_thread(self._create, upload, info)
        return upload

    async def get(self, name: str, upload_id: str) -> Upload:
        """The session ``upload_id`` of repository ``name``; BLOB_UPLOAD_UNKNOWN otherwise."""
        if not _UUID.match(upload_id):
            raise BlobUploadUnknown("upload session id is not one this registry issued")
        upload = Upload(upload_id, name, self.root / upload_id)
        try:
            info = json.loads(await asyncio.to_thread((upload.directory / "info.json").read_bytes))
        except (FileNotFoundError, ValueError) as exc:
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or expired") from exc
        if info.get("name") != name:
            raise BlobUploadUnknown(f"upload {upload_id} does not belong to {name}")
        return upload

    async def size(self, upload: Upload) -> int:
        try:
            return (await asyncio.to_thread(os.stat, upload.data)).st_size
        except FileNotFoundError as exc:
            raise BlobUploadUnknown(f"upload {upload.id} is unknown or expired") from exc

    async def append(
        self, upload: Upload, body: AsyncIterator[bytes], *, start: int | None, length: int | None
    ) -> int:
        """Append a chunk; ``start`` (from Content-Range) must be where the upload stands.

        Returns the new size. A chunk shorter or longer than announced is rolled back.
        """
        async with self._lock(upload):
            offset = await self.size(upload)
            if start is not None and start != offset:
                raise RangeInvalid(
                    f"chunk starts at {start} but the upload holds {offset} bytes",
                    {"expected": offset, "got": start},
                    headers=_range_headers(offset),
                )
            state = await self._hash(upload, offset)
            handle = await asyncio.to_thread(open, upload.data, "ab")
            received = 0
            try:
                batch = bytearray()
                async for chunk in body:
                    batch += chunk
                    received += len(chunk)
                    if length is not None and received > length:
                        break
                    if len(batch) >= BATCH:
                        await asyncio.to_thread(_write, handle, state, bytes(batch))
                        batch.clear()
                if batch and (length is None or received <= length):
                    await asyncio.to_thread(_write, handle, state, bytes(batch))
            except BaseException:
                await asyncio.to_thread(_rollback, handle, offset)
                self._hashes.pop(upload.id, None)
                raise
            finally:
                handle.close()
            if length is not None and received != length:
                await asyncio.to_thread(os.truncate, upload.data, offset)
                self._hashes.pop(upload.id, None)
                raise SizeInvalid(
                    f"chunk announced {length} bytes but carried {received}",
                    {"expected": length, "received": received},
                )
            return offset + received

    async def finish(self, upload: Upload, digest: Digest) -> Path:
        """Verify the whole upload against ``digest`` and return its fsynced data file."""
        async with self._lock(upload):
            offset = await self.size(upload)
            state = self._hashes.get(upload.id)
            if digest.algorithm == "sha256" and state is not None and state.offset == offset:
                actual = state.hasher.hexdigest()
            else:
                hasher = await asyncio.to_thread(_hash_file, upload.data, digest.algorithm)
                actual = hasher.hexdigest()
            if actual != digest.hex:
                await self.cancel(upload)
                raise DigestInvalid(
                    f"uploaded content has digest {digest.algorithm}:{actual}, not {digest}",
                    {"expected": str(digest), "actual": f"{digest.algorithm}:{actual}"},
                )
            await asyncio.to_thread(_fsync, upload.data)
            return upload.data

    async def cancel(self, upload: Upload) -> None:
        self._hashes.pop(upload.id, None)
        await asyncio.to_thread(shutil.rmtree, upload.directory, True)

    async def expire(self) -> int:
        """Delete sessions idle for longer than the TTL; returns how many."""
        expired = await asyncio.to_thread(self._expire, time.time() - self.ttl)
        for upload_id in expired:
            self._hashes.pop(upload_id, None)
        if expired:
            log.info("expired %d stale upload sessions", len(expired))
        return len(expired)

    async def expire_forever(self, interval: float) -> None:
        while True:
            try:
                await self.expire()
            except OSError:
                log.exception("expiring upload sessions failed")
            await asyncio.sleep(interval)

    def _lock(self, upload: Upload) -> asyncio.Lock:
        lock = self._locks.get(upload.id)
        if lock is None:
            lock = self._locks[upload.id] = asyncio.Lock()
        return lock

    async def _hash(self, upload: Upload, offset: int) -> _Hash:
        state = self._hashes.get(upload.id)
        if state is None or state.offset != offset:
            state = _Hash()
            state.hasher = await asyncio.to_thread(_hash_file, upload.data, "sha256")
            state.offset = offset
            self._hashes[upload.id] = state
        return state

    def _create(self, upload: Upload, info: bytes) -> None:
        upload.directory.mkdir(parents=True)
        upload.data.touch()
        (upload.directory / "info.json").write_bytes(info)

    def _expire(self, cutoff: float) -> list[str]:
        expired = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                last = max(
                    os.stat(os.path.join(entry.path, name)).st_mtime
                    for name in ("info.json", "data")
                )
            except (FileNotFoundError, NotADirectoryError):
                last = 0.0
            if last < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                expired.append(entry.name)
        return expired


def _range_headers(size: int) -> dict[str, str]:
    return {"Range": f"0-{max(size - 1, 0)}"}


def _write(handle: BinaryIO, state: _Hash, data: bytes) -> None:
    handle.write(data)
    state.hasher.update(data)
    state.offset += len(data)


def _rollback(handle: BinaryIO, offset: int) -> None:
    handle.flush()
    handle.truncate(offset)


def _hash_file(path: Path, algorithm: str) -> hashlib._Hash:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(BATCH):
            hasher.update(chunk)
    return hasher


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
