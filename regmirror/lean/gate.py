"""What every request the fast path answers has in common: a path it reads, the Host
aiohttp insists on, containerd's ``ns`` at most, no credentials to check, and the
client as the access log names it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from regmirror.auth.clients import Network, client_address, within
from regmirror.auth.middleware import AccessPolicy
from regmirror.digest import Digest
from regmirror.errors import RegistryError
from regmirror.lean.wire import Head
from regmirror.logs.access import ACCESS, client_namer, target, write_line
from regmirror.logs.served import Served
from regmirror.names import check_name, parse_reference

Kind = Literal["manifests", "blobs"]
# aiohttp's names for the routes (regmirror.api.routes): the metrics' ``route`` label.
ROUTES: dict[Kind, str] = {
    "manifests": "/v2/{name}/manifests/{reference}",
    "blobs": "/v2/{name}/blobs/{digest}",
}


@dataclass(slots=True)
class Admitted:
    """A request the fast path may answer, if what it asks for is at hand."""

    verb: str
    kind: Kind
    name: str
    reference: str | Digest
    ns: str | None
    forwarded: tuple[str, ...]


class Gate:
    def __init__(self, policy: AccessPolicy | None, trusted_proxies: Sequence[Network]):
        self.client = client_namer(trusted_proxies)  # as the access log names it
        self._anonymous: Callable[[str | None, tuple[str, ...]], bool] | None = None
        if policy is not None:
            self._anonymous = functools.lru_cache(maxsize=4096)(
                lambda peer, forwarded: within(
                    client_address(peer, forwarded, policy.trusted_proxies), policy.anonymous_pull
                )
            )

    def admit(self, head: Head, peer: str | None) -> Admitted | None:
        method = head.method
        if method != b"GET" and method != b"HEAD":
            return None
        found = _route(head.path)
        if found is None:
            return None
        ns = None
        if head.query:
            ns = _ns(head.query)
            if ns is None:
                return None
        headers = head.headers
        if len(headers.get(b"host", ())) != 1:
            return None  # aiohttp's 400
        forwarded = tuple(text(v) for v in headers.get(b"x-forwarded-for", ()))
        if self._anonymous is not None and (
            b"authorization" in headers or not self._anonymous(peer, forwarded)
        ):
            return None  # credentials to check
        kind, name, reference = found
        return Admitted("GET" if method == b"GET" else "HEAD", kind, name, reference, ns, forwarded)


def text(value: bytes) -> str:
    """A header value as aiohttp decodes it."""
    return value.decode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4096)
def _route(path: bytes) -> tuple[Kind, str, str | Digest] | None:
    """(kind, name, reference) of a manifest or blob path as sent; None for any other
    path, or one its handler would refuse (its errors are aiohttp's to answer). Clients
    ask for the same few paths again and again: each is checked once."""
    if not path.startswith(b"/v2/") or b"%" in path:
        return None  # percent-escapes: aiohttp's router decodes them
    kind: Kind
    for kind in ("manifests", "blobs"):
        name, marker, reference = path[4:].rpartition(f"/{kind}/".encode())
        if marker and reference and b"/" not in reference:
            break
    else:
        return None
    try:
        parsed = parse_reference(reference.decode("ascii"))
        if kind == "blobs" and not isinstance(parsed, Digest):
            return None
        return kind, check_name(name.decode("ascii")), parsed
    except (UnicodeDecodeError, RegistryError):
        return None


def _ns(query: bytes) -> str | None:
    """containerd's ``ns`` when it is the only parameter, with nothing to decode; None
    for any other query."""
    key, _, value = query.partition(b"=")
    if key != b"ns" or not value or not value.isascii() or any(c in value for c in b"&%+#"):
        return None
    return value.decode("ascii")


def log_access(
    client: str,
    asked: Admitted,
    head: Head,
    status: int,
    nbytes: int,
    seconds: float,
    ended: str | None = None,
) -> None:
    """The access line aiohttp's path would write for the request (when the log is on)."""
    if ACCESS.isEnabledFor(logging.INFO):
        path = target(head.path.decode("ascii"), text(head.query))
        served = Served(client=client, tier="local")
        write_line(ACCESS, served, asked.verb, path, "HTTP/1.1", status, nbytes, seconds, ended)
