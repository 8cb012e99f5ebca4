"""How fast an upload body must arrive: a piece within ``uploads.idle_timeout`` and, on
average, ``uploads.min_rate`` bytes a second over each ``uploads.min_rate_window``.

The idle timeout alone does not cut a trickle: a client sending one byte every few
seconds holds its session, its connection and a writer's place forever. The rate is
measured over whole windows from the first byte read, so a body that pauses briefly
(a client between two reads of its own source) is not cut while its window still
averages enough. Either cut raises an :class:`~regmirror.errors.UploadIdle` (408); the
session then keeps what it held before the request, as for every failed append.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import StreamReader

from regmirror.errors import UploadIdle, UploadTooSlow

CHUNK = 64 * 1024  # the most of a body held in memory per upload, between socket and file


@dataclass(frozen=True, slots=True)
class BodyPace:
    idle_timeout: float  # seconds a body may send nothing
    min_rate: int = 0  # bytes a second on average over each window; 0: not checked
    window: float = 60.0  # seconds a rate is averaged over

    @property
    def window_bytes(self) -> float:
        """What each window must bring."""
        return self.min_rate * self.window


async def paced(content: StreamReader, pace: BodyPace) -> AsyncIterator[bytes]:
    """The body in pieces of at most CHUNK bytes; UploadIdle when none comes within the
    idle timeout, UploadTooSlow when a window ends short of its bytes."""
    loop = asyncio.get_running_loop()
    idle_at = loop.time() + pace.idle_timeout
    window_end = loop.time() + pace.window
    brought = 0  # bytes read in the current window
    while True:
        now = loop.time()
        if pace.min_rate and now >= window_end:
            if brought < pace.window_bytes:
                raise UploadTooSlow(
                    f"the body brought {brought} bytes in {pace.window:g} s, less than "
                    f"{pace.min_rate} bytes/s (uploads.min_rate); the request was cut and "
                    "the upload keeps what it held before it"
                )
            window_end, brought = now + pace.window, 0
        # Wake at the window's end too: a trickle is cut then, not at its next byte.
        deadline = min(idle_at, window_end) if pace.min_rate else idle_at
        try:
            async with asyncio.timeout_at(deadline):
                piece = await content.read(CHUNK)
        except TimeoutError:
            if deadline < idle_at:
                continue  # the window ended: judged at the top of the loop
            raise UploadIdle(
                f"no byte of the body arrived for {pace.idle_timeout:g} s "
                "(uploads.idle_timeout); the request was cut and the upload keeps what it "
                "held before it"
            ) from None
        if not piece:
            return
        brought += len(piece)
        idle_at = loop.time() + pace.idle_timeout
        yield piece
