"""Where a blob found for a request is: complete on local disk, or only elsewhere.

A stored blob's size and response headers are found once and kept (:class:`StoredFiles`),
so that serving it again costs no ``stat`` through the executor and no header building:
only the ``open`` (``stat`` for a HEAD) the response makes anyway, on the event loop,
which also tells it when the file is gone, and an ``fstat`` of what was opened.

Content under a digest never changes, but its file can be replaced: a push verifying
the bytes renames them over a damaged file under the same digest, in this process
(which forgets the entry) or in another worker on the same data directory, which this
one learns from the ``fstat``: a file with another inode than the one remembered is a
new file, whose size is then believed (:meth:`StoredFiles.current`). The same inode with
another size is the remembered file damaged in place (truncated, appended to): the size
remembered stays, and a body the file cannot fill is cut. A blob leaving local disk
(eviction) drops its entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache

from regmirror import layout
from regmirror.digest import Digest
from regmirror.logs.served import Tier
from regmirror.storage.filesystem import FilesystemDriver

# Stored blobs remembered (~0.5 KiB each): the hot set of a busy mirror, not all of it.
STORED_ENTRIES = 50_000


@dataclass(frozen=True, slots=True)
class StoredBlob:
    path: Path
    size: int
    # What a response serving all of it sends besides the status line (Content-Length
    # included); empty when the finder did not build them.
    headers: Mapping[str, str] = field(default_factory=dict)
    inode: int = 0  # the file's, once it has been opened or stat'ed to serve; 0: not yet


@dataclass(frozen=True, slots=True)
class RemoteBlob:
    """A blob S3 or an upstream holds and local disk does not: what a HEAD needs to
    know, without copying it here."""

    size: int
    tier: Tier  # where it is: s3 or upstream


def blob_headers(digest: Digest, size: int) -> dict[str, str]:
    """A whole blob's response headers. The ETag is the digest, as registry:2 sends it:
    the bytes under it never change (the file's mtime does: it records use)."""
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
    }


class StoredFiles:
    """The blobs found complete on local disk, by digest, with their headers built."""

    def __init__(self, local: FilesystemDriver, entries: int = STORED_ENTRIES):
        self.local = local
        self._known: LRUCache[Digest, StoredBlob] = LRUCache(entries)

    def peek(self, digest: Digest) -> StoredBlob | None:
        """The blob when it is remembered (:meth:`find` would answer it without a stat)."""
        return self._known.get(digest)

    async def find(self, digest: Digest) -> StoredBlob:
        """The blob on local disk; PathNotFound when it is not there."""
        known = self._known.get(digest)
        if known is not None:
            return known
        key = layout.blob_data(digest)
        size = await self.local.stat(key)
        found = StoredBlob(self.local.path(key), size, blob_headers(digest, size))
        self._known[digest] = found
        return found

    def current(self, digest: Digest, found: StoredBlob, inode: int, size: int) -> StoredBlob:
        """``found`` as the file opened to serve it is (its ``inode`` and ``size``, from an
        ``fstat``): the same entry when that is the file remembered, a new one (remembered
        from now on) for a file seen the first time or put there since by another process."""
        if inode == found.inode:
            return found  # the file remembered, even if damaged in place since
        headers = found.headers if size == found.size else blob_headers(digest, size)
        seen = StoredBlob(found.path, size, headers, inode)
        if self._known.get(digest) is found:
            self._known[digest] = seen
        return seen

    def forget(self, digest: Digest) -> None:
        """``digest`` left local disk (or was found gone): look for it anew next time."""
        self._known.pop(digest, None)
