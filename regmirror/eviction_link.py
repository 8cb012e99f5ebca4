"""The eviction owner's mailbox: how the other workers keep worker 0's index exact and
ask it for room, over a unix datagram socket in the supervisor's run directory.

Worker 0 alone deletes blobs (:mod:`regmirror.workers`); what another worker stores, the
fills it reserves room for and the uploads it grows would reach the owner's index only
at its next rescan of the data directory, ``cache.max_bytes`` overshot meanwhile. So a
worker tells the owner at once, one datagram each (ASCII words):

- ``stored <digest> <size> <pinned 0|1>``: a blob entered the store (fill or push);
- ``reserve <key> <size>`` / ``release <key>``: a fill's size counted toward the
  budget while it runs (``key`` is ``<pid>.<n>``: a dead worker's are dropped);
- ``pass``: its uploads grew; the owner measures them and evicts if over;
- ``admit <id> <size>``, answered ``admit <id> ok`` or ``admit <id> <reason>``: whether
  a fill that does not fit the free space can be kept (by the owner's whole index);
- ``room <id> <nbytes>``, answered ``room <id> <freed>``: the disk is full; evict.

A question waits at most :data:`ASK_TIMEOUT` seconds (the owner restarting, or busy):
then the asker decides alone, as before (a fill streams through). The owner's rescan
of the directory stays, as a backstop for what a restart lost. Datagrams on one host
are not lost short of a full receive queue (the sender then waits, in its event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid

if TYPE_CHECKING:
    from regmirror.eviction import BlobCache

log = logging.getLogger(__name__)

SOCKET_NAME = "owner.sock"
ASK_TIMEOUT = 2.0  # seconds a worker waits for the owner's answer
PRUNE_SECONDS = 5.0  # how often the owner drops the reservations of dead workers
MAX_DATAGRAM = 512


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


class OwnerLink(asyncio.DatagramProtocol):
    """A worker's side: what it tells the owner, and the answers it waits for."""

    def __init__(self, run_dir: Path):
        self.address = str(socket_path(run_dir))
        self._transport: asyncio.DatagramTransport | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._pid = os.getpid()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("")  # an abstract address of the kernel's choosing: where answers come
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for future in self._waiting.values():
            future.cancel()

    # -- asyncio.DatagramProtocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: object) -> None:
        words = data.decode("ascii", "replace").split()
        future = self._waiting.pop(words[1], None) if len(words) == 3 else None
        if future is not None and not future.done():
            future.set_result(words[2])

    def error_received(self, exc: Exception) -> None:
        log.debug("eviction owner unreachable: %s", exc)

    # -- what a worker tells -------------------------------------------------------

    def stored(self, digest: Digest, size: int, *, pinned: bool) -> None:
        self._send(f"stored {digest} {size} {int(pinned)}")

    def reserve(self, size: int) -> str:
        key = f"{self._pid}.{next(self._ids)}"
        self._send(f"reserve {key} {size}")
        return key

    def release(self, key: str) -> None:
        self._send(f"release {key}")

    def check(self) -> None:
        self._send("pass")

    async def admit(self, size: int) -> str | None:
        """The owner's verdict on keeping a fill of ``size`` bytes: "ok", or why not;
        None when it did not answer in time."""
        return await self._ask("admit", size)

    async def room(self, nbytes: int) -> int | None:
        """Bytes the owner evicted to make ``nbytes`` free; None: no answer in time."""
        answer = await self._ask("room", nbytes)
        try:
            return int(answer) if answer is not None else None
        except ValueError:
            return None

    async def _ask(self, verb: str, number: int) -> str | None:
        if self._transport is None:
            return None
        ask = str(next(self._ids))
        future = self._waiting[ask] = asyncio.get_running_loop().create_future()
        self._send(f"{verb} {ask} {number}")
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await future
        except TimeoutError:
            log.warning(
                "the eviction owner (worker 0) did not answer %s in %g s", verb, ASK_TIMEOUT
            )
            return None
        finally:
            self._waiting.pop(ask, None)

    def _send(self, message: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(message.encode("ascii"), self.address)


class OwnerMailbox(asyncio.DatagramProtocol):
    """Worker 0's side: applies what the others tell to its :class:`BlobCache`."""

    def __init__(self, run_dir: Path, cache: BlobCache):
        self.path = socket_path(run_dir)
        self.cache = cache
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a previous worker 0's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._spawn(self._prune())

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: object) -> None:
        words = data[:MAX_DATAGRAM].decode("ascii", "replace").split()
        try:
            self._apply(words, addr)
        except (ValueError, IndexError, DigestInvalid):
            log.warning("eviction owner: ignored a malformed message %r", data[:80])

    def _apply(self, words: list[str], addr: object) -> None:
        verb = words[0]
        if verb == "stored":
            digest, size, pinned = Digest.parse(words[1]), int(words[2]), words[3] == "1"
            self.cache.learned(digest, size, evictable=not pinned)
        elif verb == "reserve":
            self.cache.remote_reserve(words[1], int(words[2]))
        elif verb == "release":
            self.cache.remote_release(words[1])
        elif verb == "pass":
            self.cache.remote_pass()
        elif verb in ("admit", "room"):
            self._spawn(self._answer(verb, words[1], int(words[2]), addr))
        else:
            raise ValueError(verb)

    async def _answer(self, verb: str, ask: str, number: int, addr: Any) -> None:
        try:
            if verb == "admit":
                answer = await self.cache.admit(number) or "ok"
            else:
                answer = str(await self.cache.make_room(number))
        except Exception:  # the asker times out and decides alone
            log.exception("eviction owner: answering %s failed", verb)
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(f"{verb} {ask} {answer}".encode("ascii"), addr)

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_SECONDS)
            self.cache.drop_remote(pid_alive)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no procfs
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
