"""A small JSON record one process rewrites in place and others read whole, neither
needing a new file descriptor once its file is open: a worker out of descriptors
(EMFILE) is exactly the one whose state must still get out, and a reader at its limit
must still read the others.

The writer keeps its file open for its life and rewrites it in place (``pwrite`` at 0,
then ``ftruncate``), where a temp file renamed per snapshot needs a new descriptor
per write. A reader keeps each file it reads open too, and opens it anew
only when the path names another file (``stat`` needs no descriptor): a restarted
worker's, after the supervisor deleted its predecessor's.

In place, a reader can catch a write half done: each record is ``<length> <crc32>\\n``
and the JSON of that length. A read whose body does not match is read again, a few
times; no lock, so a stopped writer cannot hold a reader up. A record shorter than the
one before leaves that one's tail until the truncate: the length ignores it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_TRIES = 5  # reads of a record caught mid-write before it is called unreadable
RETRY_PAUSE = 0.001  # seconds between them: the writer finishes a write in microseconds
SLACK = 4096  # bytes read past the size seen: a record that grew since is read whole


class Unreadable(Exception):
    """The file is there but its record could not be read (no descriptor to open it
    with, or no whole record in it)."""


def encode(state: dict[str, Any]) -> bytes:
    body = json.dumps(state, separators=(",", ":")).encode()
    return b"%d %08x\n" % (len(body), zlib.crc32(body)) + body


def decode(data: bytes) -> dict[str, Any] | None:
    """The record in ``data``, or None if it is not whole (caught mid-write)."""
    head, newline, rest = data.partition(b"\n")
    try:
        length_field, checksum_field = head.split(b" ")
        length, checksum = int(length_field), int(checksum_field, 16)
    except ValueError:
        return None
    body = rest[:length] if newline else b""
    if len(body) != length or zlib.crc32(body) != checksum:
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def load(path: Path) -> dict[str, Any] | None:
    """One read of ``path`` by a process that keeps nothing open (the supervisor's)."""
    try:
        return decode(path.read_bytes())
    except OSError:
        return None


class Writer:
    """Rewrites ``path`` in place, on the descriptor it opened the first time."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def write(self, state: dict[str, Any]) -> None:
        data = encode(state)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        written = os.pwrite(self._fd, data, 0)
        if written != len(data):  # a full disk may take part of it
            raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes", str(self.path))
        os.ftruncate(self._fd, len(data))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Held:
    fd: int
    inode: tuple[int, int]  # (st_dev, st_ino)
    last: dict[str, Any] | None = None  # the last whole record read from it


class Reader:
    """Reads the records of the files under ``directory``, each on a descriptor kept
    open since its first read."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._held: dict[str, _Held] = {}

    def read(self, name: str) -> dict[str, Any] | None:
        """File ``name``'s record; None if there is no such file. Raises
        :class:`Unreadable` if it is there but cannot be read. A record caught mid-write
        at every try is the last whole one read from that file, if any (its writer
        writes without pause; its heartbeat says how old it is)."""
        path = self.directory / name
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self._drop(name)
            return None
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from exc
        held = self._held.get(name)
        if held is None or held.inode != (info.st_dev, info.st_ino):
            self._drop(name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as exc:  # EMFILE: this process is out of descriptors
                raise Unreadable(f"cannot open {path}: {exc.strerror}") from exc
            opened = os.fstat(fd)  # replaced since the stat: this one is read
            held = self._held[name] = _Held(fd, (opened.st_dev, opened.st_ino))
        for attempt in range(READ_TRIES):
            if attempt:
                time.sleep(RETRY_PAUSE)
            size = os.fstat(held.fd).st_size
            if (state := decode(os.pread(held.fd, size + SLACK, 0))) is not None:
                held.last = state
                return state
        if held.last is not None:
            return held.last
        raise Unreadable(f"{path}: no whole record in {READ_TRIES} reads")

    def _drop(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)

    def close(self) -> None:
        for name in list(self._held):
            self._drop(name)
