"""The peer credential: an HMAC-SHA256 over the request, keyed with ``fleet.secret``.

``Authorization: RegmirrorFleet <unix time>:<hex HMAC of "<method> <path>\\n<time>">``.
The secret itself never crosses the wire, a captured header is good for one path for
:data:`WINDOW` seconds, and the check is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

SCHEME = "RegmirrorFleet"
WINDOW = 300.0  # seconds a signature is accepted either side of our clock
# ASCII only: str.isdigit() takes other scripts' digits (int() then refuses "²"), and
# hmac.compare_digest raises on a non-ASCII str; a header is whatever a client sent.
_VALUE = re.compile(r"([0-9]{1,12}):([0-9a-f]{64})")


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
    match = _VALUE.fullmatch(value.strip())
    if scheme != SCHEME or match is None:
        return False
    stamp, mac = match.groups()
    if abs((time.time() if now is None else now) - int(stamp)) > WINDOW:
        return False
    return hmac.compare_digest(mac, _mac(secret, method, path, stamp))
