"""Raw HTTP/1.1 upload clients that stall: a chunked PATCH that sends some bytes, then nothing.

aiohttp's client cannot leave a request body half-sent on purpose, so these speak
HTTP over an asyncio stream themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

CHUNK = 64 * 1024


class StalledPatch:
    """A PATCH of ``location`` with a chunked body that sends ``nbytes`` and then stalls."""

    def __init__(self, host: str, port: int, location: str):
        self.host, self.port, self.location = host, port, location
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, nbytes: int, fill: bytes = b"x") -> None:
        """Connect, send the headers and ``nbytes`` of body in chunked encoding; no end."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"PATCH {self.location} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.writer.write(head.encode())
        sent = 0
        while sent < nbytes:
            size = min(CHUNK, nbytes - sent)
            self.writer.write(b"%x\r\n" % size + fill * size + b"\r\n")
            await self.writer.drain()
            sent += size

    async def trickle(self, pieces: int, every: float, fill: bytes = b"x") -> int:
        """After :meth:`send`: one more byte every ``every`` seconds, ``pieces`` times or
        until the server closes the connection; how many it sent."""
        assert self.writer is not None
        for sent in range(pieces):
            await asyncio.sleep(every)
            if self.writer.is_closing():
                return sent
            try:
                self.writer.write(b"1\r\n" + fill[:1] + b"\r\n")
                await self.writer.drain()
            except ConnectionError:
                return sent
        return pieces

    async def response(self, timeout: float) -> tuple[int, bytes]:
        """The status and the raw head and body the server sent before closing (or
        ``timeout``); (0, b"") when it sent nothing."""
        assert self.reader is not None
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    data += chunk
                    if b"\r\n\r\n" in data and _complete(data):
                        break
        if not data.startswith(b"HTTP/1.1 "):
            return 0, data
        return int(data[9:12]), data

    async def closed(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` seconds."""
        assert self.reader is not None
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` (``VmRSS``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
