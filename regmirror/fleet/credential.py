"""The peer credential: an HMAC-SHA256 over the request, keyed with ``fleet.secret``.

``Authorization: RegmirrorFleet <unix time>:<hex HMAC of "<method> <path>\\n<time>">``.
The secret itself never crosses the wire, a captured header is good for one path for
:data:`WINDOW` seconds, and the check is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "RegmirrorFleet"
WINDOW = 300.0  # seconds a signature is accepted either side of our clock


def _mac(secret: str, method: str, path: str, stamp: str) -> str:
    message = f"{method.upper()} {path}\n{stamp}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, now: float | None = None) -> str:
    stamp = str(int(time.time() if now is None else now))
    return f"{SCHEME} {stamp}:{_mac(secret, method, path, stamp)}"


def verify(
    secret: str, header: str | None, method: str, path: str, now: float | None = None
) -> bool:
    scheme, _, value = (header or "").partition(" ")
    stamp, _, mac = value.strip().partition(":")
    if scheme != SCHEME or not stamp.isdigit() or len(stamp) > 12:
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > WINDOW:
        return False
    return hmac.compare_digest(mac, _mac(secret, method, path, stamp))
