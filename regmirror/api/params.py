"""Parsing of path and query parameters into validated registry values."""

from __future__ import annotations

import re

from aiohttp import web

from regmirror.digest import Digest
from regmirror.errors import (
    DigestInvalid,
    ManifestUnknown,
    PaginationInvalid,
    RangeInvalid,
    SizeInvalid,
    TagInvalid,
)
from regmirror.names import check_name, parse_reference

# ASCII digits only (``\d`` and ``str.isdigit`` accept other scripts' digits, which
# ``int`` then rejects or reads), and few enough of them that ``int`` never refuses.
_NUMBER = "[0-9]{1,18}"
_CONTENT_RANGE = re.compile(rf"^(?:bytes[ =])?({_NUMBER})-({_NUMBER})(?:/(?:{_NUMBER}|\*))?$")


def name(request: web.Request) -> str:
    return check_name(request.match_info["name"])


def reference(request: web.Request) -> str | Digest:
    """The manifest reference to store or delete under: a malformed tag is TAG_INVALID,
    a malformed digest DIGEST_INVALID."""
    return parse_reference(request.match_info["reference"])


def known_reference(request: web.Request) -> str | Digest:
    """The manifest reference to look up (GET, HEAD). One that cannot be spelled names no
    manifest: MANIFEST_UNKNOWN (404), as the distribution spec's conformance suite and
    registry:2 answer, not the 400 of a write."""
    raw = request.match_info["reference"]
    try:
        return parse_reference(raw)
    except (TagInvalid, DigestInvalid) as exc:
        raise ManifestUnknown(f"manifest unknown: {exc.message}", {"reference": raw[:150]}) from exc


def digest(text: str | None, what: str = "digest") -> Digest:
    if not text:
        raise DigestInvalid(f"the {what} parameter is required")
    return Digest.parse(text)


def content_length(request: web.Request) -> int | None:
    """The declared body length; a malformed header is SIZE_INVALID, not a 500."""
    raw = request.headers.get("Content-Length")
    if raw is None:
        return None
    if not re.fullmatch(_NUMBER, raw.strip()):
        raise SizeInvalid(f"Content-Length {raw[:40]!r} is not a non-negative number")
    return int(raw)


def content_range(request: web.Request) -> tuple[int, int] | None:
    raw = request.headers.get("Content-Range")
    if raw is None:
        return None
    match = _CONTENT_RANGE.match(raw.strip())
    if not match or int(match[1]) > int(match[2]):
        raise RangeInvalid(f"Content-Range {raw[:60]!r} is not '<start>-<end>' with start <= end")
    return int(match[1]), int(match[2])


def page(request: web.Request) -> tuple[int | None, str | None]:
    """The ``n`` and ``last`` pagination parameters."""
    raw = request.query.get("n")
    limit = None
    if raw is not None:
        if not re.fullmatch(_NUMBER, raw):
            raise PaginationInvalid(f"n={raw[:40]!r} is not a non-negative integer")
        limit = int(raw)
    return limit, request.query.get("last")
