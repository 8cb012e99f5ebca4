"""Access-control test helpers: htpasswd files, Basic headers, source addresses, and a
watch that fails a test when a secret (password, token, Authorization value) was logged.

Fixtures: ``from tests.support.auth import secrets_watch`` (autouse it in a module with
``pytestmark = pytest.mark.usefixtures("secrets_watch")``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestClient

# Every secret a test hands out goes here; no log line may contain one.
SECRETS: set[str] = set()


def secret(value: str) -> str:
    """Register ``value`` as a secret that must never be logged; returns it."""
    SECRETS.add(value)
    return value


def bcrypt_hash(password: str, *, cost: int = 4, prefix: str = "$2y$") -> str:
    """What ``htpasswd -B -C cost`` writes ($2y$); ``prefix`` $2a$ / $2b$ for the others."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return prefix + hashed[4:]


def write_htpasswd(path: Path, users: Mapping[str, str], *, cost: int = 4) -> Path:
    path.write_text("".join(f"{u}:{bcrypt_hash(p, cost=cost)}\n" for u, p in users.items()))
    return path


def basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    secret(password)
    secret(value)
    return {"Authorization": f"Basic {value}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(token)}"}


async def request_from(
    client: TestClient, source: str, method: str, path: str, **kwargs: Any
) -> tuple[int, Mapping[str, str], bytes]:
    """``method path`` on ``client``'s server, sent from the local address ``source``
    (any 127.x.y.z works on Linux loopback): status, headers and body."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, client.make_url(path), **kwargs) as response,
    ):
        return response.status, dict(response.headers), await response.read()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def leaked(text: str) -> list[str]:
    """The registered secrets found in ``text``."""
    return sorted(s for s in SECRETS if s and s in text)


@pytest.fixture
def secrets_watch() -> Iterator[list[str]]:
    """Every log line of the test at DEBUG (in-process servers); fails the test if one
    holds a registered secret. Yields the lines, so a test can check it saw some."""
    handler = _Collect()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    found = [(line, leaked(line)) for line in handler.lines if leaked(line)]
    assert not found, f"secrets in the log: {found[:5]}"
