"""Sizes for people, in the binary units the config takes (``10GiB``)."""

from __future__ import annotations

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def size_text(n: float | None) -> str:
    """``1073741824`` → ``1.0 GiB``; ``512`` → ``512 bytes``."""
    if n is None:
        return "?"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} {_UNITS[0]}" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"
