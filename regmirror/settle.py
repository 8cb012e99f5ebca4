"""Awaiting a thread's work that must finish even when its awaiter is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def settle(work: Awaitable[T]) -> T:
    """Await ``work``; if cancelled meanwhile, let it finish first (it may be a thread
    using a file descriptor the caller is about to close), then stay cancelled."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
