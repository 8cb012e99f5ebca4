"""Numbers read from text someone else wrote: headers, config, env, files.

``str.isdigit`` (and a regex's ``\\d``) accept other scripts' digits such as ``²`` or
``١``, which ``int`` then refuses with a ValueError or reads as a number nobody meant;
and a long enough run of digits makes ``int`` refuse too (or the caller loop). Every
parser here takes ASCII digits only, and a bounded count of them.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")


def ascii_int(text: str, *, max_digits: int = 18) -> int | None:
    """``text`` as a non-negative integer if it is 1 to ``max_digits`` ASCII digits."""
    if len(text) > max_digits or _DIGITS.fullmatch(text) is None:
        return None
    return int(text)


def content_range_total(header: str | None) -> int | None:
    """The full size from ``Content-Range: bytes 0-9/1234``; None if absent or not a number."""
    return ascii_int((header or "").rpartition("/")[2].strip())
