"""Where a request comes from, and whether that network may pull without credentials.

``X-Forwarded-For`` is believed only from ``auth.trusted_proxies``: walking the hops
from the right (the peer, then what each trusted proxy says it was sent by), the client
is the first address that is not a trusted proxy. Anything a client writes into the
header itself is to the left of that and never consulted.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from regmirror.config import ConfigError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(values: Iterable[str], setting: str) -> tuple[Network, ...]:
    """CIDRs (or single addresses) parsed, or a ConfigError naming the setting."""
    parsed = []
    for i, value in enumerate(values):
        try:
            parsed.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(
                f"{setting}[{i}]: {value!r} is not a network like 10.0.0.0/8"
            ) from exc
    return tuple(parsed)


@functools.lru_cache(maxsize=4096)
def _address(text: str | None) -> Address | None:
    """``text`` (an address, maybe with a port) parsed; kept for the peers and hops seen
    most recently, as every request asks again."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def within(address: Address | None, nets: Sequence[Network]) -> bool:
    return address is not None and any(address in net for net in nets)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's address: the peer, or from a trusted peer the rightmost untrusted hop.

    ``forwarded_for``: every ``X-Forwarded-For`` header's value, in order. None when the
    address that decides is not an address (a unix socket, a malformed hop).
    """
    address = _address(peer)
    if not within(address, trusted):
        return address
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if not within(address, trusted):
            return address
    return address  # every hop a trusted proxy: the leftmost one
