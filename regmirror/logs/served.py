"""What a request's access line says beyond HTTP: who asked, and which tier served it.

The access middleware gives each request a :class:`Served` record. On blob and manifest
reads it is also made *current* (a context variable), so the code that finds the bytes
(local disk, a fill from S3 or an upstream) marks the tier where it decides it, without
a request being passed down to it. Code running for no request marks nothing.

Work shared by several requests (a manifest fetched once for every concurrent caller)
runs in a task of its own under :func:`collecting`, and each caller copies what it
marked with :func:`adopt`: the caller that started it and those that joined alike.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, TypeVar

from aiohttp import web

T = TypeVar("T")

# local: local disk had it. s3 / upstream: read from there for this request (a fill, a
# manifest). fill: streamed from a fill another process owns (its source is not known here).
Tier = Literal["local", "fill", "s3", "upstream"]


@dataclass
class Served:
    client: str = "-"  # the client's address, through auth.trusted_proxies
    user: str | None = None  # the authenticated user (never a credential)
    tier: Tier | None = None  # None: not a blob or manifest read, or it failed first
    waited: bool = False  # joined a fill (or manifest fetch) another request started
    sent: int | None = None  # body bytes, told by handlers that send bodies themselves


SERVED = web.RequestKey("served", Served)
_current: ContextVar[Served | None] = ContextVar("regmirror_served", default=None)


def track(served: Served) -> None:
    """Make ``served`` the record that marks in this task (and tasks it starts) go to."""
    _current.set(served)


def mark(tier: Tier) -> None:
    """The bytes being answered come from ``tier`` (the last mark wins)."""
    served = _current.get()
    if served is not None:
        served.tier = tier


def mark_waited() -> None:
    """The request joined a fill that another request started."""
    served = _current.get()
    if served is not None:
        served.waited = True


def identify(request: web.BaseRequest, user: str) -> None:
    """The request was authenticated as ``user``."""
    served = request.get(SERVED)
    if served is not None:
        served.user = user


def sent(request: web.BaseRequest, nbytes: int) -> None:
    """The handler streamed ``nbytes`` of body itself (a fill's, perhaps cut short)."""
    served = request.get(SERVED)
    if served is not None:
        served.sent = nbytes


async def collecting(work: Awaitable[T]) -> tuple[T, Served]:
    """Run ``work`` (in a task of its own) with a fresh record; its result and its marks."""
    record = Served()
    _current.set(record)  # this task's context only
    return await work, record


def adopt(record: Served, *, joined: bool) -> None:
    """Copy the marks of shared work into the current request's record."""
    served = _current.get()
    if served is None or record.tier is None:
        return
    served.tier = record.tier
    served.waited = served.waited or joined or record.waited
