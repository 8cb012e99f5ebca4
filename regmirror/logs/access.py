"""The access log: one line per request on the registry port, after its body is sent.

aiohttp writes it (its ``access_log_class`` hook, called once the response is finished,
so bytes and duration are the body's and not just the headers'); :func:`middlewares`'
one, outermost, gives every request its :class:`~regmirror.logs.served.Served` record first,
so that refusals by access control, 404s and error envelopes are logged with the rest.

A line never carries a credential: the user is the name access control authenticated,
and the query string keeps only the registry API's own parameters' values (any other
value, such as a presigned URL's signature, is replaced by ``…``)::

    127.0.0.1 - alice "GET /v2/library/alpine/blobs/sha256:… HTTP/1.1" 200 3623807 0.184 tier=upstream waited=no
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from regmirror.api.envelope import ENDED
from regmirror.auth.clients import Network, client_address
from regmirror.logs import served as served_
from regmirror.logs.served import SERVED, Served

ACCESS = logging.getLogger("regmirror.access")
ENABLED = web.AppKey("access_log", bool)

# Query parameters of the registry API (and containerd's ns): their values are logged.
KNOWN_PARAMETERS = frozenset({"digest", "mount", "from", "ns", "n", "last", "artifactType"})
MAX_TARGET = 2000  # characters of path and query in a line
_UNSAFE = re.compile(r'[^\x21-\x7e…]|["\\]')
_TIERED = ("/blobs/{digest}", "/manifests/{reference}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middlewares(enabled: bool, trusted_proxies: Sequence[Network]) -> list[Any]:
    """The access middleware for ``create_app`` to put first, or none when off."""
    if not enabled:
        return []
    client = client_namer(trusted_proxies)

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        forwarded = tuple(request.headers.getall("X-Forwarded-For", ()))
        served = request[SERVED] = Served(client=client(request.remote, forwarded))
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else ""
        if request.method in ("GET", "HEAD") and canonical.endswith(_TIERED):
            served_.track(served)
        return await handler(request)

    return [access]


def client_namer(
    trusted_proxies: Sequence[Network],
) -> Callable[[str | None, tuple[str, ...]], str]:
    """The client as logged, from the peer and its ``X-Forwarded-For`` values."""

    @functools.lru_cache(maxsize=4096)
    def client(peer: str | None, forwarded: tuple[str, ...]) -> str:
        """Every request asks, for the same few peers and proxy chains."""
        address = client_address(peer, forwarded, trusted_proxies)
        return str(address) if address else "-"

    return client


def runner_options(app: web.Application) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments: our access logger, or none at all (this also
    keeps aiohttp's own from logging a second line per request)."""
    if app.get(ENABLED):
        return {"access_log": ACCESS, "access_log_class": AccessLogger}
    return {"access_log": None}


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:
        """Below the logger's level aiohttp does not even time requests."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        served = request.get(SERVED) or Served(client=request.remote or "-")
        url = request.rel_url
        write_line(
            self.logger,
            served,
            request.method,
            target(url.raw_path, url.raw_query_string),
            f"HTTP/{request.version.major}.{request.version.minor}",
            response.status,
            body_bytes(request, response, served),
            time,
            request.get(ENDED),
        )


def write_line(
    logger: logging.Logger,
    served: Served,
    method: str,
    path: str,
    protocol: str,
    status: int,
    nbytes: int,
    seconds: float,
    ended: str | None = None,
) -> None:
    """One request's line (and its structured fields), however it was answered: through
    aiohttp, or by the fast path (:mod:`regmirror.lean`). ``path``: :func:`target`'s."""
    fields: dict[str, Any] = {
        "event": "access",
        "client": served.client,
        "user": served.user,
        "method": method,
        "path": path,
        "protocol": protocol,
        "status": status,
        "bytes": nbytes,
        "duration": round(seconds, 6),
        "tier": served.tier,
        "fill_wait": served.waited,
    }
    if ended is not None:
        fields["ended"] = ended  # aborted: a body cut short; client_disconnect
    line = (
        f"{served.client} - {_quoted(served.user or '-')} "
        f'"{method} {_quoted(path)} {protocol}" '
        f"{status} {nbytes} {seconds:.3f} "
        f"tier={served.tier or '-'} waited={'yes' if served.waited else 'no'}"
    )
    if ended is not None:
        line += f" ended={ended}"
    logger.info(line, extra={"fields": fields})


def body_bytes(request: web.BaseRequest, response: web.StreamResponse, served: Served) -> int:
    """The body's bytes sent: its ``Content-Length`` (a FileResponse's is the range it
    sends), or what a handler streaming a body itself says it sent (``sent``: a fill's
    body may be cut short). aiohttp's ``body_length`` would count the headers and miss
    what sendfile sends."""
    if served.sent is not None:
        return served.sent
    if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return 0
    return response.content_length or 0


def target(raw_path: str, raw_query: str) -> str:
    """The path as sent, and the query with only the API's own values."""
    text = raw_path
    if raw_query:
        pairs = []
        for part in raw_query.split("&"):
            key, sep, _ = part.partition("=")
            if unquote_plus(key) in KNOWN_PARAMETERS:
                pairs.append(part)
            else:  # a value, or a bare word, might be a credential
                pairs.append(f"{key}=…" if sep else "…")
        text += "?" + "&".join(pairs)
    return text[:MAX_TARGET]


def _quoted(text: str) -> str:
    """Safe inside a line: anything but printable ASCII (and our ``…``), a quote or a
    backslash is written as ``\\xNN`` bytes, so no value can forge a field or a line."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return "".join(f"\\x{b:02x}" for b in match[0].encode())
