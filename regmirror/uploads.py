"""Blob upload sessions, staged on local disk so that a restart loses none.

A session is a directory ``<data_dir>/uploads/<uuid>/`` holding ``data`` (the
bytes so far) and ``info.json`` (the repository and start time), and while a chunk
is appended ``holding`` (what it held before). The sha256 state
of each session is kept in memory while the process lives; after a restart, or
when a chunk landed in another process, it is rebuilt from ``data``.

Every change to a session (append, commit, cancel, expiry) happens under its lock
(an asyncio lock within the process, and a file lock on ``data`` between an append
and a freeze or expiry in processes sharing the directory). Closing an upload first
*freezes* it: under the lock the session directory is renamed to ``<uuid>.commit``,
so from that instant no request can reach it (each gets BLOB_UPLOAD_UNKNOWN) and its
bytes can no longer change; only then are they verified and handed to the store. A
blob therefore enters the store only as the bytes that were verified (issue 7).

A session leaves its name only by one atomic rename, whoever takes it: a freeze to
``<uuid>.commit``, a cancel to ``<uuid>.gone-<random>`` (and only then deleted). A process
that opened a session's directory therefore never deletes files from under another
process that renamed it since (a delete walking the directory by descriptor would).

Bodies stream to the session's file chunk by chunk as they arrive (the caller hands
bounded chunks), hashed on the way, so memory per upload in flight is one chunk whatever
the blob's size (issue 9). One request writes a session at a time: another PATCH or PUT
on it is refused at once (:class:`~regmirror.errors.UploadBusy`), never queued behind a
client that may be stalled. A blob may not grow past ``max_blob_bytes``, and the open
sessions are capped in all and per client (:mod:`regmirror.upload_caps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from regmirror.digest import Digest
from regmirror.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    InsufficientStorage,
    RangeInvalid,
    SizeInvalid,
    UploadBusy,
    UploadRefused,
    UploadTooLarge,
)
from regmirror.host_lock import HostLock
from regmirror.numbers import ascii_int
from regmirror.settle import settle
from regmirror.upload_caps import SessionCaps

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-f]{32}$")
# Files are hashed off the event loop in reads of this size.
BATCH = 1024 * 1024
# A frozen session (being committed) is renamed to ``<uuid>`` + this suffix.
FROZEN_SUFFIX = ".commit"
# A cancelled session is renamed to ``<uuid>`` + this + a random tail, then deleted.
GONE_SUFFIX = ".gone-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# The longest a worker waits for another's admission (milliseconds, normally) before it
# decides without the lock: a wedged worker delays the others, never blocks them.
ADMISSION_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    name: str
    directory: Path

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def holding(self) -> Path:
        """Written while a chunk is appended: what the session held before it, for a
        request in another process refused meanwhile (its Range, see Uploads._busy)."""
        return self.directory / "holding"


class _Hash:
    """The running sha256 of a session's bytes, valid while ``offset`` matches the file."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.offset = 0


# Told how many bytes the sessions on disk grew by (negative: shrank).
OnGrowth = Callable[[int], None]


class Uploads:
    """The upload sessions under ``root``.

    ``max_blob_bytes``: no session may grow past it (None: no limit); ``caps``: the open
    sessions' caps (None: unbounded); ``on_growth``: told of every byte the sessions take
    or give back on disk, for the disk budget.
    """

    def __init__(
        self,
        root: Path,
        *,
        ttl: float,
        max_blob_bytes: int | None = None,
        caps: SessionCaps | None = None,
        on_growth: OnGrowth | None = None,
        shared_dir: bool = False,
    ):
        self.root = root
        self.ttl = ttl
        # Other processes open and close sessions here too (server.workers): the caps are
        # brought up to date from disk before each new session is counted.
        self.shared_dir = shared_dir
        # The uploads directory's own flock: held while a session is admitted (start).
        self._admission = HostLock(root, wait=ADMISSION_WAIT)
        self._opening: set[str] = set()  # counted, their directory not made yet
        self.max_blob_bytes = max_blob_bytes
        self.caps = caps
        self._on_growth = on_growth or (lambda nbytes: None)
        self._hashes: dict[str, _Hash] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Sessions frozen by a closing PUT: gone for every other request.
        self._committing: set[str] = set()
        # Sessions a request is appending to, with the offset its chunk starts at (None
        # until known): any other write is refused, not queued.
        self._writing: dict[str, int | None] = {}
        # Bytes each session was reported to take (on_growth), given back when it closes.
        self._reported: dict[str, int] = {}

    async def load(self) -> int:
        """Count the sessions already on disk (an earlier run's) toward the caps."""
        found = await asyncio.to_thread(_sessions, self.root)
        if self.caps is not None:
            self.caps.load(found)
        return len(found)

    async def start(self, name: str, *, client: str = "-") -> Upload:
        """Open a session for ``client`` (its address); TOOMANYREQUESTS over a cap.

        With other processes on the directory, the count is made the disk's, the session
        admitted and its directory made under one lock of the host's (the ``flock`` of the
        uploads directory itself: no file of its own among the sessions), so the next
        admission anywhere counts it: the caps are exact for the host."""
        upload_id = uuid.uuid4().hex
        upload = Upload(upload_id, name, self.root / upload_id)
        info = json.dumps({"name": name, "started_at": time.time(), "client": client}).encode()
        if self.caps is None:
            await self._create_session(upload, info)
        elif not self.shared_dir:
            self.caps.open(upload_id, client)
            await self._create_session(upload, info)
        else:
            # disk_full: taking the lock may make the uploads directory.
            with disk_full("open an upload session"):
                async with self._admission.held() as exact:
                    if not exact:
                        log.warning(
                            "admitting an upload session without the lock of %s: another "
                            "worker held it for over %g s",
                            self.root,
                            ADMISSION_WAIT,
                        )
                    await self._recount()
                    self.caps.open(upload_id, client)
                    await self._create_session(upload, info)
        self._grew(upload_id, len(info))
        return upload

    async def _create_session(self, upload: Upload, info: bytes) -> None:
        """Make the session's directory and files (undone if that fails, or is cancelled:
        the thread is let finish first, so the admission lock covers all of it)."""
        self._opening.add(upload.id)
        with disk_full("open an upload session"):
            try:
                await settle(asyncio.to_thread(self._create, upload, info))
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, upload.directory, True)
                self._closed(upload.id)
                raise
            finally:
                self._opening.discard(upload.id)

    async def _recount(self) -> None:
        """The caps' count made the disk's: sessions other processes opened are counted,
        the ones they closed (or committed, whoever opened them) are not. A directory
        listing, and one small read per session new to this process."""
        assert self.caps is not None
        counted = self.caps.ids()
        on_disk, new = await asyncio.to_thread(_sessions_besides, self.root, counted)
        for upload_id in counted - on_disk - self._opening:
            self._closed(upload_id)  # its bytes leave the disk budget too
        self.caps.load(new)

    def check_size(self, nbytes: int, *, holds: int | None = None) -> None:
        """413 if a blob of ``nbytes`` would be too large (``holds``: what the session
        keeps meanwhile, for the error's Range)."""
        if self.max_blob_bytes is not None and nbytes > self.max_blob_bytes:
            raise UploadTooLarge(
                f"a blob of {nbytes} bytes is larger than this registry takes "
                f"(uploads.max_blob_bytes: {self.max_blob_bytes})",
                {"size": nbytes, "max": self.max_blob_bytes},
                headers=None if holds is None else _range_headers(holds),
            )

    async def get(self, name: str, upload_id: str) -> Upload:
        """The session ``upload_id`` of repository ``name``; BLOB_UPLOAD_UNKNOWN otherwise."""
        if not _UUID.match(upload_id):
            raise BlobUploadUnknown("upload session id is not one this registry issued")
        self._check_not_committing(upload_id)
        upload = Upload(upload_id, name, self.root / upload_id)
        try:
            info = json.loads(await asyncio.to_thread((upload.directory / "info.json").read_bytes))
        except (FileNotFoundError, ValueError) as exc:
            raise BlobUploadUnknown(f"upload {upload_id} is unknown or expired") from exc
        if info.get("name") != name:
            raise BlobUploadUnknown(f"upload {upload_id} does not belong to {name}")
        return upload

    async def size(self, upload: Upload) -> int:
        self._check_not_committing(upload.id)
        try:
            return (await asyncio.to_thread(os.stat, upload.data)).st_size
        except FileNotFoundError as exc:
            raise BlobUploadUnknown(f"upload {upload.id} is unknown or expired") from exc

    async def append(
        self, upload: Upload, body: AsyncIterator[bytes], *, start: int | None, length: int | None
    ) -> int:
        """Append a chunk; ``start`` (from Content-Range) must be where the upload stands.

        Each piece ``body`` yields is written (and hashed) before the next is read, so
        only one is ever held. Returns the new size. A chunk shorter or longer than
        announced, one that would pass ``max_blob_bytes``, one whose body stalls or breaks
        off, or one the disk has no room for, is rolled back: the session keeps exactly
        what it held before, and the error's ``Range`` says so. A session another request
        is writing is refused at once (UploadBusy).
        """
        self._check_not_committing(upload.id)
        if upload.id in self._writing:
            raise await self._busy(upload)
        self._writing[upload.id] = None
        try:
            async with self._lock(upload):
                return await self._append_locked(upload, body, start=start, length=length)
        finally:
            del self._writing[upload.id]

    async def _append_locked(
        self, upload: Upload, body: AsyncIterator[bytes], *, start: int | None, length: int | None
    ) -> int:
        self._check_not_committing(upload.id)
        try:
            handle = await asyncio.to_thread(_open_for_append, upload.data)
        except FileNotFoundError as exc:  # frozen, cancelled or expired
            raise BlobUploadUnknown(f"upload {upload.id} is unknown or expired") from exc
        except BlockingIOError:  # another process is appending to it, or committing it
            raise await self._busy(upload) from None
        try:
            offset = self._writing[upload.id] = os.fstat(handle.fileno()).st_size
            with contextlib.suppress(OSError):  # only a refused request's Range reads it
                await asyncio.to_thread(upload.holding.write_text, str(offset))
            if start is not None and start != offset:
                raise RangeInvalid(
                    f"chunk starts at {start} but the upload holds {offset} bytes",
                    {"expected": offset, "got": start},
                    headers=_range_headers(offset),
                )
            if length is not None:
                self.check_size(offset + length, holds=offset)
            state = await self._hash(upload, handle, offset)
            before = state.hasher.copy()  # a rollback resumes from it, no rehash of the file
            received = 0
            try:
                with disk_full("store this chunk; the upload keeps what it held before it"):
                    async for chunk in body:
                        received += len(chunk)
                        if length is not None and received > length:
                            break
                        self.check_size(offset + received)
                        await asyncio.to_thread(_write, handle, state, chunk)
                        self._grew(upload.id, len(chunk))
                    if length is not None and received != length:
                        raise SizeInvalid(
                            f"chunk announced {length} bytes but carried {received}",
                            {"expected": length, "received": received},
                        )
            except BaseException as exc:
                written = state.offset - offset
                self._hashes.pop(upload.id, None)
                await asyncio.to_thread(os.ftruncate, handle.fileno(), offset)
                state.hasher, state.offset = before, offset
                self._hashes[upload.id] = state
                self._grew(upload.id, -written)
                if isinstance(exc, UploadRefused):
                    exc.headers.setdefault("Range", _range_headers(offset)["Range"])
                raise
            if not await asyncio.to_thread(_still_at, handle, upload.data):
                # Cancelled or expired by another process while the chunk streamed in: the
                # session is gone, and so are its bytes from this process's budget.
                self._hashes.pop(upload.id, None)
                self._closed(upload.id)
        finally:
            with contextlib.suppress(OSError):  # frozen or cancelled meanwhile: moved with it
                upload.holding.unlink()
            handle.close()  # and with it the file lock
        return offset + received

    async def _busy(self, upload: Upload) -> UploadBusy:
        """The error for a write to a session another request is writing to; its Range is
        what the session holds without the chunk being written."""
        size = self._writing.get(upload.id)
        if size is None:  # another process writes it: what it noted before the chunk
            size = await asyncio.to_thread(_held_before_chunk, upload)
        return UploadBusy(
            f"upload {upload.id} is being written by another request; retry once it ends "
            "(GET the session for the offset it holds)",
            headers=_range_headers(size),
        )

    @contextlib.asynccontextmanager
    async def commit(self, upload: Upload, digest: Digest) -> AsyncIterator[Path]:
        """Freeze the session, verify its bytes against ``digest`` and yield the file.

        The caller moves the yielded file into the store; the session is gone afterwards.
        Should that fail, the session is restored as it was, so the client can retry the
        PUT. Bytes that do not match cancel the session (as registry:2 does).
        """
        if upload.id in self._writing:
            raise await self._busy(upload)
        frozen, state, locked = await self._freeze(upload)
        try:
            try:
                if digest.algorithm == "sha256" and state is not None:
                    actual = state.hasher.hexdigest()
                else:
                    hasher = await asyncio.to_thread(_hash_fd, locked, digest.algorithm)
                    actual = hasher.hexdigest()
            except BaseException:
                await asyncio.to_thread(_thaw, frozen.parent, upload.directory)
                raise
            if actual != digest.hex:
                await asyncio.to_thread(shutil.rmtree, frozen.parent, True)
                self._closed(upload.id)
                raise DigestInvalid(
                    f"uploaded content has digest {digest.algorithm}:{actual}, not {digest}",
                    {"expected": str(digest), "actual": f"{digest.algorithm}:{actual}"},
                )
            try:
                with disk_full("commit this upload"):
                    await asyncio.to_thread(os.fsync, locked)
                    yield frozen
            except BaseException:
                await asyncio.to_thread(_thaw, frozen.parent, upload.directory)
                raise
            await asyncio.to_thread(shutil.rmtree, frozen.parent, True)
            self._closed(upload.id)
        finally:
            os.close(locked)
            self._committing.discard(upload.id)

    async def cancel(self, upload: Upload) -> None:
        """Drop the session; BLOB_UPLOAD_UNKNOWN when it is gone or being committed.

        The session is renamed away first, in one step: a freeze in another process either
        took it before (this cancel is then BLOB_UPLOAD_UNKNOWN) or finds it gone. A chunk
        another process is appending meanwhile lands in the removed file, as if it came
        just before the cancel.
        """
        self._check_not_committing(upload.id)
        async with self._lock(upload):
            self._check_not_committing(upload.id)
            self._hashes.pop(upload.id, None)
            if not await asyncio.to_thread(_remove, upload.directory):
                raise BlobUploadUnknown(f"upload {upload.id} is unknown or expired")
            self._closed(upload.id)

    async def expire(self) -> int:
        """Delete sessions idle for longer than the TTL; returns how many.

        A session a request is working on (appending, committing) is never idle.
        """
        cutoff = time.time() - self.ttl
        expired = 0
        for name in await asyncio.to_thread(_stale_entries, self.root, cutoff):
            upload_id = name.removesuffix(FROZEN_SUFFIX)
            lock = self._locks.get(upload_id)
            busy = upload_id in self._committing or upload_id in self._writing
            if busy or (lock is not None and lock.locked()):
                continue
            async with self._lock_of(upload_id):
                if upload_id in self._committing:
                    continue
                if await asyncio.to_thread(_remove_if_stale, self.root / name, cutoff):
                    self._hashes.pop(upload_id, None)
                    self._closed(upload_id)
                    expired += 1
        if expired:
            log.info("expired %d stale upload sessions", expired)
        return expired

    async def expire_forever(self, interval: float) -> None:
        while True:
            try:
                await self.expire()
            except OSError:
                log.exception("expiring upload sessions failed")
            await asyncio.sleep(interval)

    async def _freeze(self, upload: Upload) -> tuple[Path, _Hash | None, int]:
        """Under the session's lock, take the session away from every other request.

        Returns the frozen data file, the running hash if it covers exactly that file, and
        a descriptor holding the file's lock until the commit closes it.
        """
        async with self._lock(upload):
            self._check_not_committing(upload.id)
            frozen = self.root / f"{upload.id}{FROZEN_SUFFIX}"
            try:
                fd = await asyncio.to_thread(_freeze_locked, upload.directory, frozen)
            except FileNotFoundError as exc:
                raise BlobUploadUnknown(f"upload {upload.id} is unknown or expired") from exc
            except BlockingIOError:  # another process is appending to it
                raise await self._busy(upload) from None
            self._committing.add(upload.id)
            state = self._hashes.pop(upload.id, None)
        size = os.fstat(fd).st_size
        return frozen / "data", state if state is not None and state.offset == size else None, fd

    def _grew(self, upload_id: str, nbytes: int) -> None:
        self._reported[upload_id] = self._reported.get(upload_id, 0) + nbytes
        self._on_growth(nbytes)

    def _closed(self, upload_id: str) -> None:
        """The session is gone: it no longer counts toward the caps or the disk budget."""
        if self.caps is not None:
            self.caps.close(upload_id)
        if nbytes := self._reported.pop(upload_id, 0):
            self._on_growth(-nbytes)

    def _check_not_committing(self, upload_id: str) -> None:
        if upload_id in self._committing:
            raise BlobUploadUnknown(f"upload {upload_id} is being committed; it takes no more")

    def _lock(self, upload: Upload) -> asyncio.Lock:
        return self._lock_of(upload.id)

    def _lock_of(self, upload_id: str) -> asyncio.Lock:
        lock = self._locks.get(upload_id)
        if lock is None:
            lock = self._locks[upload_id] = asyncio.Lock()
        return lock

    async def _hash(self, upload: Upload, handle: BinaryIO, offset: int) -> _Hash:
        """The running hash of the ``offset`` bytes the session's file (open as ``handle``,
        under its file lock) holds; rebuilt from the file when this process's is stale."""
        state = self._hashes.get(upload.id)
        if state is None or state.offset != offset:
            state = _Hash()
            state.hasher = await asyncio.to_thread(_hash_fd, handle.fileno(), "sha256")
            state.offset = offset
            self._hashes[upload.id] = state
        return state

    def _create(self, upload: Upload, info: bytes) -> None:
        upload.directory.mkdir(parents=True)
        upload.data.touch()
        (upload.directory / "info.json").write_bytes(info)


@contextlib.contextmanager
def disk_full(what: str) -> Iterator[None]:
    """ENOSPC (or a quota) becomes the registry's 507, not an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise InsufficientStorage(f"the registry's disk is full: could not {what}") from exc


def _held_before_chunk(upload: Upload) -> int:
    """What a session held before the chunk another process is appending: its note, or
    (none yet, or unreadable) the file's size."""
    try:
        size = os.stat(upload.data).st_size
    except FileNotFoundError:
        return 0
    try:
        noted = ascii_int(upload.holding.read_text(encoding="ascii", errors="replace").strip())
    except OSError:
        return size
    return noted if noted is not None and noted <= size else size


def _open_for_append(data: Path) -> BinaryIO:
    """Open a session's data file to append, holding its file lock.

    The lock (flock) keeps writers and a freeze in other processes sharing the data
    directory apart, as the session's asyncio lock does within this one; taken without
    waiting (BlockingIOError when held), so a busy session is refused at once. Unbuffered: a
    failed write leaves nothing in a buffer to land after the rollback.
    """
    # Readable too: the running hash is rebuilt from this very file (_hash_fd), not from
    # whatever the path names by then.
    fd = os.open(data, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)  # never re-creates it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _at(fd, data):  # a freeze holds it and has already moved it
                raise FileNotFoundError(errno.ENOENT, "session frozen", str(data)) from None
            raise  # in use elsewhere: being appended to (or about to be frozen)
        if not _at(fd, data):
            raise FileNotFoundError(errno.ENOENT, "session frozen or cancelled", str(data))
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "ab", buffering=0)


def _at(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _still_at(handle: BinaryIO, path: Path) -> bool:
    return _at(handle.fileno(), path)


def _freeze_locked(directory: Path, frozen: Path) -> int:
    """Rename the session away once no process is appending to it (see _open_for_append).

    Returns a descriptor on its data that holds the file lock until closed, so expiry in
    another process leaves the frozen session alone while it is committed.
    """
    fd = os.open(directory / "data", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _at(fd, directory / "data"):  # another process froze it first
                raise FileNotFoundError(errno.ENOENT, "session frozen", str(directory)) from None
            raise  # being appended to (or about to be frozen)
        if not _at(fd, directory / "data"):
            raise FileNotFoundError(errno.ENOENT, "session cancelled", str(directory))
        os.rename(directory, frozen)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sessions(root: Path) -> list[tuple[str, str]]:
    """(id, client address) of every open session under ``root``. Blocking."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if not _UUID.match(entry.name):
            continue  # a frozen session (a crash mid-commit) or a stranger
        found.append((entry.name, _client(Path(entry.path))))
    return found


def _client(directory: Path) -> str:
    """The client address a session's ``info.json`` records ("-": none, or not yet)."""
    try:
        info = json.loads((directory / "info.json").read_bytes())
    except (OSError, ValueError):
        info = {}
    client = info.get("client") if isinstance(info, dict) else None
    return client if isinstance(client, str) else "-"


def _sessions_besides(root: Path, known: set[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """The ids of the open sessions under ``root``, and (id, client) of those not in
    ``known``. Blocking."""
    try:
        names = {name for name in os.listdir(root) if _UUID.match(name)}
    except FileNotFoundError:
        return set(), []
    return names, [(i, _client(root / i)) for i in names - known]


def _stale_entries(root: Path, cutoff: float) -> list[str]:
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return [entry.name for entry in entries if _last_used(Path(entry.path)) < cutoff]


def _last_used(directory: Path) -> float:
    """The newest mtime of the session's files, or of the directory while it is created."""
    times = []
    for path in (directory / "info.json", directory / "data"):
        try:
            times.append(os.stat(path).st_mtime)
        except (FileNotFoundError, NotADirectoryError):
            continue
    if not times:
        try:
            return os.stat(directory).st_mtime
        except FileNotFoundError:
            return 0.0
    return max(times)


def _remove_if_stale(directory: Path, cutoff: float) -> bool:
    """Delete a stale session, unless a process is appending to it or freezing it."""
    if _last_used(directory) >= cutoff or not directory.exists():
        return False
    if directory.is_symlink() or not directory.is_dir():
        directory.unlink(missing_ok=True)
        return True
    try:
        fd = os.open(directory / "data", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _at(fd, directory / "data"):
                return False  # frozen, cancelled or thawed since: judged again next time
        return _remove(directory)
    except BlockingIOError:
        return False  # in use by another process
    finally:
        if fd is not None:
            os.close(fd)


def _remove(directory: Path) -> bool:
    """Delete a session directory; False when there was none.

    Renamed to a name no request looks up, then deleted: should another process rename
    the session (freeze it) first, this one finds it gone rather than deleting its files
    through a descriptor on the directory opened before.
    """
    gone = directory.with_name(f"{directory.name}{GONE_SUFFIX}{uuid.uuid4().hex}")
    try:
        os.rename(directory, gone)
    except FileNotFoundError:
        return False
    shutil.rmtree(gone, ignore_errors=True)  # an expiry elsewhere may delete it too
    return True


def _thaw(frozen: Path, directory: Path) -> None:
    """Put a frozen session back where requests find it."""
    with contextlib.suppress(FileNotFoundError):
        os.rename(frozen, directory)


def _range_headers(size: int) -> dict[str, str]:
    return {"Range": f"0-{max(size - 1, 0)}"}


def _write(handle: BinaryIO, state: _Hash, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may take only part
        written = handle.write(view)
        view = view[written or 0 :]
    state.hasher.update(data)
    state.offset += len(data)


def _hash_fd(fd: int, algorithm: str) -> hashlib._Hash:
    """Hash the file open as ``fd`` from its start (by offset: the descriptor's position
    is left alone), whatever name it has by now."""
    hasher, offset = hashlib.new(algorithm), 0
    while chunk := os.pread(fd, BATCH, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher
