"""How many upload sessions are open, in all and per client address, against their caps.

Every session costs a directory and two files on disk until it is committed, cancelled or
expires (``uploads.ttl``), so a client that opens sessions and walks away could fill the
disk and the directory. The count lives in memory: rebuilt at startup from the sessions'
``info.json`` (which records the client address), then kept as sessions open and close.
With several worker processes (``server.workers``) the count is brought up to date from
disk before each new session, under a lock of the host's held until that session's
directory is made (:meth:`regmirror.uploads.Uploads.start`), so the caps hold exactly
for the host, not per worker: of two workers opening the last free session at the same
instant, one gets it.

An IPv6 client counts by its network (``uploads.client_ipv6_prefix``, /64 by default):
one host is routinely handed a whole /64 and may pick a fresh address for every request,
so per address it could open sessions without end. ``info.json`` keeps the address
itself; the grouping is applied when counting, so changing the prefix regroups the
sessions on disk at the next start.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

from regmirror.errors import TooManyUploads


class SessionCaps:
    """Open sessions by id and client; :meth:`open` refuses one over a cap."""

    def __init__(self, *, total: int, per_client: int, ipv6_prefix: int = 64):
        self.total = total
        self.per_client = per_client
        self.ipv6_prefix = ipv6_prefix
        self._clients: dict[str, str] = {}  # session id -> client (see client_key)
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._clients)

    def of(self, client: str) -> int:
        return self._counts[self.client_key(client)]

    def client_key(self, client: str) -> str:
        """Who ``client`` (an address as recorded) counts as: an IPv6 address as its
        network of ``ipv6_prefix`` bits; anything else as itself."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client  # "-": no address known
        if address.version != 6 or self.ipv6_prefix >= 128:
            return client
        return str(ipaddress.ip_network(f"{address}/{self.ipv6_prefix}", strict=False))

    def open(self, upload_id: str, client: str) -> None:
        """Count a new session of ``client``; TOOMANYREQUESTS (429) if a cap is reached."""
        client = self.client_key(client)
        if len(self._clients) >= self.total:
            raise TooManyUploads(
                f"{len(self._clients)} upload sessions are open, the most this registry "
                "keeps (uploads.max_sessions); finish or cancel some, or retry later",
                reason="max_sessions",
            )
        if self._counts[client] >= self.per_client:
            raise TooManyUploads(
                f"{self._counts[client]} upload sessions are open from {client}, the most "
                "one client may have (uploads.max_sessions_per_client); finish or cancel "
                "(DELETE) some, or let them expire",
                reason="max_sessions_per_client",
            )
        self._add(upload_id, client)

    def close(self, upload_id: str) -> None:
        """The session is gone (committed, cancelled, expired); unknown ids are ignored."""
        client = self._clients.pop(upload_id, None)
        if client is not None:
            self._counts[client] -= 1
            if self._counts[client] <= 0:
                del self._counts[client]

    def ids(self) -> set[str]:
        return set(self._clients)

    def load(self, sessions: Iterable[tuple[str, str]]) -> None:
        """Count the sessions found on disk (id, client): never refused, even over a cap."""
        for upload_id, client in sessions:
            if upload_id not in self._clients:
                self._add(upload_id, client)

    def _add(self, upload_id: str, client: str) -> None:
        client = self.client_key(client)
        self._clients[upload_id] = client
        self._counts[client] += 1
