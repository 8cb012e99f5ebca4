"""``server.workers`` with S3: a tag moved in the bucket is served by a host's workers in
order. Once one worker has read the new digest from S3, another that cached the old
one (for the link TTL) does not serve it any more: it sees the local copy rewritten and
asks S3 again (:class:`~regmirror.links.LinkStore`).

Link stores on one local directory stand for the workers (the copy's identity is a
``stat``, process-blind); an in-memory driver stands for the bucket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from regmirror.digest import Digest
from regmirror.links import LinkStore
from regmirror.storage.driver import Driver, PathNotFound
from regmirror.storage.filesystem import FilesystemDriver

TAG = "docker/registry/v2/repositories/team/app/_manifests/tags/live/current/link"
TTL = 600.0  # far longer than the test: only a change may make a worker ask again


class Bucket(Driver):
    """The shared store: a dict, counting the reads."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        self.gets += 1
        try:
            return self.objects[key]
        except KeyError:
            raise PathNotFound(key) from None

    async def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    async def put_file(self, key: str, source: Path) -> None:
        self.objects[key] = source.read_bytes()

    async def stat(self, key: str) -> int:
        return len(await self.get(key))

    async def list(self, key: str) -> list[str]:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def check(self) -> None:
        return None

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        yield (await self.get(key))[offset:]


def worker(bucket: Bucket, data: Path) -> LinkStore:
    return LinkStore(bucket, local=FilesystemDriver(data), ttl=TTL, shared_dir=True)


def test_a_worker_never_serves_a_moved_tags_old_digest_after_another_served_the_new(
    tmp_path: Path,
) -> None:
    bucket = Bucket()
    old, new = Digest.of(b"old"), Digest.of(b"new")

    async def scenario() -> None:
        bucket.objects[TAG] = str(old).encode()
        first = worker(bucket, tmp_path)
        assert await first.read(TAG) == old
        gets = bucket.gets
        assert await first.read(TAG) == old  # cached: S3 is not asked within the TTL
        assert bucket.gets == gets

        bucket.objects[TAG] = str(new).encode()  # another host moved the tag
        later = worker(bucket, tmp_path)  # a worker whose cache holds nothing (or expired)
        assert await later.read(TAG) == new
        assert await first.read(TAG) == new  # not the old one it cached
        assert await later.read(TAG) == new
        gets = bucket.gets
        assert await first.read(TAG) == new and await later.read(TAG) == new
        assert bucket.gets == gets  # and cached again, as long as nothing changes

    asyncio.run(scenario())


def test_a_worker_alone_keeps_its_read_for_the_ttl(tmp_path: Path) -> None:
    """Without other workers nothing is stat'ed: the TTL alone bounds a moved tag."""
    bucket = Bucket()
    old, new = Digest.of(b"old"), Digest.of(b"new")

    async def scenario() -> None:
        bucket.objects[TAG] = str(old).encode()
        alone = LinkStore(bucket, local=FilesystemDriver(tmp_path), ttl=TTL)
        assert await alone.read(TAG) == old
        bucket.objects[TAG] = str(new).encode()
        gets = bucket.gets
        assert await alone.read(TAG) == old
        assert bucket.gets == gets

    asyncio.run(scenario())
