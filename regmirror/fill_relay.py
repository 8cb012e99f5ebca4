"""The relay of streamed-through fills between the workers of one host.

A fill that is kept is shared across processes through its partial file: the other
workers' waiters tail it (:mod:`regmirror.fill`). A fill that is *streamed through*
(the blob cannot be kept: over the budget, or the disk is full) writes nothing more to
that file: its bytes pass through a window in the filling worker's memory. So that a
herd spread over every worker still makes one upstream GET, the worker that streams a
fill through relays it: it listens on a unix stream socket of its own in the run
directory (``relay-<pid>.sock``) and, while it streams, publishes a *marker*
``through/<alg>-<hex>`` there: a symbolic link whose target names its socket and the
inode of the partial file it holds locked (``<socket>:<inode>``; a symlink, so it
appears whole, at once). Another worker tailing that partial file finds the marker,
connects, and is sent the bytes from where the file ends: it is one more reader of
the fill's window (held back by it, cut by it when it stalls), and it feeds them into a
window of its own for its local waiters. The last byte is sent only once the filler
has verified the digest, as to any reader; a stream that ends short is a failed fill.

Why not the disk (a spool, or the partial file kept until every follower has it):
streaming through means there is no room for the blob, and a full disk has none at all;
any spool counted against the budget would evict what is kept to make room for what is
not. And not "each worker fetches its own" once told there is no file: that is one
upstream GET per worker, not per host. Memory is bounded as in one process: one window
per worker that follows, plus a socket buffer.

The marker lives in the run directory (the supervisor's temporary directory, never the
data disk, which may be full). A fill that fails takes it away at once; one that succeeds
stays relayed :data:`~regmirror.fill.RELAY_GRACE` seconds after it ends, its window (the
newest 16 MiB) held that long, for a follower whose look found the partial file gone
before it found the marker (a fast fill between two looks). A marker is ignored unless
its inode is the one the follower tails (any, if it read nothing yet: every fill of the
digest has the same bytes) and the filler still relays that fill (it checks both before
it answers).

The protocol, ASCII lines then bytes: the follower sends ``<digest> <inode>\\n``; the
filler answers ``no\\n`` (not a fill it streams through) or ``ok <size> <file_end>\\n``
followed by the blob's bytes ``[file_end, size)``; bytes before ``file_end`` are in the
partial file, which the follower reads as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid, FillFailed
from regmirror.fill import Fill, Span

log = logging.getLogger(__name__)

MARKERS = "through"  # under the run directory
HANDSHAKE_TIMEOUT = 5.0  # seconds for either side's request or answer line
MAX_LINE = 256
SEND_CHUNK = 256 * 1024  # bytes of a file span sent at a time
MAX_SUN_PATH = 100  # bytes of a unix socket's path that bind and connect take (108, less a margin)


@dataclass(frozen=True, slots=True)
class Relayed:
    """A connected relay: the blob's size, where the filler's file ends, the bytes from
    there (``reader``) and the connection (``close()`` it)."""

    size: int
    file_end: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class FillRelay:
    """This worker's side of the relay, in ``run_dir``: the markers it publishes, the
    ones it looks up, and its socket (``name``: this process's by default)."""

    def __init__(self, run_dir: Path, *, name: str | None = None):
        self.run_dir = run_dir
        self.markers = run_dir / MARKERS
        self.socket = run_dir / (name or f"relay-{os.getpid()}.sock")
        self._server: asyncio.AbstractServer | None = None
        self._dir_fd: int | None = None  # see _address

    # -- the filler's side ---------------------------------------------------------

    def publish(self, digest: Digest, inode: int) -> None:
        """Tell the other workers that this worker streams ``digest`` through (its partial
        file ``inode``). Blocking, but a symlink and a rename in a temporary directory:
        done once per streamed-through fill."""
        marker = self._marker(digest)
        staged = marker.with_name(f".{marker.name}.{self.socket.name}")
        try:
            self.markers.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            os.symlink(f"{self.socket.name}:{inode}", staged)
            os.replace(staged, marker)
        except OSError as exc:  # the relay is lost: the others' waiters are cut, as before
            log.warning("could not publish the relay of %s: %s", digest, exc)

    def withdraw(self, digest: Digest, inode: int) -> None:
        """Remove this fill's marker (another fill's, published since, stays)."""
        marker = self._marker(digest)
        with contextlib.suppress(OSError):
            if os.readlink(marker) == f"{self.socket.name}:{inode}":
                marker.unlink()

    async def start(self, find: Callable[[Digest, int], Fill | None]) -> None:
        """Listen for the other workers; ``find(digest, inode)``: the fill this worker
        streams through from that partial file, if any."""
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a previous worker with this pid (a restart)
        self._server = await asyncio.start_unix_server(
            lambda r, w: self._serve(r, w, find), path=self._address(self.socket), limit=MAX_LINE
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            self._server = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        find: Callable[[Digest, int], Fill | None],
    ) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                line = await reader.readline()
            fill = _request(line, find)
            if fill is None:
                writer.write(b"no\n")
                return
            size = await fill.length()
            file_end = fill.file_end
            assert file_end is not None  # find() answers streamed-through fills only
            writer.write(f"ok {size} {file_end}\n".encode())
            await _send(fill, file_end, writer)
        except (FillFailed, OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            writer.transport.abort()  # a short stream: the follower's fill fails
        finally:
            writer.close()

    # -- the follower's side -------------------------------------------------------

    def lookup(self, digest: Digest) -> tuple[Path, int] | None:
        """The socket of the worker that streams ``digest`` through, and the inode of
        its partial file; None when no marker says so. Blocking (one readlink)."""
        try:
            target = os.readlink(self._marker(digest))
            name, inode = target.rsplit(":", 1)
            return self.run_dir / Path(name).name, int(inode)
        except (OSError, ValueError):
            return None

    async def connect(self, address: Path, digest: Digest, inode: int) -> Relayed | None:
        """The bytes of the fill ``digest`` (partial file ``inode``) that the worker at
        ``address`` streams through; None when it does not (any more), or is gone."""
        try:
            reader, writer = await asyncio.open_unix_connection(
                self._address(address), limit=SEND_CHUNK
            )
        except OSError:
            return None
        try:
            writer.write(f"{digest} {inode}\n".encode())
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await writer.drain()
                answer = (await reader.readline()).split()
            if len(answer) == 3 and answer[0] == b"ok":
                size, file_end = int(answer[1]), int(answer[2])
                if 0 <= file_end <= size:
                    return Relayed(size, file_end, reader, writer)
        except (OSError, TimeoutError, ValueError):
            pass
        writer.close()
        return None

    def _address(self, socket: Path) -> str:
        """What to bind or connect to for ``socket`` (in the run directory): its path, or,
        when that is too long for a unix socket (a deep ``TMPDIR``), the same file
        reached through this process's descriptor of the run directory."""
        if len(os.fsencode(socket)) <= MAX_SUN_PATH:
            return str(socket)
        if self._dir_fd is None:
            self._dir_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{socket.name}"

    def _marker(self, digest: Digest) -> Path:
        return self.markers / f"{digest.algorithm}-{digest.hex}"


def _request(line: bytes, find: Callable[[Digest, int], Fill | None]) -> Fill | None:
    words = line.split()
    if len(words) != 2:
        return None
    try:
        digest = Digest.parse(words[0].decode("ascii"))
        inode = int(words[1])
    except (DigestInvalid, UnicodeDecodeError, ValueError):
        return None
    return find(digest, inode)


async def _send(fill: Fill, start: int, writer: asyncio.StreamWriter) -> None:
    """Bytes ``[start, size)`` of ``fill`` to ``writer``, as any reader gets them (the
    last one once verified); the connection's buffer holds the fill's window back."""
    loop = asyncio.get_running_loop()
    async for part in fill.parts(start):
        if isinstance(part, Span):
            sent = await loop.sendfile(writer.transport, part.file, part.pos, part.limit - part.pos)
            if sent < part.limit - part.pos:
                raise OSError(f"the partial file of {fill.digest} is shorter than said")
        else:
            writer.write(part)
        await writer.drain()
    await writer.drain()
