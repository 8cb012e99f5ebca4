"""Manifest GET and HEAD answered from memory (the fast path: :mod:`regmirror.lean`).

Answered here: a manifest :meth:`Registry.manifest_now` finds without waiting (pushed,
or pulled through and asked for by digest), for a request that needs no credentials
(no access control, or anonymous pull from the client's network, and no
``Authorization`` header to check), with no query but containerd's ``ns``. The
response is the handler's (:func:`regmirror.api.manifests.get_manifest`) byte for byte
but the ``Date``; the request is counted in ``regmirror_http_requests_total`` and the
latency histogram under the route's own label, and logged by the access log as
aiohttp's path logs it. Everything else returns None: aiohttp answers it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from cachetools import LRUCache

from regmirror.api.keys import METRICS, REGISTRY, TRUSTED_PROXIES
from regmirror.auth.clients import Network, client_address, within
from regmirror.auth.middleware import ACCESS_POLICY, AccessPolicy
from regmirror.digest import Digest
from regmirror.errors import RegistryError
from regmirror.lean.wire import TRAILING_HEADERS, Clock, Head
from regmirror.logs.access import ACCESS, ENABLED, client_namer, target, write_line
from regmirror.logs.served import Served
from regmirror.manifest import Manifest
from regmirror.metrics import Metrics
from regmirror.names import check_name, parse_reference
from regmirror.registry import Registry

# aiohttp's name for the route (regmirror.api.routes): the metrics' ``route`` label.
ROUTE = "/v2/{name}/manifests/{reference}"
MARKER = b"/manifests/"
RESPONSES = 4096  # manifests whose response heads are kept


class _Wire:
    """A manifest's response heads, up to the ``Date`` line."""

    __slots__ = ("etag", "manifest", "not_modified", "ok")

    def __init__(self, manifest: Manifest):
        lines = "".join(f"{name}: {value}\r\n" for name, value in manifest.headers.items())
        self.manifest = manifest
        self.ok = f"HTTP/1.1 200 OK\r\n{lines}Content-Length: {len(manifest.raw)}\r\n".encode()
        self.not_modified = f"HTTP/1.1 304 Not Modified\r\n{lines}".encode()
        self.etag = manifest.headers["ETag"]


class ManifestAnswers:
    @classmethod
    def of(cls, app: web.Application) -> ManifestAnswers:
        """The fast path of ``app`` (:func:`regmirror.app.create_app`'s)."""
        trusted: tuple[Network, ...] = app[TRUSTED_PROXIES]
        return cls(
            app[REGISTRY],
            app[METRICS],
            policy=app.get(ACCESS_POLICY),
            trusted_proxies=trusted,
            access_log=app[ENABLED],
        )

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        policy: AccessPolicy | None,
        trusted_proxies: Sequence[Network],
        access_log: bool,
    ):
        self.registry = registry
        self.metrics = metrics
        self.policy = policy
        self.access_log = access_log
        self._client = client_namer(trusted_proxies)
        self._wires: LRUCache[Digest, _Wire] = LRUCache(RESPONSES)
        self._clock = Clock()
        self._anonymous: Callable[[str | None, tuple[str, ...]], bool] | None = None
        if policy is not None:
            self._anonymous = functools.lru_cache(maxsize=4096)(
                lambda peer, forwarded: within(
                    client_address(peer, forwarded, policy.trusted_proxies), policy.anonymous_pull
                )
            )

    def answer(self, head: Head, peer: str | None) -> bytes | None:
        """The whole response to ``head`` from ``peer``, or None: aiohttp's to answer."""
        started = time.perf_counter()
        method = head.method
        if method != b"GET" and method != b"HEAD":
            return None
        found = _route(head.path)
        if found is None:
            return None
        ns = _ns(head.query) if head.query else None
        if ns == "":
            return None
        headers = head.headers
        if len(headers.get(b"host", ())) != 1:
            return None  # aiohttp's 400
        forwarded = tuple(_text(v) for v in headers.get(b"x-forwarded-for", ()))
        if self._anonymous is not None and (
            b"authorization" in headers or not self._anonymous(peer, forwarded)
        ):
            return None  # credentials to check
        name, reference = found
        manifest = self.registry.manifest_now(name, reference, ns=ns)
        if manifest is None:
            return None
        wire = self._wire(manifest)
        if wire is None:
            return None
        match = headers.get(b"if-none-match")
        if match is not None and wire.etag in _text(match[0]):
            status, response, nbytes = 304, wire.not_modified, 0
        elif method == b"HEAD":
            status, response, nbytes = 200, wire.ok, 0
        else:
            status, response, nbytes = 200, wire.ok, len(manifest.raw)
        response += self._clock.date_line() + TRAILING_HEADERS
        if nbytes:
            response += manifest.raw
        verb = "GET" if method == b"GET" else "HEAD"
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(ROUTE, verb, status, elapsed)
        self.metrics.fast_path.inc()
        if self.access_log and ACCESS.isEnabledFor(logging.INFO):
            served = Served(client=self._client(peer, forwarded), tier="local")
            path = target(head.path.decode("ascii"), _text(head.query))
            write_line(ACCESS, served, verb, path, "HTTP/1.1", status, nbytes, elapsed)
        return response

    def _wire(self, manifest: Manifest) -> _Wire | None:
        wire = self._wires.get(manifest.digest)
        if wire is None or wire.manifest is not manifest:
            if any("\r" in v or "\n" in v for v in manifest.headers.values()):
                return None  # aiohttp refuses such a header: its error, not ours
            wire = self._wires[manifest.digest] = _Wire(manifest)
        return wire


@functools.lru_cache(maxsize=4096)
def _route(path: bytes) -> tuple[str, str | Digest] | None:
    """(name, reference) of a manifest path as sent; None for any other path, or one
    the handler would refuse (its errors are aiohttp's to answer). Clients ask for the
    same few paths again and again: each is checked once."""
    if not path.startswith(b"/v2/") or b"%" in path:
        return None  # percent-escapes: aiohttp's router decodes them
    name, marker, reference = path[4:].rpartition(MARKER)
    if not marker or not reference or b"/" in reference:
        return None
    try:
        return check_name(name.decode("ascii")), parse_reference(reference.decode("ascii"))
    except (UnicodeDecodeError, RegistryError):
        return None


def _ns(query: bytes) -> str:
    """containerd's ``ns`` when it is the only parameter, with nothing to decode; ""
    for any other query."""
    key, _, value = query.partition(b"=")
    if key != b"ns" or not value.isascii() or any(c in value for c in b"&%+#"):
        return ""
    return value.decode("ascii")


def _text(value: bytes) -> str:
    """A header value as aiohttp decodes it."""
    return value.decode("utf-8", "surrogateescape")
