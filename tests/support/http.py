"""An HTTP client for tests against real processes (``regmirror serve``, registry:2, nginx).

``from tests.support.http import session`` in a test module provides the ``session``
fixture: one aiohttp ``ClientSession`` per test, closed after it. Its total timeout
bounds every request, so a server that hangs fails its test instead of stalling the
suite; a test that waits longer on purpose passes its own ``timeout=`` per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

REQUEST_BOUND = 120.0  # seconds: no request of the suite legitimately takes longer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_BOUND)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client
