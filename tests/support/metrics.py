"""A running server's metrics, as ``/metrics`` gives them (every worker's)."""

from __future__ import annotations

import re
import urllib.request

from tests.support.processes import ServerProcess


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"{name}[{{ ]", line) and all(label in line for label in wanted)
    )
